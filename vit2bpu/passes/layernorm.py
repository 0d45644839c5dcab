"""Rewrite LayerNorm over the last axis into a LayerNorm over the channel axis of NCHW.

Matched forms, on a token stream ``[B, N, C]`` or a vector ``[B, C]``:

- the decomposed chain ``m = ReduceMean(x)``, ``d = Sub(x, m)``, ``p = Pow(d, 2)`` or
  ``Mul(d, d)``, ``v = ReduceMean(p)``, ``Add(v, eps)``, ``s = Sqrt(.)``, then
  ``Div(d, s)`` or ``Mul(d, Reciprocal(s))``, then optional ``Mul(., gamma)`` and
  ``Add(., beta)`` with the constants in either operand order;
- the ``LayerNormalization`` op (opset 17) over the last axis, whose ``axis`` and
  ``epsilon`` default to -1 and 1e-5 when absent.

Emitted on ``x4 = [B, C, 1, N]``, with the statistics chosen by the target:

- ``conv``: mean and variance are 1x1 convolutions C -> 1 with weights 1/C; epsilon
  is the variance convolution's bias;
- ``reducemean``: ``ReduceMean(axes=[1])`` for both, then ``Add(eps)``;
- ``center``: ``x - mean`` as one C -> C 1x1 Conv with weights ``I - 1/C`` (no Sub),
  the variance as in ``conv``.

then ``Sub`` (except ``center``), ``Mul(d, d)`` (never Pow: the toolchain turns Pow into a lookup
table), ``Sqrt``, ``Div`` and the per-channel gamma and beta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, attr, const_value, only_consumer, rank_of, replace_tensor, split_const_operand
from ..layout import from_channels_first, kind_for_rank, to_channels_first
from ..pass_manager import Pass, PassContext, PassResult


@dataclass
class LayerNormMatch:
    x: gs.Tensor
    epsilon: float
    gamma: np.ndarray | None
    beta: np.ndarray | None
    output: gs.Variable
    nodes: list[gs.Node]


def _reduce_last_axis(node: gs.Node | None, rank: int) -> bool:
    if node is None or node.op != "ReduceMean" or not attr(node, "keepdims", 1):
        return False
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        value = const_value(node.inputs[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return axes is not None and [a % rank for a in axes] == [rank - 1]


def _unique_consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Consumers of ``tensor``, each once (gs lists Mul(d, d) twice)."""
    return list({id(n): n for n in tensor.outputs}.values())


def _consumer_ops(tensor: gs.Tensor) -> list[str]:
    return sorted(n.op for n in tensor.outputs)


def match_decomposed(mean: gs.Node, graph: gs.Graph) -> tuple[LayerNormMatch | None, str]:
    """Match the chain that starts at ReduceMean ``mean``; return (match, reason when None)."""
    x = mean.inputs[0]
    rank = rank_of(x)
    if rank is None or not _reduce_last_axis(mean, rank):
        return None, "not a ReduceMean over the last axis with keepdims"

    sub = only_consumer(mean.outputs[0], graph)
    if sub is None or sub.op != "Sub" or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return None, "the mean does not feed Sub(x, mean)"
    centred = sub.outputs[0]
    users = _unique_consumers(centred)
    if centred in graph.outputs or len(users) != 2:
        return None, f"x - mean has consumers {_consumer_ops(centred)}, expected a square and a division"

    square = next((n for n in users if n.op in ("Pow", "Mul") and n.inputs[0] is centred), None)
    if square is None:
        return None, "no Pow(d, 2) or Mul(d, d)"
    if square.op == "Pow":
        exponent = const_value(square.inputs[1])
        if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
            return None, "Pow exponent is not the constant 2"
    elif square.inputs[1] is not centred:
        return None, "Mul is not Mul(d, d)"
    divide = next(n for n in users if n is not square)

    var = only_consumer(square.outputs[0], graph)
    if not _reduce_last_axis(var, rank) or var.inputs[0] is not square.outputs[0]:
        return None, "the square does not feed a ReduceMean over the last axis"
    add_eps = only_consumer(var.outputs[0], graph)
    split = split_const_operand(add_eps) if add_eps is not None and add_eps.op == "Add" else None
    if split is None or split[1].size != 1:
        return None, "the variance does not feed Add(var, epsilon)"
    epsilon = float(split[1].reshape(-1)[0])
    sqrt = only_consumer(add_eps.outputs[0], graph)
    if sqrt is None or sqrt.op != "Sqrt":
        return None, "var + epsilon does not feed Sqrt"
    nodes = [mean, sub, square, var, add_eps, sqrt]

    if divide.op == "Div" and divide.inputs[0] is centred and divide.inputs[1] is sqrt.outputs[0]:
        if only_consumer(sqrt.outputs[0], graph) is not divide:
            return None, "the standard deviation has other consumers"
        normalized = divide
    elif divide.op == "Mul":
        reciprocal = only_consumer(sqrt.outputs[0], graph)
        if reciprocal is None or reciprocal.op != "Reciprocal" or reciprocal.outputs[0] not in divide.inputs:
            return None, "neither Div(d, std) nor Mul(d, Reciprocal(std))"
        nodes.append(reciprocal)
        normalized = divide
    else:
        return None, f"x - mean feeds {divide.op}, expected Div or Mul"
    nodes.append(normalized)

    gamma, beta, output = _match_affine(normalized.outputs[0], graph, nodes, x.shape[-1])
    return LayerNormMatch(x, epsilon, gamma, beta, output, nodes), ""


