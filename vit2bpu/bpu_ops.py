"""Which ONNX ops the BPU of each chip runs, as data, and the rule that places one node.

Sources:

- D-Robotics' supported-operator list for the RDK toolchain: repository
  ``D-Robotics/rdk_doc``, file ``docs/07_Advanced_development/04_toolchain_development/
  intermediate/supported_op_list.md`` at commit ``fde2a1056534ff21460aa490c1e747b76cd711ea``,
  tables "RDK X3" (march ``bernoulli2``), "RDK X5" (``bayes-e``) and "RDK Ultra"
  (``bayes``, used here for J5, which has no table of its own). Limits are paraphrased.
- What ``hb_mapper checker`` placed on the BPU and the CPU in our measurements with
  hb_mapper 1.24.3, hmct 1.1.0 and hbdk 3.49.15 (the RDK X5 toolchain on PyPI):
  the toolchain fuses the Erf GELU chain into one lookup table and ``Sqrt`` + ``Div``
  into a reciprocal square root, folds nodes that only compute constants, turns
  constant-weight MatMul/Gemm into 1x1 Convs, and runs a layout op that writes a
  graph output on the CPU after the last dequantization.

A prediction is only as good as these rules: ``vit2bpu check --verify`` runs the
real checker where it is installed and lists every disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCE = ("D-Robotics rdk_doc supported_op_list.md @ fde2a10")
MEASURED = "measured with hb_mapper 1.24.3 checker"

LAYOUT_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass(frozen=True)
class Chip:
    march: str
    table: str  # the heading of the vendor table the rules come from
    # Ops the table lists as running on the BPU (subject to the checks in place_node).
    bpu_ops: frozenset
    # Ops moved to the BPU only when hb_mapper's run_on_bpu names them.
    run_on_bpu_ops: frozenset = field(default_factory=frozenset)


_X5_BPU = frozenset({
    "Abs", "Add", "ArgMax", "AveragePool", "BatchNormalization", "Concat", "Conv", "ConvTranspose", "DepthToSpace",
    "Div", "Erf", "Exp", "Expand", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid",
    "LeakyRelu", "Log", "MatMul", "Max", "MaxPool", "Min", "Mul", "Pad", "Pow", "PRelu", "Reciprocal", "ReduceMax",
    "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Softplus", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Unsqueeze",
})

_X3_BPU = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Concat", "Conv", "ConvTranspose", "DepthToSpace", "Div", "Exp",
    "Gemm", "GlobalAveragePool", "GlobalMaxPool", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Pow", "PRelu",
    "Reciprocal", "ReduceMean", "Relu", "Resize", "Sigmoid", "Slice", "SpaceToDepth", "Split", "Sqrt", "Tanh",
})

CHIPS = {
    "bernoulli2": Chip("bernoulli2", "RDK X3", _X3_BPU, frozenset({"Softmax"})),
    "bayes-e": Chip("bayes-e", "RDK X5", _X5_BPU, frozenset({"Softmax", "Equal"})),
    "bayes": Chip("bayes", "RDK Ultra (for J5)", _X5_BPU - {"Erf"}, frozenset({"Softmax", "Equal"})),
}


@dataclass
class NodeInfo:
    """Facts about one node that the placement rules read."""

    name: str
    op: str
    input_shapes: list  # None for unknown
    output_shapes: list
    const_inputs: list[bool]
    attrs: dict
    writes_graph_output: bool
    fused_as: str | None = None  # "gelu", "rsqrt", "linear" when the toolchain fuses the node


def _rank(shape) -> int | None:
    return None if shape is None else len(shape)


def _prod(values) -> int:
    total = 1
    for v in values:
        total *= int(v)
    return total


def place_node(info: NodeInfo, chip: Chip, run_on_bpu: set[str]) -> tuple[str, str]:
    """Return ("BPU" | "CPU", reason) for one node on ``chip``."""
    table = f"{SOURCE}, {chip.table} table"
    op = info.op

    # 1. What the toolchain fuses or rewrites before placing nodes.
    if info.fused_as == "gelu":
        return "BPU", f"Erf GELU chain fused into one lookup table ({MEASURED})"
    if info.fused_as == "linear":
        return _place_conv_like(info, chip, table, linear=True)
    if info.writes_graph_output and op in LAYOUT_OPS:
        return "CPU", f"{op} writes a graph output, so it runs after the last dequantization ({MEASURED})"

    # 2. Ops the chip runs only when run_on_bpu names them.
    if op in chip.run_on_bpu_ops:
        if op in run_on_bpu or info.name in run_on_bpu:
            return _place_run_on_bpu(info, chip, table)
        return "CPU", f"{op} runs on the CPU unless hb_mapper's run_on_bpu names it ({table})"

    if op not in chip.bpu_ops:
        return "CPU", f"{op} is not a BPU op on {chip.march} ({table})"

    # 3. Per-op limits.
    if chip.march == "bernoulli2":
        return _place_x3(info, chip, table)
    return _place_bayes(info, chip, table)


def _place_run_on_bpu(info: NodeInfo, chip: Chip, table: str) -> tuple[str, str]:
    shape = info.input_shapes[0] if info.input_shapes else None
    if info.op == "Softmax":
        axis = info.attrs.get("axis", 1)
        rank = _rank(shape)
        if rank != 4:
            return "CPU", f"run_on_bpu needs a 4-D Softmax input, this one has rank {rank} ({table})"
        axis = axis % 4
        if chip.march == "bernoulli2" and (axis != 1 or not info.writes_graph_output):
            return "CPU", f"on bernoulli2 run_on_bpu applies only to a Softmax over axis 1 that is a model output ({table})"
        if chip.march != "bernoulli2" and axis != 3:
            return "CPU", f"run_on_bpu applies to a Softmax over axis 3 only ({table})"
    return "BPU", f"{info.op} moved to the BPU by run_on_bpu ({table})"


def _place_conv_like(info: NodeInfo, chip: Chip, table: str, linear: bool = False) -> tuple[str, str]:
    if linear:
        return "BPU", f"{info.op} with a constant weight becomes a 1x1 Conv ({MEASURED})"
    weight = info.input_shapes[1] if len(info.input_shapes) > 1 else None
    if weight is None or len(weight) != 4:
        return "BPU", f"Conv ({table})"
    out_channels, in_channels, kernel_h, kernel_w = weight
    if chip.march == "bernoulli2":
        if kernel_h > 7 or kernel_w > 7:
            return "CPU", f"Conv kernel {kernel_h}x{kernel_w} is outside the 1-7 range of bernoulli2 ({table})"
        if max(in_channels, out_channels) > 4096:
            return "CPU", f"Conv with {max(in_channels, out_channels)} channels exceeds 4096 on bernoulli2 ({table})"
        if kernel_h * kernel_w * in_channels > 32768:
            return "CPU", f"Conv kernel H*W*C = {kernel_h * kernel_w * in_channels} exceeds 32768 on bernoulli2 ({table})"
        return "BPU", f"Conv ({table})"
    if kernel_h > 31 or kernel_w > 31:
        return "CPU", f"Conv kernel {kernel_h}x{kernel_w} exceeds 31 ({table})"
    if in_channels * kernel_h * kernel_w > 32767 and chip.march == "bayes-e":
        return "CPU", f"Conv kernel C*H*W = {in_channels * kernel_h * kernel_w} exceeds 32767 ({table})"
    if max(in_channels, out_channels) > 8192:
        return "CPU", f"Conv with {max(in_channels, out_channels)} channels exceeds 8192 ({table})"
    return "BPU", f"Conv ({table})"


def _place_bayes(info: NodeInfo, chip: Chip, table: str) -> tuple[str, str]:
    op = info.op
    if op == "Conv":
        return _place_conv_like(info, chip, table)
    if op == "MatMul":
        a, b = (info.input_shapes + [None, None])[:2]
        if a is not None and b is not None:
            if len(a) != len(b) and not any(info.const_inputs):
                return "CPU", f"MatMul inputs of ranks {len(a)} and {len(b)} must have the same rank ({table})"
            dims = list(a[-2:]) + list(b[-2:])
            if any(d > 8192 for d in dims):
                return "CPU", f"MatMul matrix dims {dims} exceed 8192 ({table})"
            if any(d > 4096 for d in list(a[:-2]) + list(b[:-2])):
                return "CPU", f"MatMul batch dims exceed 4096 ({table})"
        return "BPU", f"MatMul ({table})"
    if op == "ReduceMean" or op == "ReduceSum" or op == "ReduceMax":
        if not info.attrs.get("keepdims", 1):
            return "CPU", f"{op} with keepdims=0 ({table})"
        return "BPU", f"{op} ({table})"
    # NOTE: the table forbids Concat and Split along N; hb_mapper 1.24.3 still placed timm's
    # Split along axis 0 of a 5-D tensor on the BPU, so the rule is applied to 4-D tensors only.
    if op in ("Concat", "Split"):
        rank = _rank(info.input_shapes[0] if info.input_shapes else None)
        if rank == 4 and info.attrs.get("axis", 0) % rank == 0:
            return "CPU", f"{op} along N is not supported ({table})"
    return "BPU", f"{op} ({table})"


def _place_x3(info: NodeInfo, chip: Chip, table: str) -> tuple[str, str]:
    op = info.op
    shapes = info.input_shapes
    first = shapes[0] if shapes else None
    if op in ("Conv", "Gemm"):
        return _place_conv_like(info, chip, table)
    if op == "MatMul":
        if any(info.const_inputs):
            return "BPU", f"MatMul with a constant weight becomes a 1x1 Conv ({MEASURED})"
        a, b = shapes[0], shapes[1]
        if a is not None and b is not None and len(a) == 4 and len(b) == 4 and a[0] == 1 and b[0] == 1 and b[1] == 1:
            return "BPU", f"feature map x feature map as 1xBxMxK x 1x1xKxN ({table})"
        return "CPU", f"feature map x feature map MatMul {a} x {b}: bernoulli2 accepts only 1xBxMxK x 1x1xKxN ({table})"
    if _rank(first) is not None and _rank(first) != 4 and op != "Gemm":
        return "CPU", f"{op} on a rank-{_rank(first)} tensor: bernoulli2 runs it on 4-D NCHW only ({table})"
    if op == "ReduceMean":
        axes = [a % 4 for a in info.attrs.get("axes", [])]
        if sorted(axes) != [2, 3]:
            return "CPU", f"ReduceMean over axes {axes}: bernoulli2 reduces only over H and W, axes [2, 3] ({table})"
    if op in ("Add", "Mul", "Concat"):
        channels = max((s[1] for s in shapes if s is not None and len(s) == 4), default=0)
        if channels > 2048:
            return "CPU", f"{op} with C = {channels} exceeds 2048 on bernoulli2 ({table})"
    if op == "Div" and any(info.const_inputs):
        return "CPU", f"Div with a constant input: bernoulli2 needs two feature maps ({table})"
    if op in ("Sqrt", "Sigmoid", "Tanh") and first is not None and _prod(first[1:]) > 8192:
        return "CPU", f"{op} input C*H*W = {_prod(first[1:])} exceeds 8192 on bernoulli2 ({table})"
    if op == "GlobalAveragePool" and first is not None and _prod(first[2:]) > 8192:
        return "CPU", f"GlobalAveragePool H*W = {_prod(first[2:])} exceeds 8192 on bernoulli2 ({table})"
    if op == "Split":
        axis = info.attrs.get("axis", 0) % 4
        if axis == 0:
            return "CPU", f"Split along N: bernoulli2 splits NCHW along axes 1-3 only ({table})"
    return "BPU", f"{op} ({table})"
