"""The conversion report: per-pass results, op counts, the 4-D structure check and parity."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx

from .parity import OutputParity


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items()))


def _ranks_and_types(model: onnx.ModelProto) -> dict[str, tuple[int | None, int]]:
    infos = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        tensor_type = vi.type.tensor_type
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        infos[vi.name] = (rank, tensor_type.elem_type)
    for init in model.graph.initializer:
        infos[init.name] = (len(init.dims), init.data_type)
    return infos


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def structure_issues(model: onnx.ModelProto, allowed_nodes: set[str] = frozenset()) -> list[dict]:
    """List every node that breaks the all-4-D convolution form, with the reason.

    The form: opset 11, default-domain ops only, no Gemm, no MatMul with a
    constant operand, no LayerNormalization, no tensor of rank 5 or more, and
    every float tensor between the graph input and the output restore nodes 4-D.
    ``allowed_nodes`` are the layout nodes at the graph's inputs and outputs.
    """
    issues = []
    opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), None)
    if opset != 11:
        issues.append({"node": "", "op_type": "", "reason": f"model opset is {opset}, not 11"})
    constants = {init.name for init in model.graph.initializer}
    infos = _ranks_and_types(model)
    for node in model.graph.node:
        reason = None
        if node.domain not in ("", "ai.onnx"):
            reason = f"op in domain '{node.domain}'"
        elif node.op_type == "Gemm":
            reason = "Gemm (a Linear not converted to Conv)"
        elif node.op_type == "MatMul" and any(i in constants for i in node.input):
            reason = "MatMul with a constant operand (a Linear not converted to Conv)"
        elif node.op_type == "LayerNormalization":
            reason = "LayerNormalization op"
        elif node.name not in allowed_nodes:
            for name in node.output:
                rank, elem_type = infos.get(name, (None, 0))
                if rank is not None and rank >= 5:
                    reason = f"output '{name}' has rank {rank}"
                    break
                if elem_type in FLOAT_TYPES and rank is not None and rank != 4:
                    reason = f"float output '{name}' has rank {rank}, not 4"
                    break
        if reason:
            issues.append({"node": node.name, "op_type": node.op_type, "reason": reason})
    return issues


@dataclass
class ConversionReport:
    """Everything one conversion did and measured."""

    input: str | None = None
    output: str | None = None
    target: str = ""
    layernorm: str = ""
    softmax: str = ""
    input_opset: int | None = None
    output_opset: int = 11
    input_shapes: dict = field(default_factory=dict)
    passes: list = field(default_factory=list)
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    unconverted: list = field(default_factory=list)
    parity: list[OutputParity] | None = None
    parity_passed: bool | None = None
    parity_failures: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def renamed(self) -> dict[str, list[str]]:
        """Original node name -> names of the nodes that replace it, over all passes."""
        mapping: dict[str, list[str]] = {}
        for result in self.passes:
            for old, new in result.renamed.items():
                mapping.setdefault(old, []).extend(n for n in new if n not in mapping.get(old, []))
        return mapping

    def to_dict(self) -> dict:
        return {
            "input": self.input, "output": self.output, "target": self.target, "layernorm": self.layernorm,
            "softmax": self.softmax, "input_opset": self.input_opset, "output_opset": self.output_opset,
            "input_shapes": self.input_shapes,
            "passes": [p.to_dict() for p in self.passes],
            "renamed": self.renamed(),
            "ops_before": self.ops_before, "ops_after": self.ops_after,
            "unconverted": self.unconverted,
            "parity": None if self.parity is None else [p.to_dict() for p in self.parity],
            "parity_passed": self.parity_passed, "parity_failures": self.parity_failures,
            "warnings": self.warnings,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def summary_lines(self) -> list[str]:
        """The short human-readable summary the command line prints."""
        lines = [f"target {self.target}: LayerNorm statistics via {self.layernorm}, Softmax {self.softmax}; "
                 f"opset {self.input_opset} -> {self.output_opset}"]
        for result in self.passes:
            if result.rewritten or result.skipped:
                extra = f", {len(result.skipped)} skipped" if result.skipped else ""
                lines.append(f"  {result.name:<17} {result.rewritten:>4} rewritten{extra}")
            for note in result.notes:
                lines.append(f"    {note}")
        lines.append(f"  nodes: {sum(self.ops_before.values())} -> {sum(self.ops_after.values())}")
        lines.append(f"  ops before: {_format_counts(self.ops_before)}")
        lines.append(f"  ops after:  {_format_counts(self.ops_after)}")
        if self.unconverted:
            lines.append(f"  not in the 4-D convolution form: {len(self.unconverted)} node(s)")
            for issue in self.unconverted[:10]:
                lines.append(f"    '{issue['node']}' ({issue['op_type']}): {issue['reason']}")
            if len(self.unconverted) > 10:
                lines.append(f"    ... and {len(self.unconverted) - 10} more (see --report)")
        if self.parity is not None:
            for r in self.parity:
                top1 = "" if r.top1_agreement is None else f", top-1 agreement {r.top1_agreement:.0%}"
                lines.append(f"  parity '{r.name}': cosine {r.cosine:.7f}, max abs error {r.max_abs_error:.3g}, "
                             f"max rel error {r.max_rel_error:.3g}{top1}")
        for warning in self.warnings:
            lines.append(f"  warning: {warning}")
        return lines


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def float_dtype_name(model: onnx.ModelProto) -> str:
    """The element type of the first float graph input (float32 when there is none)."""
    for vi in model.graph.input:
        elem = vi.type.tensor_type.elem_type
        if elem in FLOAT_TYPES:
            return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)))
    return "float32"
