"""The LayerNorm pass: each exporter form becomes a normalisation over the NCHW channel axis."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from builders import single_op_model
from conftest import cosine, random_input, run
from onnx import TensorProto, helper, numpy_helper

import vit2bpu

C = 12
RNG = np.random.default_rng(1)
GAMMA = (1 + 0.5 * RNG.standard_normal(C)).astype(np.float32)
GAMMA[[0, 5]] = 0.0  # zeros in gamma must survive the folding
BETA = (0.3 * RNG.standard_normal(C)).astype(np.float32)  # different from gamma
W = RNG.standard_normal((C, 6)).astype(np.float32)


def _chain(square="pow", divide="div", opset=14, epsilon=1e-6, then_linear=False):
    """The decomposed LayerNorm as exporters write it, over the last axis of [1, 7, C]."""
    def mean(src, dst):
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, "axes"], [dst])
        return helper.make_node("ReduceMean", [src], [dst], axes=[-1])

    nodes = [mean("x", "m"), helper.make_node("Sub", ["x", "m"], ["d"])]
    nodes.append(helper.make_node("Pow", ["d", "two"], ["p"]) if square == "pow"
                 else helper.make_node("Mul", ["d", "d"], ["p"]))
    nodes += [mean("p", "v"), helper.make_node("Add", ["v", "eps"], ["e"]), helper.make_node("Sqrt", ["e"], ["s"])]
    if divide == "div":
        nodes.append(helper.make_node("Div", ["d", "s"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["d", "r"], ["n"])]
    nodes += [helper.make_node("Mul", ["n", "gamma"], ["g"]), helper.make_node("Add", ["g", "beta"], ["ln"])]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(epsilon, np.float32), "eps"),
             numpy_helper.from_array(GAMMA, "gamma"), numpy_helper.from_array(BETA, "beta"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    out_channels = C
    if then_linear:
        nodes.append(helper.make_node("MatMul", ["ln", "W"], ["y"]))
        inits.append(numpy_helper.from_array(W, "W"))
        out_channels = W.shape[1]
    else:
        nodes.append(helper.make_node("Identity", ["ln"], ["y"]))
    return single_op_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7, C])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, out_channels])], inits, opset)


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def _check_parity(model, converted):
    feeds = random_input(model)
    expected, got = run(model, feeds)[0], run(converted, feeds)[0]
    assert cosine(expected, got) > 0.999999
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("divide", ["div", "reciprocal"])
@pytest.mark.parametrize("opset", [11, 14, 18])
def test_decomposed_variants(square, divide, opset):
    model = _chain(square, divide, opset)
    converted, report = vit2bpu.convert(model, passes=["layernorm"])
    assert next(r for r in report.passes if r.name == "layernorm").rewritten == 1
    ops = _ops(converted)
    assert ops["Conv"] == 2  # mean and variance
    assert "Pow" not in ops and "ReduceMean" not in ops and "Reciprocal" not in ops
    _check_parity(model, converted)


def test_epsilon_is_the_variance_conv_bias():
    converted, _ = vit2bpu.convert(_chain(epsilon=1e-12), passes=["layernorm"])
    weights = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    convs = [n for n in converted.graph.node if n.op_type == "Conv"]
    mean_conv, var_conv = convs
    assert len(mean_conv.input) == 2
    np.testing.assert_array_equal(weights[var_conv.input[2]], np.array([1e-12], np.float32))
    np.testing.assert_allclose(weights[var_conv.input[1]], np.full((1, C, 1, 1), 1 / C, np.float32))
    assert "Add" not in [n.op_type for n in converted.graph.node if n.output[0] in var_conv.input]


def test_reducemean_form():
    model = _chain()
    converted, _ = vit2bpu.convert(model, passes=["layernorm"], layernorm="reducemean")
    reduces = [n for n in converted.graph.node if n.op_type == "ReduceMean"]
    assert len(reduces) == 2
    assert all(list(n.attribute[0].ints) == [1] for n in reduces if n.attribute[0].name == "axes")
    assert _ops(converted)["Conv"] == 0
    _check_parity(model, converted)


def test_layer_normalization_op_without_attributes():
    ln = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"])  # axis -1, epsilon 1e-5 by default
    model = single_op_model([ln], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7, C])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, C])],
                            [numpy_helper.from_array(GAMMA, "gamma"), numpy_helper.from_array(BETA, "beta")], 17)
    converted, report = vit2bpu.convert(model, passes=["layernorm"])
    assert "LayerNormalization" not in _ops(converted)
    var_conv = [n for n in converted.graph.node if n.op_type == "Conv"][1]
    weights = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    np.testing.assert_array_equal(weights[var_conv.input[2]], np.array([1e-5], np.float32))
    _check_parity(model, converted)


def test_gamma_beta_fold_into_next_conv():
    model = _chain(then_linear=True)
    converted, report = vit2bpu.convert(model, passes=["linear", "layernorm", "fold_norm_affine"])
    ops = _ops(converted)
    assert ops["Conv"] == 3
    assert ops["Mul"] == 1  # only the square: gamma went into the Conv
    assert ops["Add"] == 0  # beta too
    weights = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    linear_conv = [n for n in converted.graph.node if n.op_type == "Conv"][-1]
    folded = weights[linear_conv.input[1]][:, :, 0, 0]
    np.testing.assert_allclose(folded, W.T * GAMMA[None, :], rtol=1e-6)
    assert np.all(folded[:, [0, 5]] == 0)
    np.testing.assert_allclose(weights[linear_conv.input[2]], W.T @ BETA, rtol=1e-5, atol=1e-6)
    _check_parity(model, converted)


def test_no_fold_keeps_affine():
    model = _chain(then_linear=True)
    converted, _ = vit2bpu.convert(model, passes=["linear", "layernorm"], fold_norm_affine=False)
    assert _ops(converted)["Mul"] == 2
    assert _ops(converted)["Add"] == 1
    _check_parity(model, converted)


def test_chain_with_extra_consumer_is_skipped():
    model = _chain()
    model.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 7, 1]))
    converted, report = vit2bpu.convert(model, passes=["layernorm"])
    result = next(r for r in report.passes if r.name == "layernorm")
    assert result.rewritten == 0
    assert "does not feed Sub" in result.skipped[0]["reason"] or "consumers" in result.skipped[0]["reason"]
