"""``vit2bpu check``: predict which nodes of a model run on the BPU or the CPU of a target, and why.

The prediction applies the rules in ``bpu_ops.py`` to every node after doing
what the toolchain does first: nodes that only compute constants are folded
away, constant-weight MatMul/Gemm become 1x1 Convs and the Erf GELU chain
becomes one lookup table. With ``--verify`` and ``hb_mapper`` on PATH, the real
``hb_mapper checker`` runs too and every disagreement is listed.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from .bpu_ops import CHIPS, SOURCE, NodeInfo, place_node
from .errors import EXIT_OK, UsageError, Vit2BpuError
from .graph import infer_shapes, static_shape
from .model_io import default_opset, load_model, write_text_atomically
from .targets import TARGETS, get_target

log = logging.getLogger(__name__)


@dataclass
class Placement:
    node: str
    op_type: str
    device: str  # BPU | CPU | folded
    reason: str


@dataclass
class CheckReport:
    model: str
    target: str
    march: str
    opset: int | None
    placements: list[Placement] = field(default_factory=list)
    subgraphs: int = 0
    warnings: list[str] = field(default_factory=list)
    verify: dict | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        """op type -> {"BPU": n, "CPU": n} over the placed (not folded) nodes."""
        table: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"BPU": 0, "CPU": 0})
        for p in self.placements:
            if p.device in ("BPU", "CPU"):
                table[p.op_type][p.device] += 1
        return dict(sorted(table.items()))

    def cpu_nodes(self) -> list[Placement]:
        return [p for p in self.placements if p.device == "CPU"]

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "march": self.march, "opset": self.opset,
                "bpu_nodes": sum(p.device == "BPU" for p in self.placements),
                "cpu_nodes": len(self.cpu_nodes()), "folded_nodes": sum(p.device == "folded" for p in self.placements),
                "subgraphs": self.subgraphs, "by_op_type": self.counts(),
                "cpu": [p.__dict__ for p in self.cpu_nodes()],
                "nodes": [p.__dict__ for p in self.placements],
                "warnings": self.warnings, "verify": self.verify, "rules": SOURCE}

    def lines(self) -> list[str]:
        out = [f"{self.model}: target {self.target} (march {self.march}), predicted placement"]
        for warning in self.warnings:
            out.append(f"  warning: {warning}")
        out.append(f"  {'op type':<20} {'BPU':>5} {'CPU':>5}")
        for op, c in self.counts().items():
            out.append(f"  {op:<20} {c['BPU']:>5} {c['CPU']:>5}")
        bpu = sum(p.device == "BPU" for p in self.placements)
        out.append(f"  total: {bpu} on the BPU, {len(self.cpu_nodes())} on the CPU, about {self.subgraphs} BPU "
                   f"subgraph(s); {sum(p.device == 'folded' for p in self.placements)} constant node(s) folded")
        if self.cpu_nodes():
            out.append("  on the CPU:")
            for p in self.cpu_nodes():
                out.append(f"    {p.node} ({p.op_type}): {p.reason}")
        if self.verify is not None:
            out.extend(verify_lines(self.verify))
        return out


def _fused_gelu(nodes: list[gs.Node]) -> set[int]:
    """ids of the nodes of each Erf GELU chain: Div(x, c) -> Erf -> Add(c) -> two Muls."""
    fused = set()
    for erf in nodes:
        if erf.op != "Erf" or not erf.inputs[0].inputs:
            continue
        divide = erf.inputs[0].inputs[0]
        chain = [erf]
        if divide.op in ("Div", "Mul"):
            chain.append(divide)
        add = erf.outputs[0].outputs[0] if len(erf.outputs[0].outputs) == 1 else None
        if add is None or add.op != "Add":
            continue
        chain.append(add)
        tensor = add.outputs[0]
        for _ in range(2):
            if len(tensor.outputs) != 1 or tensor.outputs[0].op != "Mul":
                break
            chain.append(tensor.outputs[0])
            tensor = tensor.outputs[0].outputs[0]
        fused.update(id(n) for n in chain)
    return fused


def predict(model: onnx.ModelProto, target: str = "x5", run_on_bpu: set[str] | None = None,
            name: str = "model") -> CheckReport:
    """Predict the placement of every node of ``model`` on ``target``."""
    profile = get_target(target)
    chip = CHIPS[profile.march]
    run_on_bpu = set(run_on_bpu or ())
    opset = default_opset(model)
    report = CheckReport(model=name, target=profile.name, march=chip.march, opset=opset)
    if opset is not None and opset > 11:
        report.warnings.append(f"the toolchain accepts only opset 10-11 and rejects this opset-{opset} model; "
                               "convert it with vit2bpu first (placement below assumes it were accepted)")

    graph = gs.import_onnx(model)
    graph.toposort()
    shapes = _folded_shapes(model)
    for name, tensor in graph.tensors().items():
        if not isinstance(tensor, gs.Constant) and shapes.get(name) is not None:
            tensor.shape = shapes[name]
    outputs = set(id(t) for t in graph.outputs)

    # 1. Constant folding: a node whose inputs are all known before run time disappears,
    #    and so does Shape of a statically shaped tensor.
    constant = {id(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    folded = set()
    for node in graph.nodes:
        inputs = [t for t in node.inputs if t.name]
        static_shape_of = node.op == "Shape" and static_shape(node.inputs[0]) is not None
        if static_shape_of or node.op == "Constant" or (inputs and all(id(t) in constant for t in inputs)):
            folded.add(id(node))
            constant.update(id(t) for t in node.outputs)

    # 2. Fusions the toolchain applies before placing nodes.
    gelu = _fused_gelu(graph.nodes)

    # 3. Place every remaining node.
    device_of = {}
    for node in graph.nodes:
        if id(node) in folded:
            report.placements.append(Placement(node.name, node.op, "folded", "computes a constant; folded by the toolchain"))
            continue
        if node.op in ("Identity", "Dropout"):
            report.placements.append(Placement(node.name, node.op, "folded", "removed by the toolchain's optimizer"))
            continue
        const_inputs = [id(t) in constant for t in node.inputs]
        fused_as = "gelu" if id(node) in gelu else None
        if node.op in ("MatMul", "Gemm") and len(const_inputs) > 1 and const_inputs[1]:
            fused_as = "linear"
        info = NodeInfo(name=node.name, op=node.op,
                        input_shapes=[static_shape(t) if t.name else None for t in node.inputs],
                        output_shapes=[static_shape(t) for t in node.outputs], const_inputs=const_inputs,
                        attrs=dict(node.attrs), writes_graph_output=any(id(t) in outputs for t in node.outputs),
                        fused_as=fused_as)
        device, reason = place_node(info, chip, run_on_bpu)
        device_of[id(node)] = device
        report.placements.append(Placement(node.name, node.op, device, reason))

    report.subgraphs = _count_subgraphs(graph, device_of)
    return report


def _folded_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor shapes after constant folding, as the toolchain sees them.

    Exporters compute some shapes at run time (the class token's Expand), which
    stops ONNX shape inference; folding them first, as hmct does, lets it through.
    """
    graph = gs.import_onnx(model)
    graph.toposort()
    infer_shapes(graph)  # onnx-graphsurgeon folds Shape only where the shape is already inferred
    gs_logger = logging.getLogger("onnx_graphsurgeon")
    level = gs_logger.level
    gs_logger.setLevel(logging.ERROR)
    try:
        graph.fold_constants(fold_shapes=True, error_ok=True)
    finally:
        gs_logger.setLevel(level)
    graph.cleanup().toposort()
    infer_shapes(graph)
    return {name: static_shape(t) for name, t in graph.tensors().items()}


