"""Fold every subgraph whose inputs are all known before run time into an initializer.

With static input shapes, exporters' Shape -> Gather -> Unsqueeze -> Concat
chains, the class token's Expand, weights behind a Transpose node
(``do_constant_folding=False``) and run-time attention scales all become
constants, so the pattern passes only ever see constant weights and targets.

1. ``Shape`` of a tensor with a static shape becomes that shape.
2. ``Constant`` nodes become initializers.
3. The nodes whose inputs are all constant (the constant cone) run once in
   onnxruntime, as a model of their own, and their outputs that the rest of
   the graph reads become initializers.

Steps repeat until nothing changes, because a folded Expand can give a later
Shape its static input. Only the cone is exported, never the whole graph, so
folding costs little on models with hundreds of megabytes of weights.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, infer_shapes, static_shape
from ..pass_manager import Pass, PassContext, PassResult

# Ops whose output is not a function of their inputs; never folded.
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}
MAX_ROUNDS = 5


class FoldConstants(Pass):
    name = "fold_constants"
    summary = "fold constant subgraphs and Shape chains into initializers"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        before = len(graph.nodes)
        for _ in range(MAX_ROUNDS):
            changed = self._fold_shapes(graph) + self._constant_nodes(graph)
            changed += self._fold_cone(graph, ctx.opset)
            if not changed:
                break
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            infer_shapes(graph)
        result.rewritten = before - len(graph.nodes)

    def _fold_shapes(self, graph: gs.Graph) -> int:
        folded = 0
        for node in graph.nodes:
            if node.op != "Shape" or not node.outputs:
                continue
            shape = static_shape(node.inputs[0])
            if shape is None:
                continue
            start = node.attrs.get("start", 0)
            end = node.attrs.get("end", None)
            value = np.array(shape, np.int64)[start:end]
            _replace_with_constant(node.outputs[0], value)
            node.outputs.clear()
            folded += 1
        return folded

    def _constant_nodes(self, graph: gs.Graph) -> int:
        folded = 0
        for node in graph.nodes:
            if node.op != "Constant" or not node.outputs or node.outputs[0] in graph.outputs:
                continue
            value = node.attrs.get("value")
            if not isinstance(value, gs.Constant):
                continue  # value_float, value_ints, ...: left to the cone, where onnxruntime evaluates them
            _replace_with_constant(node.outputs[0], np.asarray(value.values))
            node.outputs.clear()
            folded += 1
        return folded

    def _fold_cone(self, graph: gs.Graph, opset: int) -> int:
        known = {id(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        cone = []
        for node in graph.nodes:  # topological order
            if not node.outputs or node.op in NONDETERMINISTIC or node.domain not in ("", "ai.onnx", None):
                continue
            if any(node.attrs.get(k) is not None for k in ("then_branch", "else_branch", "body")):
                continue  # control flow
            if all(id(t) in known or not t.name for t in node.inputs):
                cone.append(node)
                known.update(id(t) for t in node.outputs)
        if not cone:
            return 0
        in_cone = {id(n) for n in cone}
        needed = []
        for node in cone:
            for tensor in node.outputs:
                readers = [c for c in tensor.outputs if id(c) not in in_cone]
                if (readers or tensor in graph.outputs) and tensor not in needed:
                    needed.append(tensor)
        if not needed:
            return 0
        try:
            values = _evaluate(cone, needed, opset)
        except Exception as exc:  # onnxruntime rejects some ops or opsets; the cone then stays as it is
            self.log.debug("%s: the constant cone of %d nodes could not be evaluated: %s", self.name, len(cone), exc)
            return 0
        kept = set()
        for tensor, value in zip(needed, values):
            if tensor in graph.outputs:
                kept.add(id(tensor))  # a graph output stays the output of its node
                continue
            _replace_with_constant(tensor, value)
        for node in cone:
            if not any(id(t) in kept for t in node.outputs):
                node.outputs.clear()  # dead now; the initializer took its output's name
        return len(cone)


def _replace_with_constant(tensor: gs.Variable, value: np.ndarray) -> None:
    constant = gs.Constant(tensor.name, np.asarray(value))
    for consumer in list(tensor.outputs):
        consumer.inputs = [constant if t is tensor else t for t in consumer.inputs]


def _evaluate(nodes: list[gs.Node], outputs: list[gs.Tensor], opset: int) -> list[np.ndarray]:
    """Run ``nodes`` (all inputs constant) in onnxruntime and return the values of ``outputs``."""
    import onnxruntime as ort
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    initializers, seen = [], set()
    for node in nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.name not in seen:
                seen.add(tensor.name)
                initializers.append(OnnxExporter.export_tensor_proto(tensor))
    protos = [OnnxExporter.export_node(node) for node in nodes]
    output_infos = [onnx.ValueInfoProto(name=t.name) for t in outputs]
    graph = onnx.helper.make_graph(protos, "constant_cone", [], output_infos, initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([t.name for t in outputs], {})
