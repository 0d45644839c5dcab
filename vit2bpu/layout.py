"""The channels-first layout that converted regions use, and the adapters at their borders.

Every rewritten region reads and writes 4-D NCHW tensors. The token stream
``[B, N, C]`` becomes ``[B, C, 1, N]``: channels on C and tokens on W, because the
BPU runs a 1x1 convolution about 9x faster with the tokens on W than on H. A
per-sample vector ``[B, C]`` (the class token before the head) becomes
``[B, C, 1, 1]``.

While the passes run, the border between converted and unconverted tensors is
marked by two adapter nodes in a private domain:

- ``ToChannelsFirst``: original layout -> 4-D;
- ``FromChannelsFirst``: 4-D -> original layout.

A pass wraps its 4-D rewrite in adapters; the layout pass pushes
``FromChannelsFirst`` forward through elementwise ops and cancels it against the
next ``ToChannelsFirst``; the adapters left at the end become Transpose/Reshape
nodes. Marking borders this way lets each pass rewrite one pattern without
knowing what its neighbours became.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .graph import GraphEditor, producer_of

DOMAIN = "vit2bpu.layout"
TO_OP = "ToChannelsFirst"
FROM_OP = "FromChannelsFirst"

TOKENS = "tokens"  # [B, N, C] <-> [B, C, 1, N]
VECTOR = "vector"  # [B, C]    <-> [B, C, 1, 1]

_KIND_BY_RANK = {3: TOKENS, 2: VECTOR}
# Axis of the original layout -> axis of the 4-D layout.
AXIS_MAP = {TOKENS: {0: 0, 1: 3, 2: 1}, VECTOR: {0: 0, 1: 1}}


def kind_for_rank(rank: int | None) -> str | None:
    return _KIND_BY_RANK.get(rank)


def channels_first_shape(shape: Sequence[int], kind: str) -> list[int]:
    if kind == TOKENS:
        batch, tokens, channels = shape
        return [batch, channels, 1, tokens]
    batch, channels = shape
    return [batch, channels, 1, 1]


def original_shape(shape4: Sequence[int], kind: str) -> list[int]:
    if kind == TOKENS:
        return [shape4[0], shape4[3], shape4[1]]
    return [shape4[0], shape4[1]]


def const_to_channels_first(value: np.ndarray, kind: str) -> np.ndarray | None:
    """Rewrite a constant that broadcasts against the original layout so it broadcasts against the 4-D one.

    Returns None when the constant has more dimensions than the original layout.
    """
    rank = 3 if kind == TOKENS else 2
    if value.ndim > rank:
        return None
    padded = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if kind == TOKENS:
        return np.ascontiguousarray(padded.transpose(0, 2, 1)[:, :, None, :])
    return np.ascontiguousarray(padded[:, :, None, None])


def to_channels_first(editor: GraphEditor, tensor: gs.Tensor, base: str) -> gs.Variable:
    """Insert ToChannelsFirst on ``tensor`` (rank 3 or 2) and return the 4-D tensor."""
    kind = kind_for_rank(len(tensor.shape))
    return editor.out(TO_OP, f"{base}/to_nchw", [tensor], attrs={"kind": kind}, domain=DOMAIN,
                      dtype=tensor.dtype, shape=channels_first_shape(tensor.shape, kind))


def from_channels_first(editor: GraphEditor, tensor4: gs.Tensor, kind: str, base: str) -> gs.Variable:
    """Insert FromChannelsFirst on a 4-D tensor and return the tensor in the original layout."""
    return editor.out(FROM_OP, f"{base}/from_nchw", [tensor4], attrs={"kind": kind}, domain=DOMAIN,
                      dtype=tensor4.dtype, shape=original_shape(tensor4.shape, kind))


def is_adapter(node: gs.Node | None, op: str) -> bool:
    return node is not None and node.domain == DOMAIN and node.op == op


def from_adapter_of(tensor: gs.Tensor) -> gs.Node | None:
    """Return the FromChannelsFirst node producing ``tensor``, if any."""
    producer = producer_of(tensor)
    return producer if is_adapter(producer, FROM_OP) else None


def channels_first_source(tensor: gs.Tensor, kind: str | None = None) -> gs.Tensor | None:
    """Return the 4-D tensor behind ``tensor`` when it comes straight out of a FromChannelsFirst adapter."""
    adapter = from_adapter_of(tensor)
    if adapter is None or (kind is not None and adapter.attrs["kind"] != kind):
        return None
    return adapter.inputs[0]
