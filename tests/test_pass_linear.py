"""The linear pass: every Linear form becomes a 1x1 Conv with the weights it had."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from builders import single_op_model
from conftest import cosine, random_input, run
from onnx import TensorProto, helper, numpy_helper

import vit2bpu

RNG = np.random.default_rng(0)
W = RNG.standard_normal((16, 8)).astype(np.float32)
B = RNG.standard_normal(8).astype(np.float32)


def _model(nodes, x_shape, y_shape, inits, opset=14):
    return single_op_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits, opset)


def _convert_linear_only(model):
    return vit2bpu.convert(model, passes=["linear"])


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("bias_first", [True, False])
def test_matmul_add_either_order(bias_first):
    add_inputs = ["b", "mm"] if bias_first else ["mm", "b"]
    model = _model([helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", add_inputs, ["y"])],
                   [1, 5, 16], [1, 5, 8], [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")])
    converted, report = _convert_linear_only(model)
    ops = _ops(converted)
    assert ops["Conv"] == 1
    assert "MatMul" not in ops and "Add" not in ops
    conv = next(n for n in converted.graph.node if n.op_type == "Conv")
    weights = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    np.testing.assert_array_equal(weights[conv.input[1]], W.T[:, :, None, None])
    np.testing.assert_array_equal(weights[conv.input[2]], B)
    assert report.parity[0].max_abs_error < 1e-5


def test_matmul_without_bias():
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [1, 5, 16], [1, 5, 8],
                   [numpy_helper.from_array(W, "W")])
    converted, _ = _convert_linear_only(model)
    conv = next(n for n in converted.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 2


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b_alpha_beta(trans_b):
    weight = W.T.copy() if trans_b else W
    gemm = helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=trans_b, alpha=0.5, beta=2.0)
    model = _model([gemm], [3, 16], [3, 8], [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(B, "b")])
    converted, report = _convert_linear_only(model)
    assert _ops(converted)["Conv"] == 1
    assert "Gemm" not in _ops(converted)
    feeds = random_input(model)
    np.testing.assert_allclose(run(converted, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_weight_behind_transpose_node():
    # do_constant_folding=False keeps the PyTorch [Cout, Cin] weight behind a Transpose node.
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]), helper.make_node("MatMul", ["x", "W"], ["mm"]),
             helper.make_node("Add", ["b", "mm"], ["y"])]
    model = _model(nodes, [1, 5, 16], [1, 5, 8],
                   [numpy_helper.from_array(W.T.copy(), "Wt"), numpy_helper.from_array(B, "b")])
    converted, report = _convert_linear_only(model)
    assert _ops(converted)["Conv"] == 1
    assert "MatMul" not in _ops(converted)
    assert cosine(*[run(m, random_input(model))[0] for m in (model, converted)]) > 0.999999


def test_activation_times_activation_left_alone():
    model = single_op_model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2, 5, 4]),
                             helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2, 4, 5])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5, 5])])
    converted, report = _convert_linear_only(model)
    assert _ops(converted) == {"MatMul": 1}
    assert any("no transformer pattern" in w for w in report.warnings)


def test_rank4_input_is_reported_not_converted():
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [1, 2, 5, 16], [1, 2, 5, 8],
                   [numpy_helper.from_array(W, "W")])
    converted, report = _convert_linear_only(model)
    assert _ops(converted) == {"MatMul": 1}
    skipped = next(r for r in report.passes if r.name == "linear").skipped
    assert skipped[0]["reason"].startswith("input has rank 4")
    assert report.unconverted[0]["op_type"] == "MatMul"
    assert "constant operand" in report.unconverted[0]["reason"]
