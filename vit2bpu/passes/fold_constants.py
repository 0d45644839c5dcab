"""Fold every subgraph whose inputs are all known before run time into an initializer.

With static input shapes, exporters' Shape -> Gather -> Unsqueeze -> Concat
chains, the class token's Expand, weights behind a Transpose node
(``do_constant_folding=False``) and run-time attention scales all become
constants, so the pattern passes only ever see constant weights and targets.
onnx-graphsurgeon evaluates the foldable nodes with onnxruntime.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ..graph import GraphEditor, infer_shapes
from ..pass_manager import Pass, PassContext, PassResult


class FoldConstants(Pass):
    name = "fold_constants"
    summary = "fold constant subgraphs and Shape chains into initializers"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        before = len(graph.nodes)
        # onnx-graphsurgeon logs every node it cannot fold at warning level; those are expected here.
        gs_logger = logging.getLogger("onnx_graphsurgeon")
        level = gs_logger.level
        gs_logger.setLevel(logging.ERROR)
        try:
            graph.fold_constants(fold_shapes=True, error_ok=True)
        finally:
            gs_logger.setLevel(level)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        for node in list(graph.nodes):
            if node.op == "Constant" and "value" in node.attrs and isinstance(node.attrs["value"], gs.Constant):
                # A Constant node left over: turn it into an initializer so every pass sees gs.Constant.
                value = node.attrs["value"]
                out = node.outputs[0]
                const = gs.Constant(out.name, value.values)
                for consumer in list(out.outputs):
                    consumer.inputs = [const if t is out else t for t in consumer.inputs]
                node.outputs.clear()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        infer_shapes(graph)
        result.rewritten = before - len(graph.nodes)
