"""Keep the patch embedding's output 4-D: ``[B, C, h, w]`` -> ``[B, C, 1, h*w]``.

Exporters flatten the patch-embedding Conv output and move channels last:
``Conv -> Reshape([B, C, h*w]) (or Flatten) -> Transpose(perm=[0, 2, 1])``, giving
the ``[B, N, C]`` token stream. Rewritten as ``Conv -> Reshape([B, C, 1, h*w])``,
the tokens land on W in row-major patch order, which is the order the Reshape
produced, followed by a FromChannelsFirst adapter that the layout pass removes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphEditor, attr, only_consumer, producer_of, replace_tensor, static_shape
from ..layout import TOKENS, from_channels_first
from ..pass_manager import Pass, PassContext, PassResult


class PatchEmbedToTokensOnW(Pass):
    name = "patch_embed"
    summary = "Conv -> flatten -> Transpose(0, 2, 1) -> Conv -> Reshape [B, C, 1, N]"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        for transpose in list(graph.nodes):
            if transpose.op != "Transpose" or attr(transpose, "perm") != [0, 2, 1]:
                continue
            flatten = producer_of(transpose.inputs[0])
            if flatten is None or flatten.op not in ("Reshape", "Flatten"):
                continue
            feature = flatten.inputs[0]
            conv = producer_of(feature)
            if conv is None or conv.op != "Conv":
                continue  # a flatten of attention heads or another tensor, not a patch embedding
            shape4 = static_shape(feature)
            flat = static_shape(flatten.outputs[0])
            if shape4 is None or len(shape4) != 4 or flat is None:
                result.skip(transpose, "the flattened tensor has no static 4-D shape", self.log)
                continue
            batch, channels, height, width = shape4
            if flat != [batch, channels, height * width]:
                result.skip(flatten, f"{flatten.op} gives {flat}, not [B, C, h*w] = "
                                     f"{[batch, channels, height * width]}", self.log)
                continue
            if only_consumer(flatten.outputs[0], graph) is not transpose:
                result.skip(flatten, "the flattened tensor has other consumers", self.log)
                continue

            base = flatten.name
            target = editor.constant(f"{base}/tokens_on_w_shape", np.array([batch, channels, 1, height * width], np.int64))
            tokens4 = editor.out("Reshape", f"{base}/tokens_on_w", [feature, target], dtype=feature.dtype,
                                 shape=[batch, channels, 1, height * width])
            tokens = from_channels_first(editor, tokens4, TOKENS, base)
            replace_tensor(graph, transpose.outputs[0], tokens)
            result.rewritten += 1
            result.record(flatten.name, f"{base}/tokens_on_w")
            result.record(transpose.name, f"{base}/tokens_on_w")