def _count_subgraphs(graph: gs.Graph, device_of: dict[int, str]) -> int:
    """Estimate the number of compiled BPU subgraphs.

    A subgraph cannot contain a path that leaves it through a CPU node and comes
    back, so BPU nodes are grouped by how many CPU nodes lie on the longest path
    before them, and connected groups at the same depth form one subgraph.
    """
    depth: dict[int, int] = {}
    for node in graph.nodes:  # topological order
        best = 0
        for tensor in node.inputs:
            for producer in tensor.inputs:
                if id(producer) in depth:
                    best = max(best, depth[id(producer)] + (device_of.get(id(producer)) == "CPU"))
        depth[id(node)] = best
    parent = {key: key for key, device in device_of.items() if device == "BPU"}

    def find(key):
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for node in graph.nodes:
        if id(node) not in parent:
            continue
        for tensor in node.outputs:
            for consumer in tensor.outputs:
                if id(consumer) in parent and depth[id(consumer)] == depth[id(node)]:
                    parent[find(id(consumer))] = find(id(node))
    return len({find(key) for key in parent})


# --- hb_mapper checker -----------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ROW = re.compile(r"^(\S+)\s+(BPU|CPU)\s+(\S+)\s+(\S+)")
# Suffixes hmct adds to the name of a node it splits in two (Div -> reciprocal lookup table + Mul).
_SPLIT_SUFFIXES = ("_reciprocal", "_mul")


