"""Rewrite every Linear layer into a 1x1 Conv that inherits its weights.

Matched forms (after constant folding, so a Transpose node on the weight is
already folded into the initializer):

- ``MatMul(x, W[Cin, Cout])``, optionally followed by ``Add(y, b)`` or ``Add(b, y)``;
- ``Gemm(x, W, b)`` with ``transA`` 0 and ``transB`` 0 or 1, any ``alpha``/``beta``;
- ``MatMul(x, W) -> Split(last axis)`` with optional bias Adds per part (onnxsim's
  merged q/k/v projections): one Conv per part.

``x`` is a token stream ``[B, N, Cin]`` or a vector ``[B, Cin]``. The Conv runs on
the channels-first form of ``x`` with weight ``[Cout, Cin, 1, 1]``; alpha, beta
and the bias are folded into its weight and bias.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, attr, const_value, only_consumer, replace_tensor, split_const_operand
from ..layout import from_channels_first, kind_for_rank, to_channels_first
from ..pass_manager import Pass, PassContext, PassResult


class LinearToConv(Pass):
    name = "linear"
    summary = "MatMul/Gemm with a constant weight -> 1x1 Conv"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        for node in list(graph.nodes):
            if node.op == "MatMul":
                match = self._match_matmul(node, graph, result)
            elif node.op == "Gemm":
                match = self._match_gemm(node, result)
            else:
                continue
            if match is None:
                continue
            if node.op == "MatMul" and self._split_outputs(node, graph, editor, match[1], result):
                continue
            x, weight, bias, output, replaced = match
            self._rewrite(editor, graph, node, x, weight, bias, output)
            result.rewritten += 1
            result.record(node.name, *[f"{node.name}/conv"])
            for extra in replaced:
                result.record(extra.name, f"{node.name}/conv")

    def _match_matmul(self, node: gs.Node, graph: gs.Graph, result: PassResult):
        x, w = node.inputs
        weight = const_value(w)
        if weight is None:
            return None  # activation x activation: attention scores, handled by the attention pass
        if const_value(x) is not None:
            result.skip(node, "both operands are constant", self.log)
            return None
        if weight.ndim != 2:
            result.skip(node, f"weight has rank {weight.ndim}, expected 2", self.log)
            return None
        if kind_for_rank(_rank(x)) is None:
            result.skip(node, f"input has rank {_rank(x)}; only [B, N, C] and [B, C] are converted", self.log)
            return None
        if not np.issubdtype(weight.dtype, np.floating):
            result.skip(node, f"weight dtype {weight.dtype} is not floating point", self.log)
            return None
        kernel = weight.T  # [Cout, Cin]
        output = node.outputs[0]
        bias = None
        replaced = []
        add = only_consumer(output, graph)
        if add is not None and add.op == "Add":
            split = split_const_operand(add)
            if split is not None:
                _, value, _ = split
                cout = kernel.shape[0]
                if value.size == cout and value.shape[-1:] == (cout,):
                    bias = value.reshape(cout)
                    output = add.outputs[0]
                    replaced.append(add)
        return x, kernel, bias, output, replaced

    def _split_outputs(self, node: gs.Node, graph: gs.Graph, editor: GraphEditor, kernel: np.ndarray,
                       result: PassResult) -> bool:
        """Rewrite ``MatMul(x, W) -> Split(last axis) -> optional bias Adds`` as one Conv per part.

        onnxsim merges the q, k and v projections of some models this way.
        """
        split = only_consumer(node.outputs[0], graph)
        rank = len(node.inputs[0].shape)
        if split is None or split.op != "Split" or attr(split, "axis", 0) % rank != rank - 1:
            return False
        sizes = attr(split, "split") or [kernel.shape[0] // len(split.outputs)] * len(split.outputs)
        start = 0
        for part, size in zip(split.outputs, sizes):
            part_kernel = kernel[start:start + size]
            start += size
            bias, output = None, part
            add = only_consumer(part, graph)
            matched = split_const_operand(add) if add is not None and add.op == "Add" else None
            if matched is not None and matched[1].size == size and matched[1].shape[-1:] == (size,):
                bias, output = matched[1].reshape(size), add.outputs[0]
                result.record(add.name, f"{split.name}/{part.name}/conv")
            self._rewrite(editor, graph, split, node.inputs[0], part_kernel, bias, output, base=f"{node.name}/{part.name}")
        result.rewritten += 1
        result.record(node.name, *[f"{node.name}/{part.name}/conv" for part in split.outputs])
        result.record(split.name, *[f"{node.name}/{part.name}/conv" for part in split.outputs])
        return True

    def _match_gemm(self, node: gs.Node, result: PassResult):
        a = node.inputs[0]
        weight = const_value(node.inputs[1])
        if weight is None:
            result.skip(node, "weight B is not constant", self.log)
            return None
        if attr(node, "transA", 0):
            result.skip(node, "transA=1 is not a Linear layer", self.log)
            return None
        if _rank(a) != 2:
            result.skip(node, f"input has rank {_rank(a)}, expected 2", self.log)
            return None
        kernel = weight if attr(node, "transB", 0) else weight.T  # [Cout, Cin]
        kernel = kernel * np.asarray(attr(node, "alpha", 1.0), dtype=kernel.dtype)
        bias = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            value = const_value(node.inputs[2])
            cout = kernel.shape[0]
            if value is None:
                result.skip(node, "bias C is not constant", self.log)
                return None
            if value.size not in (1, cout) or (value.ndim == 2 and value.shape[0] != 1):
                result.skip(node, f"bias of shape {list(value.shape)} is not per output channel", self.log)
                return None
            bias = np.broadcast_to(value.reshape(-1), (cout,)) * np.asarray(attr(node, "beta", 1.0), dtype=kernel.dtype)
        return a, kernel, bias, node.outputs[0], []

    def _rewrite(self, editor: GraphEditor, graph: gs.Graph, node: gs.Node, x: gs.Tensor,
                 kernel: np.ndarray, bias: np.ndarray | None, output: gs.Variable, base: str | None = None) -> None:
        # 1. Bring x into the channels-first layout.
        base = base or node.name
        x4 = to_channels_first(editor, x, base)
        kind = kind_for_rank(len(x.shape))

        # 2. The 1x1 Conv: weight [Cout, Cin, 1, 1], bias folded in.
        cout = kernel.shape[0]
        inputs = [x4, editor.constant(f"{base}/conv_weight", np.ascontiguousarray(kernel)[:, :, None, None])]
        if bias is not None:
            inputs.append(editor.constant(f"{base}/conv_bias", np.asarray(bias, dtype=kernel.dtype)))
        shape4 = list(x4.shape)
        shape4[1] = cout
        y4 = editor.out("Conv", f"{base}/conv", inputs, attrs={"kernel_shape": [1, 1]}, dtype=x.dtype, shape=shape4)

        # 3. Back to the original layout for the consumers; the layout pass removes this adapter
        #    wherever the consumer can run channels-first too.
        y = from_channels_first(editor, y4, kind, base)
        replace_tensor(graph, output, y)


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)

