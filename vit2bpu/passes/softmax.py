"""Write Softmax as the ops it is made of, for targets that run those on the BPU.

hb_mapper keeps a Softmax op on the CPU unless its ``run_on_bpu`` names it (RDK X5 and
RDK Ultra operator tables); written as ``ReduceMax -> Sub -> Exp -> ReduceSum -> Div``
over the same axis, every step is an op the X5 and J5 BPUs run by default. The max is
subtracted first, as every softmax kernel does, so ``Exp`` cannot overflow.

Runs only with ``--softmax decompose``; the default keeps the op.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, attr, rank_of, replace_tensor
from ..pass_manager import Pass, PassContext, PassResult


class DecomposeSoftmax(Pass):
    name = "softmax"
    summary = "Softmax -> ReduceMax, Sub, Exp, ReduceSum, Div (with --softmax decompose)"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        if ctx.options.softmax_form() != "decompose":
            return
        for node in list(graph.nodes):
            if node.op != "Softmax":
                continue
            x, y = node.inputs[0], node.outputs[0]
            rank = rank_of(x)
            if rank is None:
                result.skip(node, "input rank unknown", self.log)
                continue
            # At opset 11 only a Softmax over the last axis normalises one axis; lower_opset made sure of it.
            axis = attr(node, "axis", 1) % rank
            if axis != rank - 1:
                result.skip(node, f"opset-11 Softmax over axis {axis} of a rank-{rank} tensor normalises several "
                                  "axes at once", self.log)
                continue
            base = node.name
            shape = list(x.shape)
            reduced = shape[:-1] + [1]
            dtype = x.dtype
            peak = editor.out("ReduceMax", f"{base}/max", [x], attrs={"axes": [axis], "keepdims": 1}, dtype=dtype,
                              shape=reduced)
            shifted = editor.out("Sub", f"{base}/sub_max", [x, peak], dtype=dtype, shape=shape)
            exps = editor.out("Exp", f"{base}/exp", [shifted], dtype=dtype, shape=shape)
            total = editor.out("ReduceSum", f"{base}/sum", [exps], attrs={"axes": [axis], "keepdims": 1}, dtype=dtype,
                               shape=reduced)
            probabilities = editor.out("Div", f"{base}/normalize", [exps, total], dtype=dtype, shape=shape)
            replace_tensor(graph, y, probabilities)
            node.outputs.clear()
            result.rewritten += 1
            result.record(base, *[f"{base}/{step}" for step in ("max", "sub_max", "exp", "sum", "normalize")])