def parse_checker_output(text: str) -> list[dict]:
    """Rows of the placement table ``hb_mapper checker`` prints: node, device, subgraph, quantized type."""
    rows = []
    in_table = False
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        if line.startswith("Node") and " ON " in line and "Subgraph" in line:
            in_table = True
            continue
        if not in_table or set(line) <= {"-", "="}:
            continue
        match = _ROW.match(line)
        if match is None:
            if rows:
                in_table = False
            continue
        rows.append({"node": match.group(1), "device": match.group(2), "subgraph": match.group(3),
                     "type": match.group(4)})
    return rows


def map_checker_rows(rows: list[dict], node_names: list[str]) -> list[dict]:
    """Attach to each row the model node it belongs to (``model_node``), or None for toolchain-inserted nodes.

    The checker truncates long names to ``...`` + their last 47 characters and names the
    halves of a split Div ``<name>_reciprocal`` and ``<name>_mul``.
    """
    names = set(node_names)
    mapped = []
    for row in rows:
        name = row["node"]
        owner = None
        if name in names:
            owner = name
        elif name.startswith("..."):
            tail = name[3:]
            candidates = [n for n in node_names if n.endswith(tail)]
            owner = candidates[0] if len(candidates) == 1 else None
        else:
            for suffix in _SPLIT_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)] in names:
                    owner = name[: -len(suffix)]
        mapped.append({**row, "model_node": owner})
    return mapped


def compare(report: CheckReport, rows: list[dict], model: onnx.ModelProto) -> dict:
    """Compare the prediction with the checker on the model's own nodes and return where they disagree."""
    op_of = {n.name: n.op_type for n in model.graph.node}
    mapped = map_checker_rows(rows, list(op_of))
    checker_cpu = sorted({r["model_node"] for r in mapped if r["device"] == "CPU" and r["model_node"]})
    checker_bpu = {r["model_node"] for r in mapped if r["device"] == "BPU" and r["model_node"]}
    # Nodes the checker does not list were fused into others; only listed nodes are compared.
    predicted_cpu = sorted(p.node for p in report.cpu_nodes() if p.node in checker_bpu or p.node in checker_cpu)
    only_checker = sorted(set(checker_cpu) - set(predicted_cpu))
    only_prediction = sorted(set(predicted_cpu) - set(checker_cpu))
    inserted = [r for r in mapped if r["model_node"] is None]
    return {
        "checker_cpu_nodes": checker_cpu,
        "predicted_cpu_nodes": predicted_cpu,
        "cpu_only_in_checker": only_checker,
        "cpu_only_in_prediction": only_prediction,
        "checker_cpu_by_op_type": dict(sorted(collections.Counter(op_of[n] for n in checker_cpu).items())),
        "predicted_cpu_by_op_type": dict(sorted(collections.Counter(op_of[n] for n in predicted_cpu).items())),
        "toolchain_inserted": [{"node": r["node"], "device": r["device"], "type": r["type"]} for r in inserted],
        "checker_subgraphs": len({r["subgraph"] for r in rows if r["device"] == "BPU"}),
        "agrees": not only_checker and not only_prediction,
    }


