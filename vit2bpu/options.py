"""Conversion options shared by the command line and the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .errors import UsageError
from .targets import DEFAULT_TARGET, LAYERNORM_FORMS, SOFTMAX_FORMS, Target, get_target

# Parity thresholds on the cosine similarity of each output, per element type.
# fp16 graphs round every intermediate to 11 significant bits, so their outputs
# differ from a reordered computation by far more than fp32 ones.
DEFAULT_MIN_COSINE = {"float32": 0.99999, "float16": 0.999}


@dataclass
class ConvertOptions:
    """Everything that changes what ``convert`` writes or checks.

    ``None`` for ``layernorm`` or ``softmax`` means "the target's default".
    """

    target: str = DEFAULT_TARGET
    layernorm: str | None = None
    softmax: str | None = None
    fold_norm_affine: bool = True
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    passes: Sequence[str] | None = None
    simplify: bool = False
    strict: bool = False
    parity: bool = True
    parity_inputs: Mapping[str, object] | None = None
    parity_seed: int = 0
    min_cosine: float | None = None
    check_top1: bool = True

    def resolved_target(self) -> Target:
        return get_target(self.target)

    def layernorm_form(self) -> str:
        form = self.layernorm or self.resolved_target().layernorm
        if form not in LAYERNORM_FORMS:
            raise UsageError(f"unknown LayerNorm form '{form}'", hint=f"choose one of: {', '.join(LAYERNORM_FORMS)}")
        return form

    def softmax_form(self) -> str:
        form = self.softmax or self.resolved_target().softmax
        if form not in SOFTMAX_FORMS:
            raise UsageError(f"unknown Softmax form '{form}'", hint=f"choose one of: {', '.join(SOFTMAX_FORMS)}")
        return form

    def validate(self) -> None:
        """Raise UsageError on any inconsistent option."""
        self.resolved_target()
        self.layernorm_form()
        self.softmax_form()
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise UsageError(f"minimum cosine {self.min_cosine} is outside (0, 1]")
        for name, shape in self.input_shapes.items():
            if not shape or any(int(d) <= 0 for d in shape):
                raise UsageError(f"input shape for '{name}' must be positive integers, got {list(shape)}")


def parse_shape(text: str) -> tuple[str, list[int]]:
    """Parse ``NAME=1x3x224x224`` (commas also accepted) into a name and dimensions."""
    if "=" not in text:
        raise UsageError(f"invalid input shape '{text}'", hint="write NAME=1x3x224x224")
    name, dims = text.rsplit("=", 1)
    try:
        shape = [int(d) for d in dims.replace(",", "x").split("x") if d.strip()]
    except ValueError:
        raise UsageError(f"invalid input shape '{text}'", hint="write NAME=1x3x224x224") from None
    if not name or not shape or any(d <= 0 for d in shape):
        raise UsageError(f"invalid input shape '{text}'", hint="write NAME=1x3x224x224 with positive sizes")
    return name, shape
