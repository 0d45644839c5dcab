"""Fold a per-channel affine (LayerNorm's gamma and beta) into the 1x1 Convs that read it.

``Conv(W, b)(gamma * n + beta) == Conv(W * gamma, b + W @ beta)(n)`` exactly, for a
1x1 Conv with group 1: gamma scales input channels (zeros in gamma just zero
the matching weight columns) and beta becomes a constant per output channel.
The fold happens only when every consumer of the affine output is such a Conv;
otherwise the per-channel Mul and Add stay.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, attr, const_value, only_consumer
from ..pass_manager import Pass, PassContext, PassResult


def _per_channel(node: gs.Node, op: str) -> tuple[gs.Tensor, np.ndarray] | None:
    """For ``op(x, c)`` with c of shape [1, C, 1, 1] and C > 1, return (x, c flattened).

    Scalars are left alone: folding GELU's 0.5 into the next Conv would break the
    Erf chain that the toolchain fuses into one lookup table.
    """
    if node is None or node.op != op or len(node.inputs) != 2:
        return None
    value = const_value(node.inputs[1])
    if value is None or value.ndim != 4 or value.shape[0] != 1 or value.shape[2:] != (1, 1) or value.shape[1] < 2:
        return None
    return node.inputs[0], value.reshape(-1)


def _keeps_channels(node: gs.Node) -> bool:
    """A Slice whose constant axes leave the channel axis (1) whole."""
    if node.op != "Slice" or len(node.inputs) < 4:
        return False
    axes = const_value(node.inputs[3])
    return axes is not None and all(int(a) % 4 != 1 for a in axes.reshape(-1))


def _is_pointwise_conv(node: gs.Node, tensor: gs.Tensor) -> bool:
    if node.op != "Conv" or node.inputs[0] is not tensor or const_value(node.inputs[1]) is None:
        return False
    weight = const_value(node.inputs[1])
    return (weight.shape[2:] == (1, 1) and attr(node, "group", 1) == 1
            and all(s == 1 for s in attr(node, "strides", [1, 1]))
            and all(p == 0 for p in attr(node, "pads", [0, 0, 0, 0]))
            and (len(node.inputs) < 3 or const_value(node.inputs[2]) is not None))


class FoldNormAffine(Pass):
    """See the module docstring; also folds through a token Slice (the class token before the head)."""

    name = "fold_norm_affine"
    summary = "fold LayerNorm gamma/beta into the following 1x1 Convs"
    requires = ("layernorm",)

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        if not ctx.options.fold_norm_affine:
            return
        for node in list(graph.nodes):
            scale = _per_channel(node, "Mul")
            if scale is None:
                continue
            normalized, gamma = scale
            shift = _per_channel(only_consumer(node.outputs[0], graph), "Add")
            if shift is not None and shift[0] is node.outputs[0]:
                beta_node = node.outputs[0].outputs[0]
                beta = shift[1]
                output = beta_node.outputs[0]
            else:
                beta_node, beta, output = None, np.zeros_like(gamma), node.outputs[0]
            consumers = list(output.outputs)
            if output in graph.outputs or not consumers:
                result.skip(node, "the affine output is a graph output", self.log)
                continue
            convs, slices = self._fold_targets(output, consumers, graph)
            if convs is None:
                ops = sorted({c.op for c in consumers})
                result.skip(node, f"the affine output also feeds {ops}, not only 1x1 Convs", self.log)
                continue

            # A Slice over the tokens commutes with a per-channel affine: it reads the normalised
            # tensor instead, and the Convs after it take gamma and beta. This also keeps hb_mapper
            # from merging the Slice into a depthwise Conv with negative padding, which X3 rejects.
            for token_slice in slices:
                token_slice.inputs[0] = normalized
            for conv in convs:
                weight = const_value(conv.inputs[1])
                bias = const_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(weight.shape[0], weight.dtype)
                channels_out = weight.shape[0]
                folded_weight = (weight * gamma.reshape(1, -1, 1, 1)).astype(weight.dtype)
                folded_bias = (bias + weight.reshape(channels_out, -1) @ beta).astype(weight.dtype)
                source = normalized if conv.inputs[0] is output else conv.inputs[0]
                conv.inputs = [source, editor.constant(f"{conv.name}/weight_folded", folded_weight),
                               editor.constant(f"{conv.name}/bias_folded", folded_bias)]
                result.record(node.name, conv.name)
                if beta_node is not None:
                    result.record(beta_node.name, conv.name)
            result.rewritten += 1

    def _fold_targets(self, output: gs.Tensor, consumers: list[gs.Node], graph: gs.Graph):
        """Return (Convs to fold into, Slices to bypass), or (None, None) when some consumer is neither."""
        convs, slices = [], []
        for consumer in consumers:
            if _is_pointwise_conv(consumer, output):
                convs.append(consumer)
                continue
            sliced = consumer.outputs[0] if consumer.outputs else None
            if (not _keeps_channels(consumer) or consumer.inputs[0] is not output or sliced in graph.outputs
                    or not sliced.outputs or not all(_is_pointwise_conv(c, sliced) for c in sliced.outputs)):
                return None, None
            slices.append(consumer)
            convs.extend(sliced.outputs)
        return convs, slices
