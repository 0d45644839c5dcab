"""Opset-11 emitters for composite ops: LayerNorm, GELU and scaled dot-product attention.

The lowering passes call these to replace LayerNormalization, Gelu, Attention
and onnxruntime's contrib ops with the standard chains the pattern passes
match. Every emitter writes ``y`` (an existing variable) as its last output.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import UnsupportedModelError
from .graph import GraphEditor, rank_of


def _const_dtype(tensor: gs.Tensor):
    return tensor.values.dtype if isinstance(tensor, gs.Constant) else np.float32


def _scalar(value: float, dtype) -> np.ndarray:
    return np.array(value, dtype=dtype)


def reduce_mean(editor: GraphEditor, x: gs.Tensor, axes: list[int], base: str, dtype, shape, opset: int = 11):
    """ReduceMean with keepdims, its axes as an attribute (opset < 18) or an input (opset >= 18)."""
    if opset >= 18:
        return editor.out("ReduceMean", base, [x, editor.constant(f"{base}/axes", np.array(axes, np.int64))],
                          attrs={"keepdims": 1}, dtype=dtype, shape=shape)
    return editor.out("ReduceMean", base, [x], attrs={"axes": axes, "keepdims": 1}, dtype=dtype, shape=shape)


def emit_layer_norm(editor: GraphEditor, x: gs.Tensor, scale: gs.Tensor, bias: gs.Tensor | None, y: gs.Variable,
                    base: str, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1, opset: int = 11) -> None:
    """Write ``y = LayerNorm(x)`` over axes ``axis..`` as ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div, Mul, Add.

    With fp16 input and ``stash_type`` 1 the statistics are computed in fp32, as
    LayerNormalization specifies. ``opset`` decides how ReduceMean takes its axes.
    """
    rank = rank_of(x)
    if rank is None:
        # Before shape inference (onnxruntime's graphs cannot be inferred through their contrib ops)
        # only the last-axis form can be written; pin_shapes fills in the shapes afterwards.
        if axis != -1:
            raise UnsupportedModelError(f"LayerNorm over axis {axis} of a tensor of unknown rank", node=base,
                                        hint="pin the input shapes with --input-shape")
        axes, shape, stat_shape = [-1], None, None
    else:
        axis = axis % rank
        axes = list(range(axis, rank))
        shape = list(x.shape)
        stat_shape = shape[:axis] + [1] * (rank - axis)
    dtype = np.dtype(x.dtype if x.dtype is not None else _const_dtype(scale))
    compute = dtype
    if dtype != np.float32 and stash_type == 1:
        compute = np.dtype(np.float32)
        x = editor.out("Cast", f"{base}/cast_in", [x], attrs={"to": onnx.TensorProto.FLOAT}, dtype=compute, shape=shape)
    mean = reduce_mean(editor, x, axes, f"{base}/mean", compute, stat_shape, opset)
    centred = editor.out("Sub", f"{base}/sub", [x, mean], dtype=compute, shape=shape)
    square = editor.out("Mul", f"{base}/square", [centred, centred], dtype=compute, shape=shape)
    var = reduce_mean(editor, square, axes, f"{base}/var", compute, stat_shape, opset)
    var_eps = editor.out("Add", f"{base}/add_eps", [var, editor.constant(f"{base}/epsilon", _scalar(epsilon, compute))],
                         dtype=compute, shape=stat_shape)
    std = editor.out("Sqrt", f"{base}/std", [var_eps], dtype=compute, shape=stat_shape)
    normed = editor.out("Div", f"{base}/normalize", [centred, std], dtype=compute, shape=shape)
    if compute != dtype:
        normed = editor.out("Cast", f"{base}/cast_out", [normed], attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)},
                            dtype=dtype, shape=shape)
    if bias is None:
        editor.node("Mul", f"{base}/scale", [normed, scale], outputs=[y])
    else:
        scaled = editor.out("Mul", f"{base}/scale", [normed, scale], dtype=dtype, shape=shape)
        editor.node("Add", f"{base}/bias", [scaled, bias], outputs=[y])


def emit_gelu(editor: GraphEditor, x: gs.Tensor, y: gs.Variable, base: str, approximate: str = "none") -> None:
    """Write ``y = GELU(x)`` with opset-11 ops, exact (Erf) or the tanh approximation."""
    dtype = np.dtype(x.dtype if x.dtype is not None else np.float32)
    shape = x.shape
    half = editor.constant(f"{base}/half", _scalar(0.5, dtype))
    one = editor.constant(f"{base}/one", _scalar(1.0, dtype))
    if approximate == "tanh":
        cube = editor.out("Mul", f"{base}/square", [x, x], dtype=dtype, shape=shape)
        cube = editor.out("Mul", f"{base}/cube", [cube, x], dtype=dtype, shape=shape)
        cube = editor.out("Mul", f"{base}/cube_coeff", [cube, editor.constant(f"{base}/coeff", _scalar(0.044715, dtype))],
                          dtype=dtype, shape=shape)
        inner = editor.out("Add", f"{base}/inner", [x, cube], dtype=dtype, shape=shape)
        inner = editor.out("Mul", f"{base}/inner_scale",
                           [inner, editor.constant(f"{base}/sqrt_2_over_pi", _scalar(math.sqrt(2.0 / math.pi), dtype))],
                           dtype=dtype, shape=shape)
        core = editor.out("Tanh", f"{base}/tanh", [inner], dtype=dtype, shape=shape)
    elif approximate == "none":
        scaled = editor.out("Div", f"{base}/div_sqrt2", [x, editor.constant(f"{base}/sqrt2", _scalar(math.sqrt(2.0), dtype))],
                            dtype=dtype, shape=shape)
        core = editor.out("Erf", f"{base}/erf", [scaled], dtype=dtype, shape=shape)
    else:
        raise UnsupportedModelError(f"unknown Gelu approximation '{approximate}'", node=base, op_type="Gelu")
    plus_one = editor.out("Add", f"{base}/add_one", [core, one], dtype=dtype, shape=shape)
    times_x = editor.out("Mul", f"{base}/mul_x", [x, plus_one], dtype=dtype, shape=shape)
    editor.node("Mul", f"{base}/mul_half", [times_x, half], outputs=[y])


def emit_attention(editor: GraphEditor, q: gs.Tensor, k: gs.Tensor, v: gs.Tensor, y: gs.Variable, base: str, *,
                   scale: float | None = None, mask: gs.Tensor | None = None) -> None:
    """Write ``y = softmax(q k^T * scale + mask) v`` for 4-D ``q [B, H, S, D]``, ``k [B, H, L, D]``, ``v [B, H, L, Dv]``.

    The scale (default 1/sqrt(D)) multiplies q, as timm writes it; a boolean mask
    selects with Where, any other mask is added to the scores.
    """
    dtype = np.dtype(q.dtype) if q.dtype is not None else np.dtype(np.float32)
    q_shape, k_shape = list(q.shape or []), list(k.shape or [])
    head_dim = q_shape[-1] if q_shape else None
    if scale is None:
        if not isinstance(head_dim, int):
            raise UnsupportedModelError("the head size is unknown, so the default scale cannot be computed", node=base,
                                        hint="pin the input shapes with --input-shape")
        scale = 1.0 / math.sqrt(head_dim)
    scores_shape = None
    if len(q_shape) == 4 and len(k_shape) == 4:
        scores_shape = q_shape[:3] + [k_shape[2]]
    k_t_shape = None if len(k_shape) != 4 else [k_shape[0], k_shape[1], k_shape[3], k_shape[2]]
    scaled = editor.out("Mul", f"{base}/scale_q", [q, editor.constant(f"{base}/scale", _scalar(scale, dtype))],
                        dtype=dtype, shape=q_shape or None)
    k_t = editor.out("Transpose", f"{base}/k_transpose", [k], attrs={"perm": [0, 1, 3, 2]}, dtype=dtype, shape=k_t_shape)
    scores = editor.out("MatMul", f"{base}/scores", [scaled, k_t], dtype=dtype, shape=scores_shape)
    if mask is not None:
        if mask.dtype is not None and np.dtype(mask.dtype) == np.bool_:
            lowest = editor.constant(f"{base}/masked", _scalar(np.finfo(dtype).min, dtype))
            scores = editor.out("Where", f"{base}/mask", [mask, scores, lowest], dtype=dtype, shape=scores_shape)
        else:
            scores = editor.out("Add", f"{base}/mask", [scores, mask], dtype=dtype, shape=scores_shape)
    probs = editor.out("Softmax", f"{base}/softmax", [scores], attrs={"axis": 3}, dtype=dtype, shape=scores_shape)
    editor.node("MatMul", f"{base}/context", [probs, v], outputs=[y])
