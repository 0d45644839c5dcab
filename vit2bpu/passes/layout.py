"""Carry the channels-first layout through the ops between rewritten regions.

After the pattern passes, each converted region ends in a FromChannelsFirst
adapter. This pass moves that adapter forward through every op that can run
on the 4-D tensor directly, and cancels it when it meets a ToChannelsFirst:

- elementwise ops (residual Add, layer-scale Mul, the GELU Erf chain, Cast):
  constants are rewritten to broadcast against NCHW, e.g. gamma ``[C]`` ->
  ``[1, C, 1, 1]`` and the position embedding ``[1, N, C]`` -> ``[1, C, 1, N]``;
- Concat on the token axis (class and distillation tokens) -> Concat on W;
- Gather of one token (head selection) -> Slice on W, giving ``[B, C, 1, 1]``;
- Slice on the token axis -> Slice on W;
- ReduceMean/ReduceSum/ReduceMax over the tokens (mean pooling) -> over W;
- ``ToChannelsFirst(FromChannelsFirst(x4))`` -> ``x4``.

A node moves only when every non-constant input comes out of an adapter of the
same kind, so no new layout op is ever added.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, attr, const_value, replace_tensor
from ..layout import (AXIS_MAP, TO_OP, TOKENS, VECTOR, channels_first_shape, const_to_channels_first,
                      from_adapter_of, from_channels_first, is_adapter, kind_for_rank, to_channels_first)
from ..pass_manager import Pass, PassContext, PassResult

UNARY_OPS = {"Abs", "Cast", "Ceil", "Clip", "Elu", "Erf", "Exp", "Floor", "HardSigmoid", "Identity", "LeakyRelu",
             "Log", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Softplus", "Softsign", "Sqrt",
             "Tanh", "IsNaN", "Not"}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "And", "Or", "Where", "PRelu"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}


class PropagateLayout(Pass):
    name = "layout"
    summary = "move layout adapters through elementwise, Concat, Gather, Slice and Reduce ops; cancel inverse pairs"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        self._convert_token_inputs(graph, editor, result)
        changed = True
        while changed:
            changed = False
            graph.toposort()
            for node in list(graph.nodes):
                if not node.outputs:
                    continue
                if is_adapter(node, TO_OP):
                    changed |= self._cancel(node, graph, result)
                    continue
                handler = self._handler(node)
                if handler is None:
                    continue
                if handler(node, graph, editor, result):
                    result.rewritten += 1
                    changed = True
            graph.cleanup(remove_unused_graph_inputs=False)

    def _convert_token_inputs(self, graph: gs.Graph, editor: GraphEditor, result: PassResult) -> None:
        """Give a token-stream graph input (a model of blocks, without patch embedding) one channels-first twin.

        Every reader of the input then sees ``FromChannelsFirst(ToChannelsFirst(input))``, so
        the ops that read it directly (the first residual Add) can move to 4-D like the rest.
        """
        for tensor in graph.inputs:
            readers = list(tensor.outputs)
            if not any(is_adapter(node, TO_OP) for node in readers):
                continue
            x4 = to_channels_first(editor, tensor, f"{tensor.name}/input")
            twin = from_channels_first(editor, x4, kind_for_rank(len(tensor.shape)), f"{tensor.name}/input")
            for node in readers:
                node.inputs = [twin if t is tensor else t for t in node.inputs]
            result.notes.append(f"input '{tensor.name}' enters the 4-D layout once")

    def _handler(self, node: gs.Node):
        if node.domain not in ("", None):
            return None
        if node.op in UNARY_OPS or node.op in BINARY_OPS:
            return self._elementwise
        return {"Concat": self._concat, "Gather": self._gather, "Slice": self._slice,
                **{op: self._reduce for op in REDUCE_OPS}}.get(node.op)

    def _cancel(self, to_node: gs.Node, graph: gs.Graph, result: PassResult) -> bool:
        adapter = from_adapter_of(to_node.inputs[0])
        if adapter is None or adapter.attrs["kind"] != to_node.attrs["kind"]:
            return False
        replace_tensor(graph, to_node.outputs[0], adapter.inputs[0])
        to_node.outputs.clear()
        result.rewritten += 1
        return True

    def _adapted_inputs(self, node: gs.Node, inputs, result: PassResult, rank_from_const=None):
        """Return (kind, 4-D inputs) when every input is an adapter output or a convertible constant."""
        kind = None
        for tensor in inputs:
            adapter = from_adapter_of(tensor)
            if adapter is not None:
                if kind not in (None, adapter.attrs["kind"]):
                    return None, None
                kind = adapter.attrs["kind"]
        if kind is None:
            return None, None
        converted = []
        for tensor in inputs:
            adapter = from_adapter_of(tensor)
            if adapter is not None:
                converted.append(adapter.inputs[0])
                continue
            value = const_value(tensor)
            if value is None:
                result.skip(node, f"input '{tensor.name}' is neither channels-first nor constant", self.log)
                return None, None
            if value.ndim == 0:
                converted.append(tensor)  # scalars broadcast the same in both layouts
                continue
            value4 = const_to_channels_first(value, kind)
            if value4 is None:
                result.skip(node, f"constant '{tensor.name}' of shape {list(value.shape)} does not broadcast "
                                  f"against the {kind} layout", self.log)
                return None, None
            converted.append(value4)  # becomes an initializer in _emit
        return kind, converted

    def _emit(self, node: gs.Node, graph: gs.Graph, editor: GraphEditor, inputs, kind: str, shape4,
              attrs=None, op=None, out_kind=None) -> None:
        """Write the 4-D version of ``node`` and an adapter for its old consumers."""
        output = node.outputs[0]
        inputs = [editor.constant(f"{node.name}/nchw_const", t) if isinstance(t, np.ndarray) else t for t in inputs]
        y4 = editor.out(op or node.op, f"{node.name}/nchw", inputs, attrs=attrs if attrs is not None else dict(node.attrs),
                        dtype=output.dtype, shape=shape4)
        y = from_channels_first(editor, y4, out_kind or kind, node.name)
        replace_tensor(graph, output, y)
        node.outputs.clear()

    def _elementwise(self, node, graph, editor, result) -> bool:
        kind, inputs = self._adapted_inputs(node, list(node.inputs), result)
        if kind is None:
            return False
        shapes = [tuple(t.shape) for t in inputs]
        if any(d is None or not isinstance(d, (int, np.integer)) for s in shapes for d in s):
            result.skip(node, "an input shape is not static", self.log)
            return False
        shape4 = list(np.broadcast_shapes(*shapes))
        if len(shape4) != 4:
            return False
        self._emit(node, graph, editor, inputs, kind, shape4)
        return True

    def _concat(self, node, graph, editor, result) -> bool:
        kind, inputs = self._adapted_inputs(node, list(node.inputs), result)
        if kind is None:
            return False
        rank = 3 if kind == TOKENS else 2
        axis = attr(node, "axis") % rank
        if any(len(t.shape) != 4 for t in inputs):
            result.skip(node, "a constant input does not have the full rank", self.log)
            return False
        axis4 = AXIS_MAP[kind][axis]
        shape4 = list(inputs[0].shape)
        shape4[axis4] = sum(int(t.shape[axis4]) for t in inputs)
        self._emit(node, graph, editor, inputs, kind, shape4, attrs={"axis": axis4})
        return True

    def _gather(self, node, graph, editor, result) -> bool:
        adapter = from_adapter_of(node.inputs[0])
        indices = const_value(node.inputs[1])
        if adapter is None or adapter.attrs["kind"] != TOKENS or indices is None:
            return False
        if attr(node, "axis", 0) % 3 != 1:
            result.skip(node, "gathers along an axis other than the tokens", self.log)
            return False
        x4 = adapter.inputs[0]
        tokens = int(x4.shape[3])
        if indices.ndim == 0:
            # One token, e.g. the class token before the head: Slice keeps the tensor 4-D.
            index = int(indices) % tokens
            shape4 = [x4.shape[0], x4.shape[1], 1, 1]
            inputs = [x4, editor.constant(f"{node.name}/start", np.array([index], np.int64)),
                      editor.constant(f"{node.name}/end", np.array([index + 1], np.int64)),
                      editor.constant(f"{node.name}/axes", np.array([3], np.int64))]
            self._emit(node, graph, editor, inputs, TOKENS, shape4, attrs={}, op="Slice", out_kind=VECTOR)
            return True
        if indices.ndim != 1:
            result.skip(node, f"indices of rank {indices.ndim}", self.log)
            return False
        shape4 = [x4.shape[0], x4.shape[1], 1, int(indices.shape[0])]
        index_const = editor.constant(f"{node.name}/indices", (indices.astype(np.int64) % tokens))
        self._emit(node, graph, editor, [x4, index_const], TOKENS, shape4, attrs={"axis": 3})
        return True

    def _slice(self, node, graph, editor, result) -> bool:
        adapter = from_adapter_of(node.inputs[0])
        if adapter is None:
            return False
        kind = adapter.attrs["kind"]
        rank = 3 if kind == TOKENS else 2
        values = [const_value(t) if t.name else None for t in node.inputs[1:]]
        if any(v is None for v in values[:2]) or any(t.name and v is None for t, v in zip(node.inputs[3:], values[2:])):
            result.skip(node, "starts, ends, axes or steps are not constant", self.log)
            return False
        starts, ends = values[0], values[1]
        axes = values[2] if len(values) > 2 and values[2] is not None else np.arange(len(starts))
        axes4 = np.array([AXIS_MAP[kind][int(a) % rank] for a in axes], np.int64)
        output_shape = node.outputs[0].shape
        if output_shape is None or any(not isinstance(d, int) for d in output_shape):
            result.skip(node, "output shape is not static", self.log)
            return False
        shape4 = channels_first_shape(output_shape, kind)
        inputs = [adapter.inputs[0], editor.constant(f"{node.name}/starts", starts.astype(np.int64)),
                  editor.constant(f"{node.name}/ends", ends.astype(np.int64)),
                  editor.constant(f"{node.name}/axes", axes4)]
        if len(values) > 3 and values[3] is not None:
            inputs.append(editor.constant(f"{node.name}/steps", values[3].astype(np.int64)))
        self._emit(node, graph, editor, inputs, kind, shape4, attrs={})
        return True

    def _reduce(self, node, graph, editor, result) -> bool:
        adapter = from_adapter_of(node.inputs[0])
        if adapter is None or adapter.attrs["kind"] != TOKENS or len(node.inputs) > 1:
            return False
        axes = attr(node, "axes")
        if axes is None or [a % 3 for a in axes] != [1]:
            result.skip(node, f"reduces axes {axes}; only the token axis is carried over", self.log)
            return False
        x4 = adapter.inputs[0]
        shape4 = [x4.shape[0], x4.shape[1], 1, 1]
        keepdims = attr(node, "keepdims", 1)
        self._emit(node, graph, editor, [x4], TOKENS, shape4, attrs={"axes": [3], "keepdims": 1},
                   out_kind=TOKENS if keepdims else VECTOR)
        return True
