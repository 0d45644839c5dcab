"""Replace the layout adapters left at the borders with standard opset-11 ops.

What remains after the layout pass sits where the 4-D region meets an input,
an output or an op that was not converted:

- ``ToChannelsFirst`` tokens: ``Transpose(perm=[0, 2, 1]) -> Reshape [B, C, 1, N]``;
- ``FromChannelsFirst`` tokens: ``Reshape [B, C, N] -> Transpose(perm=[0, 2, 1])``;
- vectors: one ``Reshape`` each way.

Adapters that feed a graph output restore the output's original shape, and
adapters on a graph input bring it into the 4-D layout; both are recorded so
the structure check allows them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphEditor
from ..layout import FROM_OP, TO_OP, TOKENS, is_adapter
from ..pass_manager import Pass, PassContext, PassResult


class LowerLayoutAdapters(Pass):
    name = "lower_adapters"
    summary = "turn the remaining layout adapters into Transpose/Reshape"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        for node in list(graph.nodes):
            if not (is_adapter(node, TO_OP) or is_adapter(node, FROM_OP)):
                continue
            x, y = node.inputs[0], node.outputs[0]
            kind = node.attrs["kind"]
            to_channels_first = node.op == TO_OP
            node.inputs, node.outputs = [], []
            base = node.name
            new = []
            if kind == TOKENS and to_channels_first:
                batch, tokens, channels = x.shape
                moved = editor.out("Transpose", f"{base}/transpose", [x], attrs={"perm": [0, 2, 1]}, dtype=x.dtype,
                                   shape=[batch, channels, tokens])
                new.append(editor.node("Reshape", f"{base}/reshape",
                                       [moved, editor.constant(f"{base}/shape", np.array(y.shape, np.int64))],
                                       outputs=[y]))
                new.append(moved.inputs[0])
            elif kind == TOKENS:
                batch, channels, _, tokens = x.shape
                flat = editor.out("Reshape", f"{base}/reshape",
                                  [x, editor.constant(f"{base}/shape", np.array([batch, channels, tokens], np.int64))],
                                  dtype=x.dtype, shape=[batch, channels, tokens])
                new.append(flat.inputs[0])
                new.append(editor.node("Transpose", f"{base}/transpose", [flat], attrs={"perm": [0, 2, 1]}, outputs=[y]))
            else:
                new.append(editor.node("Reshape", f"{base}/reshape",
                                       [x, editor.constant(f"{base}/shape", np.array(y.shape, np.int64))], outputs=[y]))
            if y in graph.outputs or x in graph.inputs:
                ctx.output_restore_nodes.update(n.name for n in new)
            result.rewritten += 1
            result.record(base, *[n.name for n in new])

