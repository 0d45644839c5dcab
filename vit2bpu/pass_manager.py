"""The pass interface and the manager that runs passes in their declared order.

A pass finds its pattern, checks its preconditions, rewrites, and returns a
``PassResult`` saying what it changed. It logs every candidate it skips at
debug level, with the reason, and its total at info level.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from .graph import GraphEditor, cleanup, release_memory
from .options import ConvertOptions

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What one pass changed."""

    name: str
    rewritten: int = 0
    # original node name -> names of the nodes that replace it
    renamed: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, original: str, *replacements: str) -> None:
        self.renamed.setdefault(original, []).extend(replacements)

    def skip(self, node: gs.Node, reason: str, logger: logging.Logger) -> None:
        logger.debug("%s: skipped '%s' (%s): %s", self.name, node.name, node.op, reason)
        self.skipped.append({"node": node.name, "op_type": node.op, "reason": reason})

    def to_dict(self) -> dict:
        return {"name": self.name, "rewritten": self.rewritten, "seconds": round(self.seconds, 4),
                "renamed": self.renamed, "skipped": self.skipped, "notes": self.notes}


@dataclass
class PassContext:
    """State shared by the passes of one conversion."""

    options: ConvertOptions
    opset: int = 11
    # Node names that restore an original output's shape; the structure check allows them a rank other than 4.
    output_restore_nodes: set[str] = field(default_factory=set)


class Pass:
    """Base class: subclasses set ``name`` and ``summary`` and implement ``apply``."""

    name = "pass"
    summary = ""
    # Passes that must have run before this one for its pattern to exist.
    requires: tuple[str, ...] = ()

    def __init__(self):
        self.log = logging.getLogger(f"vit2bpu.passes.{self.name}")

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        raise NotImplementedError

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Run the pass on ``graph`` in place, then remove dead nodes and sort the graph."""
        result = PassResult(self.name)
        start = time.perf_counter()
        self.apply(graph, GraphEditor(graph), ctx, result)
        cleanup(graph)
        release_memory()  # so replaced weights do not pile up across passes on large models
        result.seconds = time.perf_counter() - start
        self.log.info("%s: %d rewritten, %d skipped (%.2f s)", self.name, result.rewritten,
                      len(result.skipped), result.seconds)
        return result


def run_passes(graph: gs.Graph, passes: list[Pass], ctx: PassContext) -> list[PassResult]:
    """Run ``passes`` in order on ``graph``."""
    return [p.run(graph, ctx) for p in passes]
