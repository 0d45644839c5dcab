"""Lowering to opset 11: axes and split sizes as attributes, Softmax axis semantics, decomposed ops, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from builders import single_op_model
from conftest import random_input, run
from onnx import TensorProto, helper, numpy_helper

import vit2bpu
from vit2bpu.errors import UnsupportedModelError


def _io(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _convert(model):
    converted, _ = vit2bpu.convert(model, passes=[])
    assert [(o.domain, o.version) for o in converted.opset_import] == [("", 11)]
    feeds = random_input(model)
    np.testing.assert_allclose(run(converted, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-6)
    return converted


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_axes_inputs_become_attributes():
    nodes = [helper.make_node("Unsqueeze", ["x", "ax0"], ["u"]), helper.make_node("Squeeze", ["u", "ax0"], ["s"]),
             helper.make_node("ReduceSum", ["s", "ax1"], ["y"], keepdims=1)]
    model = single_op_model(nodes, [_io("x", [2, 3, 4])], [_io("y", [2, 1, 4])],
                            [numpy_helper.from_array(np.array([0], np.int64), "ax0"),
                             numpy_helper.from_array(np.array([1], np.int64), "ax1")], opset=13)
    converted = _convert(model)
    for node in converted.graph.node:
        assert len(node.input) == 1, node.op_type
        assert "axes" in _attrs(node)


def test_split_sizes_input_and_num_outputs():
    sizes = numpy_helper.from_array(np.array([1, 3], np.int64), "sizes")
    model13 = single_op_model([helper.make_node("Split", ["x", "sizes"], ["a", "y"], axis=1)],
                              [_io("x", [2, 4])], [_io("y", [2, 3])], [sizes], opset=13)
    assert _attrs(_convert(model13).graph.node[0])["split"] == [1, 3]
    model18 = single_op_model([helper.make_node("Split", ["x"], ["a", "b", "y"], axis=1, num_outputs=3)],
                              [_io("x", [2, 7])], [_io("y", [2, 1])], [], opset=18)
    assert _attrs(_convert(model18).graph.node[0])["split"] == [3, 3, 1]


def test_softmax_on_inner_axis_keeps_opset13_meaning():
    model = single_op_model([helper.make_node("Softmax", ["x"], ["y"], axis=1)], [_io("x", [2, 3, 4])],
                            [_io("y", [2, 3, 4])], opset=13)
    converted = _convert(model)
    assert [n.op_type for n in converted.graph.node] == ["Transpose", "Softmax", "Transpose"]


def test_softmax_default_axis_becomes_explicit_last():
    model = single_op_model([helper.make_node("Softmax", ["x"], ["y"])], [_io("x", [2, 3, 4])], [_io("y", [2, 3, 4])],
                            opset=13)
    assert _attrs(_convert(model).graph.node[0])["axis"] == 2


def _gelu_reference(x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_op_lowered(approximate):
    model = single_op_model([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)], [_io("x", [2, 8])],
                            [_io("y", [2, 8])], opset=20)
    # Compared with numpy, not onnxruntime: onnxruntime before 1.17 cannot run opset 20.
    converted, _ = vit2bpu.convert(model, passes=[], parity=False)
    ops = [n.op_type for n in converted.graph.node]
    assert ("Erf" in ops) == (approximate == "none")
    assert ("Tanh" in ops) == (approximate == "tanh")
    x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(run(converted, {"x": x})[0], _gelu_reference(x.astype(np.float64), approximate),
                               rtol=1e-5, atol=1e-6)


def test_reshape_allowzero_with_zero_is_rejected_by_name():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape", allowzero=1)
    model = single_op_model([node], [_io("x", [2, 4])], [_io("y", [2, 4])],
                            [numpy_helper.from_array(np.array([0, 4], np.int64), "shape")], opset=14)
    with pytest.raises(UnsupportedModelError) as error:
        vit2bpu.convert(model, parity=False)
    assert error.value.node == "bad_reshape"
    assert error.value.op_type == "Reshape"
    assert "allowzero" in str(error.value)


def test_op_without_opset11_form_is_rejected_by_name():
    node = helper.make_node("Trilu", ["x"], ["y"], name="triangle")
    model = single_op_model([node], [_io("x", [4, 4])], [_io("y", [4, 4])], opset=14)
    with pytest.raises(UnsupportedModelError) as error:
        vit2bpu.convert(model, parity=False)
    assert error.value.node == "triangle"
    assert error.value.exit_code == 4


def test_opset10_is_upgraded():
    model = single_op_model([helper.make_node("Relu", ["x"], ["y"])], [_io("x", [2, 3])], [_io("y", [2, 3])], opset=10)
    _convert(model)


def test_opset_newer_than_installed_onnx_is_an_input_error():
    import onnx

    from vit2bpu.errors import InputModelError

    model = single_op_model([helper.make_node("Relu", ["x"], ["y"])], [_io("x", [2, 3])], [_io("y", [2, 3])], opset=14)
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    with pytest.raises(InputModelError) as error:
        vit2bpu.convert(model, parity=False)
    assert f"opset {onnx.defs.onnx_opset_version() + 1}" in str(error.value)
    assert error.value.exit_code == 3
