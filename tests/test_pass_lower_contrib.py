"""onnxruntime contrib ops (com.microsoft) lowered to standard ops, checked against onnxruntime's own kernels."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import vit2bpu
from conftest import run
from vit2bpu.errors import UnsupportedModelError

MS = "com.microsoft"
RNG = np.random.default_rng(5)
S, C, H = 6, 16, 4


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _io(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _check(model, atol=2e-5):
    converted, report = vit2bpu.convert(model, passes=[], parity=False)
    assert all(n.domain in ("", "ai.onnx") for n in converted.graph.node)
    feeds = {i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    expected, got = run(model, feeds), run(converted, feeds)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=atol, rtol=1e-4)
    return converted, report


@pytest.mark.parametrize("op, inputs", [("Gelu", ["x"]), ("BiasGelu", ["x", "b"]), ("FastGelu", ["x", "b"]),
                                        ("FastGelu", ["x"]), ("QuickGelu", ["x"])])
def test_gelu_family(op, inputs):
    node = helper.make_node(op, inputs, ["y"], domain=MS)
    converted, _ = _check(_model([node], [_io("x", [1, S, C])], [_io("y", [1, S, C])], [_const("b", [C])]))
    ops = [n.op_type for n in converted.graph.node]
    assert ("Tanh" in ops) == (op == "FastGelu")
    assert ("Erf" in ops) == (op in ("Gelu", "BiasGelu"))


def test_skip_layer_normalization_with_bias_and_sum_output():
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y", "", "", "sum"],
                            domain=MS, epsilon=1e-6)
    model = _model([node], [_io("x", [1, S, C]), _io("skip", [1, S, C])], [_io("y", [1, S, C]), _io("sum", [1, S, C])],
                   [_const("gamma", [C], 1.0), _const("beta", [C]), _const("bias", [C])])
    _check(model)


def test_fused_matmul_trans_b_alpha():
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, transB=1, alpha=0.125)
    _check(_model([node], [_io("a", [1, 2, S, 8]), _io("b", [1, 2, S, 8])], [_io("y", [1, 2, S, S])]))


def test_attention_packed_weights():
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=H)
    model = _model([node], [_io("x", [1, S, C])], [_io("y", [1, S, C])], [_const("w", [C, 3 * C]), _const("b", [3 * C])])
    converted, _ = _check(model)
    assert [n.op_type for n in converted.graph.node].count("Softmax") == 1


def test_multi_head_attention_separate_inputs():
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain=MS, num_heads=H)
    _check(_model([node], [_io("q", [1, S, C]), _io("k", [1, S, C]), _io("v", [1, S, C])], [_io("y", [1, S, C])]))


def test_attention_with_mask_is_rejected_by_name():
    node = helper.make_node("Attention", ["x", "w", "b", "mask"], ["y"], domain=MS, num_heads=H, name="masked_attn")
    mask = helper.make_tensor_value_info("mask", TensorProto.INT32, [1, S])
    model = _model([node], [_io("x", [1, S, C]), mask], [_io("y", [1, S, C])], [_const("w", [C, 3 * C]), _const("b", [3 * C])])
    with pytest.raises(UnsupportedModelError) as error:
        vit2bpu.convert(model, parity=False)
    assert error.value.node == "masked_attn"
    assert "mask" in str(error.value)


def test_unknown_contrib_op_is_rejected_by_name():
    node = helper.make_node("Rfft", ["x"], ["y"], domain=MS, name="spectrum")
    model = _model([node], [_io("x", [1, S, C])], [_io("y", [1, S, C])])
    with pytest.raises(UnsupportedModelError) as error:
        vit2bpu.convert(model, parity=False)
    assert error.value.node == "spectrum"
    assert error.value.op_type == "com.microsoft.Rfft"
