"""Per-chip target profiles: which form of each op the passes emit.

A profile holds the defaults for one BPU generation; every choice can be
overridden by an explicit option (``ConvertOptions``). The march names are the
ones ``hb_mapper --march`` accepts in the RDK X5 toolchain (hb_mapper 1.24.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

LAYERNORM_FORMS = ("conv", "reducemean", "center")
SOFTMAX_FORMS = ("keep", "decompose")


@dataclass(frozen=True)
class Target:
    """Defaults for one chip."""

    name: str
    march: str
    description: str
    # How LayerNorm's mean and variance are computed over the channel axis:
    # "conv" uses 1x1 convolutions C->1 with weights 1/C, "reducemean" uses ReduceMean(axes=[1]),
    # "center" subtracts the mean with one C->C 1x1 convolution (weights I - 1/C) instead of a Sub.
    layernorm: str
    # "keep" leaves Softmax as one op (the toolchain runs it on the CPU by default);
    # "decompose" writes ReduceMax, Sub, Exp, ReduceSum and Div, which the toolchain can place on the BPU.
    softmax: str


# X3's BPU runs ReduceMean and Sub on the CPU (RDK X3 operator table), so its LayerNorm
# subtracts the mean with a centring Conv. On X5 and J5 every form runs on the BPU.
TARGETS = {
    "x3": Target("x3", "bernoulli2", "RDK X3 / Journey 3 (BPU Bernoulli 2)", layernorm="center", softmax="keep"),
    "x5": Target("x5", "bayes-e", "RDK X5 (BPU Bayes-e)", layernorm="conv", softmax="keep"),
    "j5": Target("j5", "bayes", "Journey 5 (BPU Bayes)", layernorm="conv", softmax="keep"),
}

DEFAULT_TARGET = "x5"


def get_target(name: str) -> Target:
    """Return the profile called ``name`` (x3, x5 or j5)."""
    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown target '{name}'", hint=f"choose one of: {', '.join(TARGETS)}") from None
