"""Lower onnxruntime's contrib ops (domain ``com.microsoft``) to standard ONNX ops.

onnxruntime's transformer optimizer, and the graph onnxruntime saves at
``ORT_ENABLE_EXTENDED``, fuse ViT layers into contrib ops that no other runtime
and no opset-11 toolchain reads. This pass runs first and writes each one as
the standard chain the pattern passes match:

- ``SkipLayerNormalization(x, skip, gamma, beta, bias)``: ``s = x + skip (+ bias)``,
  then the LayerNorm chain on ``s``; the optional 4th output is ``s``;
- ``Gelu`` and ``BiasGelu``: the exact Erf chain (after the bias Add);
- ``FastGelu``: the tanh approximation, which is what it computes;
- ``QuickGelu``: ``x * Sigmoid(alpha * x)``;
- ``FusedMatMul``: ``MatMul`` with Transposes for ``transA``/``transB`` and a Mul for ``alpha``;
- ``Attention`` (packed qkv weights) and ``MultiHeadAttention`` (separate q, k, v):
  per-head Reshape/Transpose, MatMul, Softmax, MatMul, head merge.

It also lowers LayerNormalization and Gelu where onnxruntime wrote them into a
graph whose opset predates them, because ONNX shape inference stops there.

Masks, past state, rotary embeddings and the other options these ops have in
decoder models are rejected with an error that names the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..decompose import emit_attention, emit_gelu, emit_layer_norm
from ..errors import UnsupportedModelError
from ..graph import GraphEditor, attr, const_value, infer_shapes, rank_of
from ..pass_manager import Pass, PassContext, PassResult

CONTRIB_DOMAIN = "com.microsoft"


def _unsupported(node: gs.Node, message: str) -> UnsupportedModelError:
    return UnsupportedModelError(message, node=node.name, op_type=f"{CONTRIB_DOMAIN}.{node.op}",
                                 hint="export the model without onnxruntime's transformer optimizer")


def _optional(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _detach(node: gs.Node) -> list[gs.Variable]:
    outputs = list(node.outputs)
    node.inputs, node.outputs = [], []
    return outputs


def _used(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return bool(tensor.name) and (bool(tensor.outputs) or tensor in graph.outputs)


def _missing_at(op: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return True
    return False


def _layer_normalization(node: gs.Node, editor: GraphEditor, opset: int) -> None:
    x, scale, bias = node.inputs[0], node.inputs[1], _optional(node, 2)
    outputs = _detach(node)
    emit_layer_norm(editor, x, scale, bias, outputs[0], node.name, axis=attr(node, "axis", -1),
                    epsilon=float(attr(node, "epsilon", 1e-5)), stash_type=attr(node, "stash_type", 1), opset=opset)


def _gelu(node: gs.Node, editor: GraphEditor, opset: int) -> None:
    x = node.inputs[0]
    (y,) = _detach(node)
    emit_gelu(editor, x, y, node.name, attr(node, "approximate", "none"))


ABOVE_OPSET = {"LayerNormalization": _layer_normalization, "Gelu": _gelu}


class LowerContribOps(Pass):
    name = "lower_contrib"
    summary = "rewrite onnxruntime com.microsoft ops as standard ONNX ops"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        # Shape inference stops at the first op it does not know, so lower in rounds: each round
        # lowers the ops whose input types are known, and the next inference reaches further.
        while True:
            pending = [n for n in graph.nodes if n.outputs and self._needs_lowering(n, ctx.opset)]
            if not pending:
                return
            infer_shapes(graph)
            ready = [n for n in pending if n.inputs and n.inputs[0].dtype is not None]
            if not ready:
                ready = pending[:1]  # no types anywhere: lower one with fp32 assumed by the emitters
            for node in ready:
                self._lower(node, graph, editor, ctx, result)
            graph.toposort()

    def _needs_lowering(self, node: gs.Node, opset: int) -> bool:
        if node.domain == CONTRIB_DOMAIN:
            return True
        return node.domain in ("", "ai.onnx", None) and node.op in ABOVE_OPSET and _missing_at(node.op, opset)

    def _lower(self, node: gs.Node, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        if node.domain != CONTRIB_DOMAIN:
                # onnxruntime writes LayerNormalization into opset-14 graphs; shape inference
                # cannot see through it there, so it is lowered here with the contrib ops.
            ABOVE_OPSET[node.op](node, editor, ctx.opset)
        else:
            lower = getattr(self, f"_{node.op}", None)
            if lower is None:
                raise _unsupported(node, f"{CONTRIB_DOMAIN}.{node.op} has no standard-op form in vit2bpu")
            lower(node, graph, editor, ctx.opset)
        result.rewritten += 1
        result.record(node.name, node.name)

    def _SkipLayerNormalization(self, node, graph, editor, opset):
        x, skip, gamma = node.inputs[:3]
        beta, bias = _optional(node, 3), _optional(node, 4)
        outputs = _detach(node)
        if any(_used(graph, t) for t in outputs[1:3]):
            raise _unsupported(node, "the mean or inverse standard deviation output is used")
        summed_out = outputs[3] if len(outputs) > 3 and _used(graph, outputs[3]) else None
        shape = x.shape
        if bias is not None:
            summed = editor.out("Add", f"{node.name}/add_skip", [x, skip], dtype=x.dtype, shape=shape)
            editor.node("Add", f"{node.name}/add_bias", [summed, bias],
                        outputs=[summed_out or editor.variable(f"{node.name}/sum", x.dtype, shape)])
        else:
            editor.node("Add", f"{node.name}/add_skip", [x, skip],
                        outputs=[summed_out or editor.variable(f"{node.name}/sum", x.dtype, shape)])
        summed = editor.graph.nodes[-1].outputs[0]
        emit_layer_norm(editor, summed, gamma, beta, outputs[0], node.name,
                        epsilon=float(attr(node, "epsilon", 1e-12)), opset=opset)

    def _Gelu(self, node, graph, editor, opset):
        x = node.inputs[0]
        (y,) = _detach(node)
        emit_gelu(editor, x, y, node.name, "none")

    def _BiasGelu(self, node, graph, editor, opset):
        x, bias = node.inputs[:2]
        (y,) = _detach(node)
        shifted = editor.out("Add", f"{node.name}/add_bias", [x, bias], dtype=x.dtype, shape=x.shape)
        emit_gelu(editor, shifted, y, node.name, "none")

    def _FastGelu(self, node, graph, editor, opset):
        x, bias = node.inputs[0], _optional(node, 1)
        (y,) = _detach(node)
        if bias is not None:
            x = editor.out("Add", f"{node.name}/add_bias", [x, bias], dtype=x.dtype, shape=x.shape)
        emit_gelu(editor, x, y, node.name, "tanh")

    def _QuickGelu(self, node, graph, editor, opset):
        x = node.inputs[0]
        alpha = float(attr(node, "alpha", 1.702))
        (y,) = _detach(node)
        scaled = editor.out("Mul", f"{node.name}/alpha", [x, editor.constant(f"{node.name}/alpha_value",
                                                                              np.array(alpha, np.dtype(x.dtype)))],
                            dtype=x.dtype, shape=x.shape)
        gate = editor.out("Sigmoid", f"{node.name}/sigmoid", [scaled], dtype=x.dtype, shape=x.shape)
        editor.node("Mul", f"{node.name}/gate", [x, gate], outputs=[y])

    def _FusedMatMul(self, node, graph, editor, opset):
        if attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
            raise _unsupported(node, "transBatchA/transBatchB are not supported")
        a, b = node.inputs[:2]
        alpha = float(attr(node, "alpha", 1.0))
        trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
        (y,) = _detach(node)
        operands = []
        for tensor, transposed, role in ((a, trans_a, "a"), (b, trans_b, "b")):
            if transposed:
                rank = rank_of(tensor)
                if rank is None:
                    raise _unsupported(node, f"transposing input {role} needs its rank, which is unknown")
                perm = list(range(rank - 2)) + [rank - 1, rank - 2]
                tensor = editor.out("Transpose", f"{node.name}/transpose_{role}", [tensor], attrs={"perm": perm},
                                    dtype=tensor.dtype, shape=None)
            operands.append(tensor)
        if alpha == 1.0:
            editor.node("MatMul", f"{node.name}/matmul", operands, outputs=[y])
            return
        product = editor.out("MatMul", f"{node.name}/matmul", operands, dtype=y.dtype, shape=y.shape)
        editor.node("Mul", f"{node.name}/alpha", [product, editor.constant(f"{node.name}/alpha_value",
                                                                          np.array(alpha, np.dtype(y.dtype or np.float32)))],
                    outputs=[y])

    def _Attention(self, node, graph, editor, opset):
        if any(_optional(node, i) is not None for i in range(3, len(node.inputs))):
            raise _unsupported(node, "mask, past state or attention bias inputs are not supported")
        if attr(node, "unidirectional", 0) or attr(node, "do_rotary", 0):
            raise _unsupported(node, "unidirectional or rotary attention is not a ViT pattern")
        x, weights, bias = node.inputs[0], node.inputs[1], _optional(node, 2)
        weight_value = const_value(weights)
        if weight_value is None:
            raise _unsupported(node, "the packed qkv weights are not constant")
        heads = int(attr(node, "num_heads"))
        sizes = attr(node, "qkv_hidden_sizes") or [weight_value.shape[1] // 3] * 3
        scale = attr(node, "scale") or 1.0 / np.sqrt(sizes[0] // heads)
        bias_value = const_value(bias) if bias is not None else None
        outputs = _detach(node)
        if any(_used(graph, t) for t in outputs[1:]):
            raise _unsupported(node, "the present state output is used")
        projected = []
        start = 0
        for role, size in zip(("q", "k", "v"), sizes):
            w = editor.constant(f"{node.name}/{role}_weight", weight_value[:, start:start + size])
            t = editor.out("MatMul", f"{node.name}/{role}_matmul", [x, w], dtype=x.dtype, shape=None)
            if bias_value is not None:
                b = editor.constant(f"{node.name}/{role}_bias", bias_value[start:start + size])
                t = editor.out("Add", f"{node.name}/{role}_add", [b, t], dtype=x.dtype, shape=None)
            projected.append(t)
            start += size
        self._heads_attention(editor, node.name, projected, heads, outputs[0], float(scale))

    def _MultiHeadAttention(self, node, graph, editor, opset):
        if any(_optional(node, i) is not None for i in range(4, len(node.inputs))):
            raise _unsupported(node, "padding masks, attention bias or past state are not supported")
        if attr(node, "unidirectional", 0):
            raise _unsupported(node, "unidirectional attention is not a ViT pattern")
        query, key, value = node.inputs[0], _optional(node, 1), _optional(node, 2)
        if key is None or value is None or rank_of(query) != 3:
            raise _unsupported(node, "only separate 3-D query, key and value inputs are supported")
        bias = _optional(node, 3)
        heads = int(attr(node, "num_heads"))
        scale = attr(node, "scale")
        hidden = query.shape[-1]
        if scale is None:
            if not isinstance(hidden, int):
                raise _unsupported(node, "the hidden size is unknown, so the default scale cannot be computed")
            scale = 1.0 / np.sqrt(hidden // heads)
        outputs = _detach(node)
        if any(_used(graph, t) for t in outputs[1:]):
            raise _unsupported(node, "the present state output is used")
        projected = [query, key, value]
        if bias is not None:
            bias_value = const_value(bias)
            if bias_value is None:
                raise _unsupported(node, "the bias is not constant")
            parts = np.split(bias_value, 3)
            projected = [editor.out("Add", f"{node.name}/{role}_bias", [t, editor.constant(f"{node.name}/{role}_b", p)],
                                    dtype=t.dtype, shape=t.shape)
                         for t, p, role in zip(projected, parts, "qkv")]
        self._heads_attention(editor, node.name, projected, heads, outputs[0], float(scale))

    def _heads_attention(self, editor: GraphEditor, base: str, projected, heads: int, y, scale):
        """[B, S, H*D] q, k, v -> split heads -> attention -> merge heads into ``y``."""
        dtype = projected[0].dtype

        def split(tensor, role, perm):
            four = editor.out("Reshape", f"{base}/{role}_heads",
                              [tensor, editor.constant(f"{base}/{role}_shape", np.array([0, 0, heads, -1], np.int64))],
                              dtype=dtype, shape=None)
            return editor.out("Transpose", f"{base}/{role}_transpose", [four], attrs={"perm": perm}, dtype=dtype,
                              shape=None)

        q, k, v = (split(t, role, [0, 2, 1, 3]) for t, role in zip(projected, "qkv"))
        context = editor.variable(f"{base}/context", dtype, None)
        emit_attention(editor, q, k, v, context, base, scale=scale)
        moved = editor.out("Transpose", f"{base}/merge_transpose", [context], attrs={"perm": [0, 2, 1, 3]},
                           dtype=dtype, shape=None)
        editor.node("Reshape", f"{base}/merge_heads",
                    [moved, editor.constant(f"{base}/merge_shape", np.array([0, 0, -1], np.int64))], outputs=[y])
