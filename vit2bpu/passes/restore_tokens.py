"""Undo the 2-D flattening that onnxsim and onnxruntime's optimizer apply around Linear layers.

Both post-processors rewrite ``MatMul(x[B, N, C], W) + b`` as
``Reshape(x, [B*N, C]) -> Gemm(W, b) -> Reshape(., [B, N, C'])`` and then let whole
chains (fc1 -> GELU -> fc2) run on ``[B*N, C]``. Those tensors have lost their
token axis, so this pass gives it back before the Linear pass runs:

1. Find a Reshape from a ``[B, N, C]`` token stream (or ``[B, N, H, D]`` heads)
   to ``[B*N, C]``.
2. Collect the region it starts: Gemm/MatMul with constant weights and
   elementwise ops with per-channel or scalar constants, up to the Reshapes
   that leave it.
3. Rewrite every Gemm as ``MatMul`` + ``Add`` on ``[B, N, C]``, give every
   region tensor its ``[B, N, c]`` shape, and drop the entry Reshape. The exit
   Reshapes keep their targets: row-major order is the same for ``[B*N, c]`` and
   ``[B, N, c]``, so they read the 3-D tensor unchanged (and vanish when they
   become identities).

A region that reaches any other op is left as it is, with a debug log.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, attr, const_value, replace_tensor, static_shape
from ..pass_manager import Pass, PassContext, PassResult
from .layout import BINARY_OPS, UNARY_OPS


class RegionRejected(Exception):
    pass


class RestoreTokenAxis(Pass):
    name = "restore_tokens"
    summary = "Reshape [B*N, C] -> Gemm -> Reshape back into MatMul on [B, N, C]"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        for entry in list(graph.nodes):
            if entry.op != "Reshape" or not entry.outputs:
                continue
            source = static_shape(entry.inputs[0])
            flat = static_shape(entry.outputs[0])
            # The entry flattens [B, N, C] (or the heads' [B, N, H, D]) into [B*N, C].
            if source is None or flat is None or len(source) < 3 or len(flat) != 2:
                continue
            if flat != [source[0] * source[1], int(np.prod(source[2:]))]:
                continue
            try:
                region, exits = self._collect(entry, graph)
            except RegionRejected as reason:
                result.skip(entry, str(reason), self.log)
                continue
            self._rewrite(entry, region, exits, source[:2], graph, editor, result)
            result.rewritten += 1

    def _collect(self, entry: gs.Node, graph: gs.Graph) -> tuple[list[gs.Node], list[gs.Node]]:
        region, exits = [], []
        seen = set()
        frontier = [entry.outputs[0]]
        while frontier:
            tensor = frontier.pop()
            if tensor in graph.outputs:
                raise RegionRejected(f"'{tensor.name}' is a graph output")
            for node in tensor.outputs:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op == "Reshape" and node.inputs[0] is tensor:
                    exits.append(node)
                    continue
                self._check_member(node, tensor)
                region.append(node)
                frontier.extend(node.outputs)
        if not exits:
            raise RegionRejected("the flattened region never leaves through a Reshape")
        return region, exits

    def _check_member(self, node: gs.Node, tensor: gs.Tensor) -> None:
        if node.op == "Gemm":
            if node.inputs[0] is not tensor or attr(node, "transA", 0) or const_value(node.inputs[1]) is None:
                raise RegionRejected(f"'{node.name}' (Gemm) is not a Linear layer on the flattened tokens")
            return
        if node.op == "MatMul":
            if node.inputs[0] is not tensor or const_value(node.inputs[1]) is None:
                raise RegionRejected(f"'{node.name}' (MatMul) is not a Linear layer on the flattened tokens")
            return
        if node.op in UNARY_OPS or node.op in BINARY_OPS:
            for other in node.inputs:
                value = const_value(other)
                if value is not None and value.ndim == 2 and value.shape[0] != 1:
                    raise RegionRejected(f"'{node.name}' ({node.op}) has a constant that varies along the tokens")
            return
        raise RegionRejected(f"the flattened tokens reach '{node.name}' ({node.op})")

    def _rewrite(self, entry, region, exits, batch_tokens, graph, editor, result) -> None:
        # 1. The region reads the 3-D stream: the entry Reshape goes, or targets [B, N, C] instead.
        flat = entry.outputs[0]
        if len(entry.inputs[0].shape) == 3:
            replace_tensor(graph, flat, entry.inputs[0])
            entry.outputs.clear()
        else:
            target = batch_tokens + [flat.shape[1]]
            entry.inputs[1] = editor.constant(f"{entry.name}/tokens_shape", np.array(target, np.int64))
            flat.shape = target

        # 2. Gemm -> MatMul (+ Add); every region tensor gets its [B, N, c] shape.
        for node in region:
            if node.op == "Gemm":
                self._gemm_to_matmul(node, batch_tokens, editor, result)
                continue
            for output in node.outputs:
                if output.shape is not None and len(output.shape) == 2:
                    output.shape = batch_tokens + [output.shape[1]]
            result.record(node.name, node.name)

        # 3. Exit Reshapes that now map [B, N, c] to itself are identities.
        for node in exits:
            if static_shape(node.outputs[0]) == static_shape(node.inputs[0]):
                replace_tensor(graph, node.outputs[0], node.inputs[0])
                node.outputs.clear()

    def _gemm_to_matmul(self, node: gs.Node, batch_tokens, editor: GraphEditor, result: PassResult) -> None:
        weight = const_value(node.inputs[1])
        if attr(node, "transB", 0):
            weight = weight.T
        weight = (weight * np.asarray(attr(node, "alpha", 1.0), weight.dtype)).astype(weight.dtype)
        x, y = node.inputs[0], node.outputs[0]
        cout = weight.shape[1]
        shape = batch_tokens + [cout]
        bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        node.inputs, node.outputs = [], []
        w = editor.constant(f"{node.name}/weight", np.ascontiguousarray(weight))
        if bias is None:
            editor.node("MatMul", f"{node.name}/matmul", [x, w], outputs=[y])
        else:
            bias = np.broadcast_to(bias.reshape(-1), (cout,)) * np.asarray(attr(node, "beta", 1.0), weight.dtype)
            product = editor.out("MatMul", f"{node.name}/matmul", [x, w], dtype=y.dtype, shape=shape)
            editor.node("Add", f"{node.name}/bias", [product, editor.constant(f"{node.name}/bias_value",
                                                                             bias.astype(weight.dtype))], outputs=[y])
        y.shape = shape
        result.record(node.name, f"{node.name}/matmul")