def _match_affine(tensor: gs.Variable, graph: gs.Graph, nodes: list[gs.Node], channels):
    """Match the optional ``Mul(., gamma)`` and ``Add(., beta)`` after the normalisation."""
    gamma = beta = None
    output = tensor
    follower = only_consumer(output, graph)
    split = split_const_operand(follower) if follower is not None and follower.op == "Mul" else None
    if split is not None and _per_channel(split[1], channels):
        gamma = split[1].reshape(-1)
        nodes.append(follower)
        output = follower.outputs[0]
        follower = only_consumer(output, graph)
    split = split_const_operand(follower) if follower is not None and follower.op == "Add" else None
    if split is not None and _per_channel(split[1], channels):
        beta = split[1].reshape(-1)
        nodes.append(follower)
        output = follower.outputs[0]
    return gamma, beta, output


def _per_channel(value: np.ndarray, channels) -> bool:
    """True for a constant of shape [C], [1, C] or [1, 1, C] (a scalar also broadcasts per channel)."""
    if value.size == 1:
        return True
    return value.shape[-1] == channels and value.size == channels


def match_layer_normalization(node: gs.Node, graph: gs.Graph) -> tuple[LayerNormMatch | None, str]:
    x = node.inputs[0]
    rank = rank_of(x)
    if rank is None or attr(node, "axis", -1) % rank != rank - 1:
        return None, "normalises more than the last axis"
    if any(out.outputs or out in graph.outputs for out in node.outputs[1:]):
        return None, "its Mean or InvStdDev output is used"
    gamma = const_value(node.inputs[1])
    beta = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if gamma is None or (len(node.inputs) > 2 and node.inputs[2].name and beta is None):
        return None, "scale or bias is not constant"
    epsilon = float(attr(node, "epsilon", 1e-5))
    return LayerNormMatch(x, epsilon, gamma.reshape(-1), None if beta is None else beta.reshape(-1),
                          node.outputs[0], [node]), ""