def verify_lines(result: dict) -> list[str]:
    lines = ["  hb_mapper checker:"]
    lines.append(f"    CPU nodes of the model: {len(result['checker_cpu_nodes'])} "
                 f"({', '.join(f'{k} {v}' for k, v in sorted(result['checker_cpu_by_op_type'].items())) or 'none'}); "
                 f"{result['checker_subgraphs']} BPU subgraph(s)")
    inserted_cpu = [r for r in result["toolchain_inserted"] if r["device"] == "CPU"]
    if inserted_cpu:
        lines.append(f"    nodes the toolchain inserted that run on the CPU: "
                     f"{', '.join(r['node'] + ' (' + r['type'] + ')' for r in inserted_cpu)}")
    if result["agrees"]:
        lines.append("    the prediction agrees with the checker on every CPU node of the model")
    for name in result["cpu_only_in_checker"]:
        lines.append(f"    disagreement: '{name}' runs on the CPU, predicted on the BPU")
    for name in result["cpu_only_in_prediction"]:
        lines.append(f"    disagreement: '{name}' predicted on the CPU, runs on the BPU")
    return lines


def run_checker(model_path: str, march: str, timeout: float = 3600) -> str:
    """Run ``hb_mapper checker`` in a temporary folder and return what it printed."""
    executable = shutil.which("hb_mapper")
    if executable is None:
        raise UsageError("--verify needs hb_mapper on PATH", hint="activate the RDK toolchain's environment first")
    with tempfile.TemporaryDirectory(prefix="vit2bpu-checker-") as folder:
        command = [executable, "checker", "--model-type", "onnx", "--model", os.path.abspath(model_path),
                   "--march", march]
        try:
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Vit2BpuError(f"hb_mapper checker timed out after {timeout:.0f} s", path=model_path) from None
        text = done.stdout + done.stderr
        log_file = Path(folder) / "hb_mapper_checker.log"
        if log_file.exists():
            text += log_file.read_text(errors="replace")
        if done.returncode != 0 and not parse_checker_output(text):
            last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
            raise Vit2BpuError(f"hb_mapper checker failed (exit {done.returncode}): {_ANSI.sub('', last[0])}",
                               path=model_path)
        return text


# --- command line ----------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("model", help="ONNX model, original or converted")
    parser.add_argument("--target", choices=sorted(TARGETS), default="x5", help="chip profile (default x5)")
    parser.add_argument("--run-on-bpu", action="append", default=[], metavar="OP_OR_NODE",
                        help="an op type or node name hb_mapper's run_on_bpu will list, e.g. Softmax (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write the prediction as JSON ('-' for standard output)")
    parser.add_argument("--verify", action="store_true",
                        help="also run hb_mapper checker (must be on PATH) and list where it disagrees")
    parser.add_argument("--checker-output", metavar="FILE",
                        help="compare with a saved hb_mapper checker log instead of running it")


def run(args) -> int:
    model = load_model(args.model)
    report = predict(model, args.target, set(args.run_on_bpu), name=args.model)
    text = None
    if args.checker_output:
        text = Path(args.checker_output).read_text(errors="replace")
    elif args.verify:
        if report.opset is not None and report.opset > 11:
            raise UsageError(f"hb_mapper checker rejects opset {report.opset}", hint="convert the model first")
        text = run_checker(args.model, report.march)
    if text is not None:
        rows = parse_checker_output(text)
        if not rows:
            raise Vit2BpuError("no placement table found in the hb_mapper checker output", path=args.checker_output)
        report.verify = compare(report, rows, model)
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        if args.json:
            write_text_atomically(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
        print("\n".join(report.lines()))
    return EXIT_OK
