"""``--softmax decompose``: Softmax written as ReduceMax, Sub, Exp, ReduceSum and Div."""

from __future__ import annotations

import collections

import numpy as np
import onnx
from conftest import assert_bpu_form, cosine, fixture_path, random_input, run
from onnx import TensorProto, helper

import vit2bpu
from vit2bpu import check


def test_decomposed_block_keeps_parity_and_form():
    path = fixture_path("timm_deit_ts_op14.onnx")
    model, report = vit2bpu.convert(path, softmax="decompose")
    assert_bpu_form(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert "Softmax" not in ops
    assert ops["ReduceMax"] == ops["ReduceSum"] == ops["Exp"] == 2
    assert next(r for r in report.passes if r.name == "softmax").rewritten == 2
    original = onnx.load(str(path))
    feeds = random_input(original, seed=3)
    assert cosine(run(original, feeds)[0], run(model, feeds)[0]) > 0.99999


def test_decomposed_softmax_predicted_on_bpu():
    model, _ = vit2bpu.convert(fixture_path("timm_deit_ts_op14.onnx"), softmax="decompose", parity=False)
    report = check.predict(model, "x5")
    assert [p.op_type for p in report.cpu_nodes()] == ["Reshape"]  # only the output's shape restore


def test_large_scores_do_not_overflow():
    # Scores of 100 overflow exp() in fp32 without the max subtraction.
    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    converted, _ = vit2bpu.convert(model, passes=["softmax"], softmax="decompose", parity=False)
    x = (np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4) * 40.0)
    expected = np.exp(x - x.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(run(converted, {"x": x})[0], expected, rtol=1e-6, atol=1e-7)
