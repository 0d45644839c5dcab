"""End to end on graphs exported by torch.onnx (TorchScript exporter) from timm and transformers."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from conftest import assert_bpu_form, cosine, fixture_path, random_input, run

import vit2bpu

# fixture -> number of encoder blocks
CORE_FIXTURES = {
    "timm_deit_ts_op11.onnx": 2,
    "timm_deit_ts_op13.onnx": 2,
    "timm_deit_ts_op14.onnx": 2,
    "timm_deit_ts_op17.onnx": 2,
    "timm_deit_ts_op14_w78h3_d3.onnx": 3,
    "timm_deit_distilled_ts_op14.onnx": 2,
    "hf_deit_teacher_eager_op14.onnx": 2,
    "hf_vit_sdpa_op14.onnx": 2,
    "hf_vit_eager_op17.onnx": 2,
}


@pytest.fixture(scope="module", params=sorted(CORE_FIXTURES))
def converted(request):
    path = fixture_path(request.param)
    model, report = vit2bpu.convert(path)
    return request.param, onnx.load(str(path)), model, report


def test_output_is_opset11_all_4d(converted):
    _, _, model, _ = converted
    assert_bpu_form(model)


def test_every_block_rewritten(converted):
    name, _, _, report = converted
    blocks = CORE_FIXTURES[name]
    rewritten = {r.name: r.rewritten for r in report.passes}
    assert rewritten["attention"] == blocks
    assert rewritten["layernorm"] == 2 * blocks + 1
    assert rewritten["patch_embed"] == 1
    assert report.unconverted == []


def test_op_counts_match_the_4d_block(converted):
    name, _, model, _ = converted
    blocks = CORE_FIXTURES[name]
    ops = collections.Counter(n.op_type for n in model.graph.node)
    heads = 2 if "distilled" in name or "teacher" in name else 1
    # Per block: q, k, v, proj, fc1, fc2 and two Convs for each of the two LayerNorms;
    # plus the patch embedding, the final LayerNorm's two and one per classifier head.
    assert ops["Conv"] == 10 * blocks + 1 + 2 + heads
    assert ops["Softmax"] == blocks
    assert ops["MatMul"] == 2 * blocks
    # q, v and the context per block; none elsewhere.
    assert ops["Transpose"] == 3 * blocks


def test_only_softmax_left_for_the_cpu(converted):
    from vit2bpu import check

    name, _, model, _ = converted
    cpu = collections.Counter(p.op_type for p in check.predict(model, "x5").cpu_nodes())
    assert dict(cpu) == {"Softmax": CORE_FIXTURES[name], "Reshape": 1}


def test_parity_on_a_new_sample(converted):
    _, original, model, report = converted
    assert report.parity_passed
    feeds = random_input(original, seed=42)
    (expected,), (got,) = run(original, feeds), run(model, feeds)
    assert got.shape == expected.shape
    assert cosine(expected, got) >= 0.99999
    assert np.array_equal(expected.argmax(axis=-1), got.argmax(axis=-1))
    assert np.max(np.abs(expected - got)) < 1e-4


def test_interface_names_and_dtypes_kept(converted):
    _, original, model, _ = converted
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    for before, after in zip(original.graph.output, model.graph.output):
        assert before.type.tensor_type.elem_type == after.type.tensor_type.elem_type


def test_reducemean_form_also_converts():
    path = fixture_path("timm_deit_ts_op14.onnx")
    model, report = vit2bpu.convert(path, layernorm="reducemean")
    assert_bpu_form(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["ReduceMean"] == 2 * 5
    assert ops["Conv"] == 6 * 2 + 1 + 1  # only the Linear layers and the patch embedding
    assert report.parity_passed