class LayerNormToChannels(Pass):
    name = "layernorm"
    summary = "LayerNorm over the last axis -> LayerNorm over the NCHW channel axis"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        form = ctx.options.layernorm_form()
        matched: set[int] = set()
        for node in list(graph.nodes):
            if id(node) in matched:
                continue
            if node.op == "ReduceMean":
                match, reason = match_decomposed(node, graph)
            elif node.op == "LayerNormalization":
                match, reason = match_layer_normalization(node, graph)
            else:
                continue
            if match is None:
                result.skip(node, reason, self.log)
                continue
            if kind_for_rank(rank_of(match.x)) is None:
                result.skip(node, f"input rank {rank_of(match.x)}; only [B, N, C] and [B, C] are converted", self.log)
                continue
            if not isinstance(match.x.shape[-1], int):
                result.skip(node, "the channel count is not static", self.log)
                continue
            new_names = self._rewrite(editor, graph, match, form)
            matched.update(id(n) for n in match.nodes)
            result.rewritten += 1
            for old in match.nodes:
                result.record(old.name, *new_names)

    def _rewrite(self, editor: GraphEditor, graph: gs.Graph, match: LayerNormMatch, form: str) -> list[str]:
        x = match.x
        base = match.nodes[0].name
        dtype = np.dtype(x.dtype)
        channels = int(x.shape[-1])
        kind = kind_for_rank(len(x.shape))

        # 1. Channels-first input: [B, C, 1, N] (tokens) or [B, C, 1, 1] (vector).
        x4 = to_channels_first(editor, x, base)
        shape4 = list(x4.shape)
        stat_shape = [shape4[0], 1, shape4[2], shape4[3]]
        epsilon = np.array(match.epsilon, dtype=dtype)
        first = len(editor.graph.nodes)

        # 2. Mean and variance over the channel axis.
        average = np.full((1, channels, 1, 1), 1.0 / channels, dtype=dtype)
        if form == "center":
            # x - mean(x) is linear in x: one C -> C 1x1 Conv with weights I - 1/C does it without
            # the Sub and the broadcast over channels, which X3's BPU cannot run.
            centring = (np.eye(channels, dtype=np.float64) - 1.0 / channels).astype(dtype)[:, :, None, None]
            centred = editor.out("Conv", f"{base}/center", [x4, editor.constant(f"{base}/center_weight", centring)],
                                 attrs={"kernel_shape": [1, 1]}, dtype=dtype, shape=shape4)
        else:
            if form == "conv":
                # A 1x1 Conv C -> 1 with weights 1/C is the mean over C, and runs on the BPU of every chip.
                mean = editor.out("Conv", f"{base}/mean", [x4, editor.constant(f"{base}/mean_weight", average)],
                                  attrs={"kernel_shape": [1, 1]}, dtype=dtype, shape=stat_shape)
            else:
                mean = editor.out("ReduceMean", f"{base}/mean", [x4], attrs={"axes": [1], "keepdims": 1},
                                  dtype=dtype, shape=stat_shape)
            centred = editor.out("Sub", f"{base}/sub", [x4, mean], dtype=dtype, shape=shape4)
        square = editor.out("Mul", f"{base}/square", [centred, centred], dtype=dtype, shape=shape4)
        if form in ("conv", "center"):
            # Epsilon is the variance convolution's bias, which saves the Add.
            var_eps = editor.out("Conv", f"{base}/var",
                                 [square, editor.constant(f"{base}/var_weight", average),
                                  editor.constant(f"{base}/epsilon", epsilon.reshape(1))],
                                 attrs={"kernel_shape": [1, 1]}, dtype=dtype, shape=stat_shape)
        else:
            var = editor.out("ReduceMean", f"{base}/var", [square], attrs={"axes": [1], "keepdims": 1},
                             dtype=dtype, shape=stat_shape)
            var_eps = editor.out("Add", f"{base}/add_eps", [var, editor.constant(f"{base}/epsilon", epsilon)],
                                 dtype=dtype, shape=stat_shape)
        std = editor.out("Sqrt", f"{base}/std", [var_eps], dtype=dtype, shape=stat_shape)
        y4 = editor.out("Div", f"{base}/normalize", [centred, std], dtype=dtype, shape=shape4)

        # 3. Per-channel affine; fold_norm_affine later moves it into a following 1x1 Conv where that is exact.
        if match.gamma is not None:
            gamma = np.broadcast_to(match.gamma.astype(dtype), (channels,)).reshape(1, channels, 1, 1)
            y4 = editor.out("Mul", f"{base}/gamma", [y4, editor.constant(f"{base}/gamma_value", gamma)],
                            dtype=dtype, shape=shape4)
        if match.beta is not None:
            beta = np.broadcast_to(match.beta.astype(dtype), (channels,)).reshape(1, channels, 1, 1)
            y4 = editor.out("Add", f"{base}/beta", [y4, editor.constant(f"{base}/beta_value", beta)],
                            dtype=dtype, shape=shape4)

        # 4. Back to the original layout for the consumers.
        new_names = [n.name for n in editor.graph.nodes[first:]]
        y = from_channels_first(editor, y4, kind, base)
        replace_tensor(graph, match.output, y)
        return new_names
