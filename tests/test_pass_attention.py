"""The attention pass: heads on the channel axis, separate q/k/v Convs, scales folded, no rank-5 tensor."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from builders import ViTSpec, build_vit
from conftest import assert_bpu_form, cosine, fixture_path, random_input, run
from onnx import helper, numpy_helper

import vit2bpu
from vit2bpu.passes.attention import AttentionRejected, measure_gather


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("attention", ["timm", "hf"])
@pytest.mark.parametrize("scale_on", ["q", "scores"])
def test_block_converts(attention, scale_on):
    model = build_vit(ViTSpec(attention=attention, scale_on=scale_on, width=24, heads=3, grid=(3, 3)))
    converted, report = vit2bpu.convert(model)
    assert next(r for r in report.passes if r.name == "attention").rewritten == 1
    assert_bpu_form(converted)
    feeds = random_input(model)
    assert cosine(run(model, feeds)[0], run(converted, feeds)[0]) > 0.999999


def test_scale_folded_into_q_weights():
    spec = ViTSpec(attention="hf", scale_on="q", width=8, heads=2, depth=1, grid=(1, 2), class_token=False)
    model = build_vit(spec)
    converted, _ = vit2bpu.convert(model, passes=["linear", "attention"])
    ops = _ops(converted)
    # q, k, v and the projection are Convs; the scale Mul is gone.
    assert ops["Conv"] >= 5
    scores = [n for n in converted.graph.node if n.op_type == "MatMul"][0]
    producers = {o: n for n in converted.graph.node for o in n.output}
    assert producers[scores.input[0]].op_type == "Transpose"
    assert producers[scores.input[1]].op_type == "Reshape"
    original_weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    query = next(v for k, v in original_weights.items() if k.startswith("query_weight"))
    weights = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    q_conv = next(n for n in converted.graph.node if n.op_type == "Conv" and n.name.endswith("/q/conv"))
    np.testing.assert_allclose(weights[q_conv.input[1]][:, :, 0, 0], query.T * (4 ** -0.5), rtol=1e-6)


def test_heads_are_on_the_channel_axis():
    model = build_vit(ViTSpec(width=12, heads=3, grid=(2, 2)))
    converted, _ = vit2bpu.convert(model)
    inferred = onnx.shape_inference.infer_shapes(converted)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    softmax = next(n for n in converted.graph.node if n.op_type == "Softmax")
    assert shapes[softmax.output[0]] == [1, 3, 5, 5]
    merge = next(n for n in converted.graph.node if n.name.endswith("/merge_heads"))
    assert shapes[merge.output[0]] == [1, 12, 1, 5]


def test_inner_axis_softmax_left_listed():
    model = build_vit(ViTSpec(opset=11, width=8, heads=2, grid=(1, 2)))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.attribute[0].i = 2  # opset-11 Softmax over [N, N] flattened: not attention as exported
    converted, report = vit2bpu.convert(model, parity=True)
    result = next(r for r in report.passes if r.name == "attention")
    assert result.rewritten == 0
    assert "not over the last axis" in result.skipped[0]["reason"]
    assert report.unconverted  # the 3-D/5-D attention nodes are listed
    assert report.parity_passed


def _probe_graph(nodes, inits, source_shape):
    import onnx_graphsurgeon as gs

    from vit2bpu.graph import infer_shapes

    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("src", onnx.TensorProto.FLOAT, source_shape)],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)], inits)))
    graph.toposort()
    infer_shapes(graph)
    return graph


def test_measure_gather_finds_channels_and_scale():
    # [1, 4, 12] -> [1, 4, 3, 2, 2] -> perm (2, 0, 3, 1, 4) -> take part 1 -> [1, 2, 4, 2] * 0.5
    nodes = [helper.make_node("Reshape", ["src", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 3, 1, 4]),
             helper.make_node("Gather", ["t", "one"], ["g"], axis=0),
             helper.make_node("Mul", ["g", "half"], ["out"])]
    inits = [numpy_helper.from_array(np.array([1, 4, 3, 2, 2], np.int64), "shape"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    graph = _probe_graph(nodes, inits, [1, 4, 12])
    tensors = graph.tensors()
    channel_map, scale = measure_gather(graph.nodes, tensors["src"], [tensors["out"]], [2], [[1, 3]])[0]
    assert scale == 0.5
    np.testing.assert_array_equal(channel_map, np.array([[4, 5], [6, 7]]))


def test_measure_gather_rejects_token_mixing():
    nodes = [helper.make_node("Transpose", ["src"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["out"])]
    inits = [numpy_helper.from_array(np.array([1, 1, 4, 4], np.int64), "shape")]
    graph = _probe_graph(nodes, inits, [1, 4, 4])
    tensors = graph.tensors()
    with pytest.raises(AttentionRejected):
        measure_gather(graph.nodes, tensors["src"], [tensors["out"]], [2], [[1, 3]])


def test_blocks_only_model_with_token_input():
    model = build_vit(ViTSpec(tokens_input=True, depth=2, width=24, heads=3, grid=(3, 4)))
    converted, report = vit2bpu.convert(model)
    assert_bpu_form(converted)
    assert report.unconverted == []
    ops = collections.Counter(n.op_type for n in converted.graph.node)
    # One layout change in (Transpose + Reshape) and one out (Reshape + Transpose), three per block.
    assert ops["Transpose"] == 2 + 3 * 2
    feeds = random_input(model)
    assert cosine(run(model, feeds)[0], run(converted, feeds)[0]) > 0.999999


def test_scores_scale_folded_and_guards_dropped():
    converted, _ = vit2bpu.convert(fixture_path("hf_vit_sdpa_dynamo_op18.onnx"), parity=False)
    ops = collections.Counter(n.op_type for n in converted.graph.node)
    assert "IsNaN" not in ops
    assert "Where" not in ops
    assert "Cast" not in ops
    converted, _ = vit2bpu.convert(fixture_path("hf_deit_teacher_eager_op14.onnx"), parity=False)
    softmax_inputs = {n.input[0] for n in converted.graph.node if n.op_type == "Softmax"}
    producers = {o: n.op_type for n in converted.graph.node for o in n.output}
    assert {producers[t] for t in softmax_inputs} == {"MatMul"}  # the 1/sqrt(d) Mul went into the q weights


def test_guard_kept_when_a_mask_holds_minus_infinity():
    spec = ViTSpec(width=8, heads=2, grid=(1, 3), opset=14, scale_on="scores")
    model = build_vit(spec)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    scores = softmax.input[0]
    mask = np.zeros((1, 1, 4, 4), np.float32)
    mask[..., 3] = -np.inf  # every query ignores the last token; no row is fully masked
    model.graph.initializer.append(numpy_helper.from_array(mask, "mask"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    masked, probs = "masked_scores", softmax.output[0]
    model.graph.node.insert(list(model.graph.node).index(softmax), helper.make_node("Add", [scores, "mask"], [masked]))
    softmax.input[0] = masked
    consumer = next(n for n in model.graph.node if probs in n.input and n.op_type == "MatMul")
    model.graph.node.insert(list(model.graph.node).index(consumer),
                            helper.make_node("IsNaN", [probs], ["nan_flags"]))
    model.graph.node.insert(list(model.graph.node).index(consumer),
                            helper.make_node("Where", ["nan_flags", "zero", probs], ["guarded"]))
    consumer.input[0] = "guarded"
    onnx.checker.check_model(model)
    converted, report = vit2bpu.convert(model)
    ops = collections.Counter(n.op_type for n in converted.graph.node)
    assert ops["IsNaN"] == 1
    assert ops["Where"] == 1
    assert next(r for r in report.passes if r.name == "attention").rewritten == 1
    assert report.parity_passed
