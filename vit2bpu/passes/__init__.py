"""The rewrite passes, one module each, and the order the pipeline runs them in.

Preparation (every conversion): ``lower_contrib`` -> ``pin_shapes`` -> ``fold_constants`` -> ``lower_opset``.
Rewrites (selectable with ``--passes``): ``restore_tokens`` -> ``patch_embed`` -> ``linear`` -> ``layernorm``
-> ``attention`` -> ``softmax`` -> ``layout`` -> ``fold_norm_affine``.
Finishing (every conversion): ``lower_adapters``.
"""

from __future__ import annotations

from ..errors import UsageError
from .attention import AttentionToChannels
from .fold_constants import FoldConstants
from .fold_norm_affine import FoldNormAffine
from .layernorm import LayerNormToChannels
from .layout import PropagateLayout
from .linear import LinearToConv
from .lower_adapters import LowerLayoutAdapters
from .lower_contrib import LowerContribOps
from .lower_opset import LowerToOpset11
from .patch_embed import PatchEmbedToTokensOnW
from .pin_shapes import PinInputShapes
from .restore_tokens import RestoreTokenAxis
from .softmax import DecomposeSoftmax

PREPARE = (LowerContribOps, PinInputShapes, FoldConstants, LowerToOpset11)
REWRITES = (RestoreTokenAxis, PatchEmbedToTokensOnW, LinearToConv, LayerNormToChannels, AttentionToChannels,
            DecomposeSoftmax, PropagateLayout, FoldNormAffine)
FINISH = (LowerLayoutAdapters,)

REWRITE_NAMES = tuple(p.name for p in REWRITES)


def build_pipeline(selected: list[str] | None = None) -> list:
    """Return pass instances in the declared order; ``selected`` picks a subset of the rewrites.

    A selected pass brings the rewrites it requires, and ``layout`` always runs
    when any rewrite does, because it removes the adapters the rewrites leave.
    """
    if selected is None:
        rewrites = list(REWRITES)
    else:
        unknown = sorted(set(selected) - set(REWRITE_NAMES))
        if unknown:
            raise UsageError(f"unknown pass {unknown}", hint=f"choose from: {', '.join(REWRITE_NAMES)}")
        wanted = set(selected)
        for cls in REWRITES:
            if cls.name in wanted:
                wanted.update(cls.requires)
        if wanted:
            wanted.add(PropagateLayout.name)
        rewrites = [cls for cls in REWRITES if cls.name in wanted]
    return [cls() for cls in (*PREPARE, *rewrites, *FINISH)]


__all__ = ["AttentionToChannels", "FoldConstants", "FoldNormAffine", "LayerNormToChannels", "LinearToConv",
           "LowerContribOps", "LowerLayoutAdapters", "LowerToOpset11", "PatchEmbedToTokensOnW", "PinInputShapes", "PropagateLayout", "RestoreTokenAxis",
           "DecomposeSoftmax", "build_pipeline", "REWRITE_NAMES"]
