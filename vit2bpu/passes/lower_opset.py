"""Rewrite every node into its opset-11 form.

The BPU toolchain reads only opset 10 and 11, and onnx's version converter
cannot take ViT exports from opset 13 or 17 down to 11, so vit2bpu lowers each
node itself and the rest of the pipeline works on an opset-11 graph.

For each default-domain node the schema in force at the model's opset is
compared with the one in force at opset 11:

1. same schema: the node is kept;
2. the op changed only by gaining element types or optional attributes that are
   at their defaults: the node is kept and those attributes dropped;
3. a lowering is known (axes and split sizes as attributes, Softmax on a
   non-last axis, LayerNormalization, Gelu, ...): the node is rewritten;
4. otherwise the conversion stops with an error that names the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UnsupportedModelError
from ..decompose import emit_attention, emit_gelu, emit_layer_norm
from ..graph import GraphEditor, attr, const_value, infer_shapes, rank_of, replace_tensor
from ..pass_manager import Pass, PassContext, PassResult

TARGET_OPSET = 11

# Ops whose later versions only added element types (bfloat16, more integer
# types) or inputs and attributes that default to the opset-11 behaviour.
TYPE_EXTENSIONS = {
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip",
    "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "DepthToSpace", "Div", "Elu", "Equal",
    "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "HardSigmoid", "Identity", "InstanceNormalization",
    "IsInf", "IsNaN", "LeakyRelu", "Less", "Log", "LRN", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mod",
    "Mul", "Neg", "NonZero", "Not", "Or", "Pad", "Pow", "PRelu", "Range", "Reciprocal", "Relu", "Round",
    "ScatterElements", "ScatterND", "Selu", "Shape", "Sigmoid", "Sign", "Size", "Slice", "Softplus",
    "Softsign", "SpaceToDepth", "Sqrt", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Where", "Xor",
}

# Attributes later opsets added, with the value that means "behave as opset 11".
DEFAULTED_ATTRIBUTES = {
    "ArgMax": {"select_last_index": 0},
    "ArgMin": {"select_last_index": 0},
    "AveragePool": {"dilations": None},
    "BatchNormalization": {"training_mode": 0},
    "Cast": {"saturate": 1, "round_mode": "up"},
    "GatherND": {"batch_dims": 0},
    "ScatterElements": {"reduction": "none"},
    "ScatterND": {"reduction": "none"},
    "Pad": {},
    "Shape": {"start": 0},
}

REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def _unsupported(node: gs.Node, message: str, hint: str | None = None) -> UnsupportedModelError:
    return UnsupportedModelError(message, node=node.name, op_type=node.op,
                                 hint=hint or "please report this op with the exporter and opset that produced it")


def _const_input(node: gs.Node, index: int, what: str) -> np.ndarray | None:
    """Return input ``index`` as an array; None when the input is absent; raise when it is not constant."""
    if len(node.inputs) <= index or node.inputs[index].name == "":
        return None
    value = const_value(node.inputs[index])
    if value is None:
        raise _unsupported(node, f"{what} must be a constant to be written at opset 11, but it is computed at run time",
                           hint="pin the input shapes with --input-shape so the value can be folded")
    return value


class LowerToOpset11(Pass):
    name = "lower_opset"
    summary = "rewrite every node into its opset-11 form"

    def apply(self, graph: gs.Graph, editor: GraphEditor, ctx: PassContext, result: PassResult) -> None:
        source_opset = ctx.opset
        for node in list(graph.nodes):
            if node.domain not in ("", "ai.onnx", None):
                continue  # other domains are lowered by their own passes or rejected when the model is finished
            lowering = _LOWERINGS.get(node.op)
            current = _schema_version(node.op, source_opset)
            # current is None for ops written above their opset, e.g. LayerNormalization in the
            # opset-14 graphs onnxruntime's optimizer saves.
            if lowering is not None and (current is None or current != _schema_version(node.op, TARGET_OPSET)):
                if lowering(node, graph, editor):
                    result.rewritten += 1
                    result.record(node.name, node.name)
                continue
            self._keep_or_reject(node, source_opset, result)
        ctx.opset = TARGET_OPSET
        graph.opset = TARGET_OPSET
        # Decompositions of ops with 3-D inputs leave some shapes open; infer them at opset 11.
        infer_shapes(graph)

    def _keep_or_reject(self, node: gs.Node, source_opset: int, result: PassResult) -> None:
        old = _schema_version(node.op, TARGET_OPSET)
        if old is None:
            raise _unsupported(node, f"{node.op} does not exist at opset 11 and vit2bpu has no lowering for it")
        if old == _schema_version(node.op, source_opset):
            return
        if node.op not in TYPE_EXTENSIONS:
            raise _unsupported(node, f"{node.op} changed between opset 11 and {source_opset} and vit2bpu has no lowering for it")
        schema = onnx.defs.get_schema(node.op, TARGET_OPSET, "")
        defaults = DEFAULTED_ATTRIBUTES.get(node.op, {})
        for name in list(node.attrs):
            if name in schema.attributes:
                continue
            if name in defaults and (defaults[name] is None or node.attrs[name] == defaults[name]):
                del node.attrs[name]
                continue
            if node.op == "AveragePool" and name == "dilations" and all(d == 1 for d in node.attrs[name]):
                del node.attrs[name]
                continue
            raise _unsupported(node, f"attribute {name}={node.attrs[name]!r} has no opset-11 equivalent")
        if len(node.inputs) > schema.max_input:
            extra = [t.name for t in node.inputs[schema.max_input:] if t.name]
            if extra:
                raise _unsupported(node, f"inputs {extra} have no opset-11 equivalent")
            node.inputs = node.inputs[:schema.max_input]


def _schema_version(op: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


def _axes_to_attribute(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    """Squeeze, Unsqueeze (opset 13) and the Reduce ops (13/18) take axes as an input; opset 11 wants an attribute."""
    axes = _const_input(node, 1, "axes")
    node.inputs = node.inputs[:1]
    if axes is not None:
        node.attrs["axes"] = [int(a) for a in axes.reshape(-1)]
    noop = node.attrs.pop("noop_with_empty_axes", 0)
    if node.op in REDUCE_OPS and noop and not node.attrs.get("axes"):
        _bypass(node, graph)
    return True


def _split(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    """Split takes its sizes as an input from opset 13 and as num_outputs from 18; opset 11 wants ``split``."""
    sizes = _const_input(node, 1, "split sizes")
    node.inputs = node.inputs[:1]
    num_outputs = node.attrs.pop("num_outputs", None)
    if sizes is None:
        axis = attr(node, "axis", 0)
        shape = node.inputs[0].shape
        if shape is None or not isinstance(shape[axis], int):
            raise _unsupported(node, "the split axis has no static size", hint="pin the input shapes with --input-shape")
        count = num_outputs or len(node.outputs)
        total = shape[axis]
        chunk = -(-total // count)  # ceil: opset 18 makes the last chunk the smaller one
        sizes = np.array([min(chunk, total - i * chunk) for i in range(count)])
    node.attrs["split"] = [int(s) for s in sizes.reshape(-1)]
    return True


def _softmax(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    """From opset 13 Softmax normalises one axis; at opset 11 it flattens everything from ``axis`` on.

    Both agree when the axis is the last one; any other axis is moved last with a
    Transpose pair.
    """
    rank = rank_of(node.inputs[0])
    axis = attr(node, "axis", -1)
    if rank is None:
        raise _unsupported(node, "the input rank is unknown", hint="pin the input shapes with --input-shape")
    axis = axis % rank
    node.attrs["axis"] = rank - 1
    if axis == rank - 1:
        return True
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    x = node.inputs[0]
    shape = list(x.shape)
    moved = [shape[p] for p in perm]
    xt = editor.out("Transpose", f"{node.name}/to_last", [x], attrs={"perm": perm}, dtype=x.dtype, shape=moved)
    y = node.outputs[0]
    yt = editor.variable(f"{node.name}/output_last", y.dtype, moved)
    node.inputs = [xt]
    node.outputs = [yt]
    editor.node("Transpose", f"{node.name}/from_last", [yt], attrs={"perm": perm}, outputs=[y])
    return True


def _reshape(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    """Opset 14 added ``allowzero``; with 1 a zero in the target means size 0, which opset 11 cannot say."""
    allowzero = node.attrs.pop("allowzero", 0)
    if allowzero:
        target = const_value(node.inputs[1])
        if target is None:
            raise _unsupported(node, "allowzero=1 with a target shape computed at run time",
                               hint="pin the input shapes with --input-shape so the target can be folded")
        if np.any(target == 0):
            raise _unsupported(node, "allowzero=1 with a zero in the target shape has no opset-11 form")
    return True


def _dropout(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        raise _unsupported(node, "the Dropout mask output is used")
    _bypass(node, graph)
    return True


def _bypass(node: gs.Node, graph: gs.Graph) -> None:
    """Remove a node that is the identity at inference time."""
    x, y = node.inputs[0], node.outputs[0]
    node.outputs = []
    node.inputs = []
    replace_tensor(graph, y, x)


def _layer_normalization(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    """Decompose LayerNormalization (opset 17) into the ReduceMean chain opset 11 can express."""
    if any(out.outputs or out in graph.outputs for out in node.outputs[1:]):
        raise _unsupported(node, "the Mean or InvStdDev output is used; only Y can be lowered")
    x, scale = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if rank_of(x) is None:
        raise _unsupported(node, "the input rank is unknown", hint="pin the input shapes with --input-shape")
    y = node.outputs[0]
    node.inputs, node.outputs = [], []
    emit_layer_norm(editor, x, scale, bias, y, node.name, axis=attr(node, "axis", -1),
                    epsilon=float(attr(node, "epsilon", 1e-5)), stash_type=attr(node, "stash_type", 1))
    return True


def _gelu(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    """Decompose Gelu (opset 20): the exact form into the Erf chain, the tanh form into its polynomial."""
    x, y = node.inputs[0], node.outputs[0]
    approximate = attr(node, "approximate", "none")
    emit_gelu(editor, x, y, node.name, approximate)
    node.inputs, node.outputs = [], []
    return True


def _attention(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    """Decompose the Attention op (opset 23) into MatMul, Softmax and MatMul.

    4-D inputs ``[B, H, S, D]`` are used as they are; 3-D inputs ``[B, S, H*D]``
    are split into heads with ``q_num_heads``/``kv_num_heads`` and merged back.
    """
    if attr(node, "is_causal", 0):
        raise _unsupported(node, "causal attention is not a ViT pattern vit2bpu converts")
    if attr(node, "softcap", 0.0):
        raise _unsupported(node, "softcap has no opset-11 form in vit2bpu")
    if any(t.name for t in node.inputs[4:]) or any(o.outputs or o in graph.outputs for o in node.outputs[1:]):
        raise _unsupported(node, "past key/value inputs or extra outputs are used")
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    y = node.outputs[0]
    node.inputs, node.outputs = [], []
    scale = attr(node, "scale")
    if rank_of(q) == 4:
        emit_attention(editor, q, k, v, y, node.name, scale=scale, mask=mask)
        return True
    q_heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
    if rank_of(q) != 3 or not q_heads or q_heads != kv_heads:
        raise _unsupported(node, "3-D inputs need equal q_num_heads and kv_num_heads")
    dtype = q.dtype

    def split_heads(tensor: gs.Tensor, role: str) -> gs.Variable:
        four = editor.out("Reshape", f"{node.name}/{role}_heads",
                          [tensor, editor.constant(f"{node.name}/{role}_shape", np.array([0, 0, q_heads, -1], np.int64))],
                          dtype=dtype, shape=None)
        return editor.out("Transpose", f"{node.name}/{role}_transpose", [four], attrs={"perm": [0, 2, 1, 3]},
                          dtype=dtype, shape=None)

    context = editor.variable(f"{node.name}/context", dtype, None)
    emit_attention(editor, split_heads(q, "q"), split_heads(k, "k"), split_heads(v, "v"), context, node.name,
                   scale=scale, mask=mask)
    moved = editor.out("Transpose", f"{node.name}/merge_transpose", [context], attrs={"perm": [0, 2, 1, 3]},
                       dtype=dtype, shape=None)
    editor.node("Reshape", f"{node.name}/merge_heads",
                [moved, editor.constant(f"{node.name}/merge_shape", np.array([0, 0, -1], np.int64))], outputs=[y])
    return True


def _shape(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
    """Shape with start/end (opset 15) becomes Shape followed by Slice."""
    start = node.attrs.pop("start", 0)
    end = node.attrs.pop("end", None)
    if start == 0 and end is None:
        return True
    y = node.outputs[0]
    full = editor.variable(f"{node.name}/full", np.int64, [rank_of(node.inputs[0])])
    node.outputs = [full]
    limit = np.iinfo(np.int64).max if end is None else end
    editor.node("Slice", f"{node.name}/slice",
                [full, editor.constant(f"{node.name}/starts", np.array([start], np.int64)),
                 editor.constant(f"{node.name}/ends", np.array([limit], np.int64))], outputs=[y])
    return True


def _comparison_or_equal(op: str):
    """GreaterOrEqual and LessOrEqual (opset 12) become Not(Less) and Not(Greater)."""
    inverse = {"GreaterOrEqual": "Less", "LessOrEqual": "Greater"}[op]

    def lower(node: gs.Node, graph: gs.Graph, editor: GraphEditor) -> bool:
        y = node.outputs[0]
        compared = editor.out(inverse, f"{node.name}/{inverse.lower()}", list(node.inputs), dtype=np.bool_, shape=y.shape)
        node.inputs, node.outputs = [], []
        editor.node("Not", f"{node.name}/not", [compared], outputs=[y])
        return True

    return lower


_LOWERINGS = {
    "Squeeze": _axes_to_attribute,
    "Unsqueeze": _axes_to_attribute,
    **{op: _axes_to_attribute for op in REDUCE_OPS},
    "Split": _split,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Hardmax": _softmax,
    "Reshape": _reshape,
    "Dropout": _dropout,
    "LayerNormalization": _layer_normalization,
    "Gelu": _gelu,
    "Attention": _attention,
    "Shape": _shape,
    "GreaterOrEqual": _comparison_or_equal("GreaterOrEqual"),
    "LessOrEqual": _comparison_or_equal("LessOrEqual"),
}
