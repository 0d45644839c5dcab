"""Keep multi-head attention 4-D, with the heads on the channel axis.

Exporters split heads in many ways: timm reshapes the fused qkv output to 5-D
``[B, N, 3, H, D]``, transposes and splits it; Hugging Face reshapes q, k and v
separately; the dynamo exporter slices; scales sit on q, on k, on both (the
square root of the scale, for SDPA) or on the scores. Instead of one matcher per
variant, this pass anchors on what they share and measures the rest:

1. Find ``Softmax`` over the last axis. Walk up from it, through elementwise ops
   with a constant operand (scale, mask, position bias) and Casts, to the scores
   ``MatMul(A, Bt)``; walk down, through Cast and the ``IsNaN``/``Where`` guard, to
   ``MatMul(P, V)``. A, Bt and V must be 4-D: ``[B, H, N, D]``, ``[B, H, D, N]``,
   ``[B, H, N, D]``.
2. Walk up from A, Bt and V through layout ops (Reshape, Transpose, Split,
   Slice, Gather, Squeeze, Unsqueeze, Identity) and scalar Mul/Div to the 1x1
   Conv outputs the linear pass made.
3. Probe that region with onnxruntime: feed channel and token indices through
   it and read back, for every element of A, Bt and V, which channel of which
   Conv it copies and by what scale. Accept only a pure gather with one scale,
   and confirm it on a random input. This holds for any exporter's sequence of
   layout ops, because they are all linear index maps.
4. Emit one 1x1 Conv each for q, k and v, with the weight rows picked by the
   measured channel map and the scale folded in, and
   ``q: [B, C, 1, N] -> Reshape [B, H, D, N] -> Transpose -> [B, H, N, D]``,
   ``k: Reshape [B, H, D, N]``, ``v: Reshape [B, H, D, N] -> Transpose [B, H, N, D]``.
   The scores and everything between them and ``MatMul(P, V)`` stay as exported.
5. Walk down from ``MatMul(P, V)`` through layout ops to the ``[B, N, C]`` tensor
   that feeds the projection; check by probing that it is the standard head
   merge, and replace it with ``Transpose -> [B, H, D, N] -> Reshape [B, C, 1, N]``.

No rank-5 tensor remains; the dead 5-D nodes are removed by cleanup.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, attr, const_value, producer_of, rank_of, replace_tensor, static_shape
from ..layout import TOKENS, channels_first_source, from_adapter_of, from_channels_first
from ..pass_manager import Pass, PassContext, PassResult

LAYOUT_OPS = {"Reshape", "Transpose", "Split", "Slice", "Gather", "Squeeze", "Unsqueeze", "Identity", "Flatten"}
SCALE_OPS = {"Mul", "Div"}
SCORE_CHAIN_OPS = {"Mul", "Div", "Add", "Sub", "Cast", "Where"}
PROBS_CHAIN_OPS = {"Cast", "Where", "IsNaN", "Identity"}


class AttentionRejected(Exception):
    """A candidate attention block that does not fit the 4-D rewrite; the message gives the reason."""


@dataclass
class HeadSource:
    """Source of one of q, k, v: the Conv it is read from, its channel map [H, D] and its scale."""

    conv: gs.Node
    channels: np.ndarray
    scale: float


def _is_scalar_const(tensor: gs.Tensor) -> bool:
    value = const_value(tensor)
    return value is not None and value.size == 1


def _walk_up_to_scores(softmax: gs.Node) -> gs.Node:
    tensor = softmax.inputs[0]
    for _ in range(8):
        node = producer_of(tensor)
        if node is None:
            raise AttentionRejected("the Softmax input has no producer")
        if node.op == "MatMul":
            return node
        if node.op not in SCORE_CHAIN_OPS:
            raise AttentionRejected(f"'{node.name}' ({node.op}) between the scores and Softmax is not elementwise")
        activations = [t for t in node.inputs if const_value(t) is None]
        if len(activations) != 1:
            raise AttentionRejected(f"'{node.name}' ({node.op}) mixes the scores with another activation")
        tensor = activations[0]
    raise AttentionRejected("no MatMul within 8 ops above Softmax")


def _walk_down_to_context(softmax: gs.Node) -> gs.Node:
    frontier = [softmax.outputs[0]]
    seen = set()
    found = []
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "MatMul":
                if node.inputs[0] is not tensor:
                    raise AttentionRejected("the probabilities are the second operand of a MatMul")
                found.append(node)
            elif node.op in PROBS_CHAIN_OPS:
                frontier.extend(node.outputs)
            else:
                raise AttentionRejected(f"the probabilities feed '{node.name}' ({node.op})")
    if len(found) != 1:
        raise AttentionRejected(f"the probabilities reach {len(found)} MatMul nodes, expected 1")
    return found[0]


def _region_above(target: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor]:
    """Return the layout/scale nodes between ``target`` and the one Conv-backed [B, N, C] tensor above it."""
    nodes, sources = [], []
    frontier = [target]
    seen = set()
    while frontier:
        tensor = frontier.pop()
        adapter = from_adapter_of(tensor)
        if adapter is not None:
            if adapter.attrs["kind"] != TOKENS:
                raise AttentionRejected(f"'{tensor.name}' is not a token stream")
            if tensor not in sources:
                sources.append(tensor)
            continue
        node = producer_of(tensor)
        if node is None:
            raise AttentionRejected(f"'{tensor.name}' is a graph input, not the output of a converted Linear")
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op in LAYOUT_OPS:
            frontier.append(node.inputs[0])
            for extra in node.inputs[1:]:
                if extra.name and const_value(extra) is None:
                    raise AttentionRejected(f"'{node.name}' ({node.op}) has a non-constant parameter input")
        elif node.op in SCALE_OPS and _is_scalar_const(node.inputs[1]):
            frontier.append(node.inputs[0])
        elif node.op == "Mul" and _is_scalar_const(node.inputs[0]):
            frontier.append(node.inputs[1])
        else:
            raise AttentionRejected(f"'{node.name}' ({node.op}) is not a layout op or a scalar scale")
        nodes.append(node)
    if len(sources) != 1:
        raise AttentionRejected(f"'{target.name}' comes from {len(sources)} Linear outputs, expected 1")
    return nodes, sources[0]


def _probe_model(nodes: list[gs.Node], inputs: list[gs.Tensor], outputs: list[gs.Tensor]) -> onnx.ModelProto:
    """Build a standalone opset-11 model from ``nodes``, with constants inlined as initializers."""
    initializers, node_protos, seen = [], [], set()
    for node in nodes:
        for tensor in node.inputs:
            value = const_value(tensor)
            if value is not None and tensor.name and tensor.name not in seen:
                seen.add(tensor.name)
                value = np.asarray(value)
                if np.issubdtype(value.dtype, np.floating):
                    # The probe runs in fp32: fp16 cannot hold channel indices above 2048 exactly.
                    value = value.astype(np.float32)
                initializers.append(onnx.numpy_helper.from_array(value, tensor.name))
        node_protos.append(onnx.helper.make_node(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs],
                                                 name=node.name, **node.attrs))

    def info(tensor):
        return onnx.helper.make_tensor_value_info(tensor.name, onnx.TensorProto.FLOAT, static_shape(tensor))

    graph = onnx.helper.make_graph(node_protos, "probe", [info(t) for t in inputs], [info(t) for t in outputs],
                                   initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)])
    model.ir_version = 7
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def measure_gather(nodes: list[gs.Node], source: gs.Tensor, targets: list[gs.Tensor], token_axes: list[int],
                   channel_axes: list[list[int]]) -> list[tuple[np.ndarray, float]]:
    """Measure how each target reads ``source`` ([B, N, C]) through ``nodes``.

    For each target returns (channel index per position of ``channel_axes``, scale).
    Raises AttentionRejected unless every element is ``scale * source[b, n, c]`` with
    ``n`` the element's index on ``token_axes`` and ``c`` independent of the token.
    """
    shape = static_shape(source)
    if shape is None:
        raise AttentionRejected(f"'{source.name}' has no static shape")
    batch, tokens, channels = shape
    model = _probe_model(nodes, [source], targets)
    channel_code = np.broadcast_to(np.arange(1, channels + 1, dtype=np.float32), shape).copy()
    token_code = np.broadcast_to(np.arange(1, tokens + 1, dtype=np.float32)[None, :, None], shape).copy()
    ones = np.ones(shape, np.float32)
    random = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    by_channel = _run(model, {source.name: channel_code})
    by_token = _run(model, {source.name: token_code})
    scales = _run(model, {source.name: ones})
    on_random = _run(model, {source.name: random})

    measured = []
    for target, c_out, t_out, s_out, r_out, token_axis, chan_axes in zip(
            targets, by_channel, by_token, scales, on_random, token_axes, channel_axes):
        scale = float(s_out.reshape(-1)[0])
        if scale == 0.0 or not np.allclose(s_out, scale, rtol=1e-6, atol=0):
            raise AttentionRejected(f"'{target.name}' is not one scale times its source")
        channel_index = np.rint(c_out / scale).astype(np.int64) - 1
        token_index = np.rint(t_out / scale).astype(np.int64) - 1
        expected_tokens = np.arange(t_out.shape[token_axis]).reshape(
            [-1 if axis == token_axis else 1 for axis in range(t_out.ndim)])
        if t_out.shape[token_axis] != tokens or not np.array_equal(token_index, np.broadcast_to(expected_tokens, token_index.shape)):
            raise AttentionRejected(f"'{target.name}' reorders the tokens")
        first = np.take(channel_index, 0, axis=token_axis)
        if not np.array_equal(channel_index, np.expand_dims(first, token_axis).repeat(tokens, axis=token_axis)):
            raise AttentionRejected(f"'{target.name}' picks channels that depend on the token")
        if first.shape[0] != batch:
            raise AttentionRejected(f"'{target.name}' has batch {first.shape[0]}, source has {batch}")
        channel_map = first[0]  # drop the batch axis: the remaining axes are chan_axes in order
        # Confirm on a random input: the prediction must match onnxruntime.
        gathered = random[:, :, channel_map.reshape(-1)].reshape((batch, tokens) + channel_map.shape)
        predicted = np.moveaxis(gathered, 1, token_axis) * scale
        if predicted.shape != r_out.shape or not np.allclose(predicted, r_out, rtol=1e-5, atol=1e-6):
            raise AttentionRejected(f"'{target.name}' is not a gather of its source")
        measured.append((channel_map, scale))
    return measured


def _bypass(node: gs.Node, graph: gs.Graph, keep: gs.Tensor) -> None:
    replace_tensor(graph, node.outputs[0], keep)
    node.outputs.clear()


def _fold_score_scales(scores: gs.Node, softmax: gs.Node, graph: gs.Graph) -> float:
    """Remove the scalar Mul/Div nodes between the scores MatMul and Softmax; return their combined factor."""
    factor = 1.0
    tensor = softmax.inputs[0]
    chain = []
    while tensor is not scores.outputs[0]:
        node = producer_of(tensor)
        chain.append(node)
        tensor = next(t for t in node.inputs if const_value(t) is None)
    for node in chain:
        if node.op not in ("Mul", "Div") or len(node.outputs[0].outputs) != 1 or node.outputs[0] in graph.outputs:
            continue
        if node.op == "Div" and not _is_scalar_const(node.inputs[1]):
            continue
        constant = next((const_value(t) for t in node.inputs if const_value(t) is not None), None)
        if constant is None or constant.size != 1 or float(constant.reshape(-1)[0]) == 0.0:
            continue
        value = float(constant.reshape(-1)[0])
        factor = factor / value if node.op == "Div" else factor * value
        _bypass(node, graph, next(t for t in node.inputs if const_value(t) is None))
    return factor


def _drop_probability_guards(softmax: gs.Node, context: gs.Node, scores: gs.Node, graph: gs.Graph) -> None:
    """Remove float-to-float Casts and ``Where(IsNaN(p), 0, p)`` between Softmax and the context MatMul.

    Softmax of finite scores never yields NaN, so the guard is an identity unless a constant
    on the scores holds -inf (a fully masked row); then it stays.
    """
    tensor = softmax.inputs[0]
    while tensor is not scores.outputs[0]:
        node = producer_of(tensor)
        for t in node.inputs:
            value = const_value(t)
            if value is not None and np.issubdtype(value.dtype, np.floating) and np.isinf(value).any():
                return
        tensor = next(t for t in node.inputs if const_value(t) is None)
    probabilities = softmax.outputs[0]
    changed = True
    while changed:
        changed = False
        for node in list(probabilities.outputs):
            if node is context or not node.outputs:
                continue
            if node.op == "Cast" and node.outputs[0].dtype == probabilities.dtype:
                _bypass(node, graph, probabilities)
                changed = True
            elif node.op == "IsNaN":
                flags = node.outputs[0]
                guards = [w for w in flags.outputs if w.op == "Where" and w.inputs[0] is flags
                          and w.inputs[2] is probabilities and _is_scalar_const(w.inputs[1])]
                if guards and len(guards) == len(flags.outputs):
                    for guard in guards:
                        _bypass(guard, graph, probabilities)
                    node.outputs.clear()
                    changed = True


class AttentionToChannels(Pass):
    name = "attention"
    summary = "multi-head attention with heads on the channel axis: separate q/k/v 1x1 Convs, no rank-5 tensor"
    requires = ("linear",)

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            try:
                names = self._convert(softmax, graph, editor)
            except AttentionRejected as reason:
                result.skip(softmax, str(reason), self.log)
                continue
            result.rewritten += 1
            result.record(softmax.name, *names)

    def _convert(self, softmax: gs.Node, graph: gs.Graph, editor: GraphEditor) -> list[str]:
        # 1. The attention core: scores MatMul, Softmax, context MatMul.
        rank = rank_of(softmax.inputs[0])
        if rank != 4 or attr(softmax, "axis", 1) % 4 != 3:
            raise AttentionRejected(f"Softmax is not over the last axis of a 4-D tensor (rank {rank}, "
                                    f"axis {attr(softmax, 'axis', 1)})")
        scores = _walk_up_to_scores(softmax)
        context = _walk_down_to_context(softmax)
        a, bt = scores.inputs
        v = context.inputs[1]
        shapes = [static_shape(t) for t in (a, bt, v, context.outputs[0])]
        if any(s is None or len(s) != 4 for s in shapes):
            raise AttentionRejected("q, k^T, v or the context is not a static 4-D tensor")
        batch, heads, tokens, head_dim = shapes[0]
        if shapes[1] != [batch, heads, head_dim, tokens] or shapes[2] != [batch, heads, tokens, head_dim]:
            raise AttentionRejected(f"unexpected shapes q {shapes[0]}, k^T {shapes[1]}, v {shapes[2]}")

        # 2-3. Measure how q, k^T and v are read out of the Linear outputs.
        #      Targets read from the same Linear output (timm's fused qkv) share one probe model.
        order = {id(node): index for index, node in enumerate(graph.nodes)}
        groups: dict[int, dict] = {}
        for role, (target, token_axis, chan_axes) in enumerate(((a, 2, [1, 3]), (bt, 3, [1, 2]), (v, 2, [1, 3]))):
            nodes, source = _region_above(target)
            group = groups.setdefault(id(source), {"source": source, "nodes": {}, "members": []})
            group["nodes"].update((id(node), node) for node in nodes)
            group["members"].append((role, target, token_axis, chan_axes))
        measured = {}
        for group in groups.values():
            nodes = sorted(group["nodes"].values(), key=lambda node: order[id(node)])
            members = group["members"]
            results = measure_gather(nodes, group["source"], [m[1] for m in members], [m[2] for m in members],
                                     [m[3] for m in members])
            for (role, *_), result in zip(members, results):
                measured[role] = (group["source"], result)
        sources = []
        for role in range(3):
            source, (channel_map, scale) = measured[role]
            conv = producer_of(channels_first_source(source))
            if conv is None or conv.op != "Conv" or const_value(conv.inputs[1]) is None:
                raise AttentionRejected(f"'{source.name}' does not come from a 1x1 Conv with constant weights")
            sources.append(HeadSource(conv, channel_map, scale))
        merge_nodes, merged = self._region_below(context, graph)
        self._check_merge(merge_nodes, context.outputs[0], merged, heads, head_dim)

        # 3b. A scalar scale on the scores (Hugging Face's eager attention) moves into the q weights,
        #     and no-op Casts and the IsNaN guard after Softmax go: each would run on the CPU.
        sources[0].scale *= _fold_score_scales(scores, softmax, graph)
        _drop_probability_guards(softmax, context, scores, graph)

        # 4. Separate q, k, v convolutions with the heads on the channel axis.
        channels = heads * head_dim
        base = scores.name.rsplit("/", 1)[0] if "/" in scores.name else scores.name
        dtype = a.dtype
        first = len(graph.nodes)
        q4, k4, v4 = [self._head_conv(editor, source, f"{base}/{role}", batch, heads, head_dim, tokens, dtype)
                      for source, role in zip(sources, ("q", "k", "v"))]
        q = editor.out("Transpose", f"{base}/q_tokens_first", [q4], attrs={"perm": [0, 1, 3, 2]}, dtype=dtype,
                       shape=[batch, heads, tokens, head_dim])
        v_t = editor.out("Transpose", f"{base}/v_tokens_first", [v4], attrs={"perm": [0, 1, 3, 2]}, dtype=dtype,
                         shape=[batch, heads, tokens, head_dim])
        scores.inputs = [q, k4]
        context.inputs = [context.inputs[0], v_t]

        # 5. Merge the heads back onto the channel axis: [B, H, N, D] -> [B, H, D, N] -> [B, C, 1, N].
        ctx_t = editor.out("Transpose", f"{base}/context_channels_first", [context.outputs[0]],
                           attrs={"perm": [0, 1, 3, 2]}, dtype=dtype, shape=[batch, heads, head_dim, tokens])
        merged4 = editor.out("Reshape", f"{base}/merge_heads",
                             [ctx_t, editor.constant(f"{base}/merge_shape", np.array([batch, channels, 1, tokens], np.int64))],
                             dtype=dtype, shape=[batch, channels, 1, tokens])
        names = [n.name for n in graph.nodes[first:]]
        replace_tensor(graph, merged, from_channels_first(editor, merged4, TOKENS, base))
        return names

    def _head_conv(self, editor: GraphEditor, source: HeadSource, base: str, batch: int, heads: int, head_dim: int,
                   tokens: int, dtype) -> gs.Variable:
        """Emit one 1x1 Conv for q, k or v, reshaped to [B, H, D, N]."""
        conv = source.conv
        weight = const_value(conv.inputs[1])
        bias = const_value(conv.inputs[2]) if len(conv.inputs) > 2 else None
        rows = source.channels.reshape(-1)  # ordered (head, dim): the channel axis of the new conv
        new_weight = (weight[rows] * np.asarray(source.scale, weight.dtype)).astype(weight.dtype)
        inputs = [conv.inputs[0], editor.constant(f"{base}/weight", new_weight)]
        if bias is not None:
            inputs.append(editor.constant(f"{base}/bias", (bias[rows] * np.asarray(source.scale, bias.dtype)).astype(bias.dtype)))
        channels = heads * head_dim
        y = editor.out("Conv", f"{base}/conv", inputs, attrs=dict(conv.attrs), dtype=dtype,
                       shape=[batch, channels, 1, tokens])
        return editor.out("Reshape", f"{base}/split_heads",
                          [y, editor.constant(f"{base}/heads_shape", np.array([batch, heads, head_dim, tokens], np.int64))],
                          dtype=dtype, shape=[batch, heads, head_dim, tokens])

    def _region_below(self, context: gs.Node, graph: gs.Graph) -> tuple[list[gs.Node], gs.Tensor]:
        nodes = []
        tensor = context.outputs[0]
        while True:
            if tensor in graph.outputs or len(tensor.outputs) != 1:
                raise AttentionRejected(f"'{tensor.name}' has {len(tensor.outputs)} consumers before the heads are merged")
            node = tensor.outputs[0]
            if node.op not in LAYOUT_OPS or node.inputs[0] is not tensor:
                raise AttentionRejected(f"the context reaches '{node.name}' ({node.op}) before the heads are merged")
            nodes.append(node)
            tensor = node.outputs[0]
            shape = static_shape(tensor)
            if shape is not None and len(shape) == 3 and len(tensor.outputs) >= 1:
                return nodes, tensor

    def _check_merge(self, nodes, context_out: gs.Tensor, merged: gs.Tensor, heads: int, head_dim: int) -> None:
        """Confirm by probing that ``merged[b, n, h*D + d] == context[b, h, n, d]``."""
        shape = static_shape(context_out)
        model = _probe_model(nodes, [context_out], [merged])
        sample = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        (out,) = _run(model, {context_out.name: sample})
        expected = sample.transpose(0, 2, 1, 3).reshape(shape[0], shape[2], heads * head_dim)
        if out.shape != expected.shape or not np.array_equal(out, expected):
            raise AttentionRejected(f"'{merged.name}' is not the standard head merge of the context")
