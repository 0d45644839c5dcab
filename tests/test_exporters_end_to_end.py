"""End to end on exporter and post-processor variants: dynamo, SDPA, onnxsim, onnxruntime, fp16, dynamic batch,
unfolded constants and external data. Each is a reduced DeiT/ViT (2 blocks, width 64) made by the real tool."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from conftest import assert_bpu_form, cosine, fixture_path, random_input, run

import vit2bpu

# fixture -> (minimum cosine, maximum absolute error) on a fresh random sample.
# fp16 graphs round every intermediate to 11 significant bits: the converted graph adds the
# statistics in another order, so its logits differ by a few fp16 ulps (about 1e-4 here).
FP32 = (0.99999, 1e-4)
FP16 = (0.999, 2e-3)
VARIANTS = {
    "timm_deit_dynamo_op18.onnx": FP32,
    "timm_deit_dynamo_op20.onnx": FP32,
    "timm_deit_dynamo_op23.onnx": FP32,
    "timm_deit_sdpa_ts_op14.onnx": FP32,
    "timm_deit_sdpa_dynamo_op18.onnx": FP32,
    "timm_deit_sdpa_dynamo_op23.onnx": FP32,
    "hf_vit_sdpa_dynamo_op18.onnx": FP32,
    "hf_deit_teacher_dynamo_op18.onnx": FP32,
    "timm_deit_ts_op14_onnxsim.onnx": FP32,
    "hf_vit_eager_op14_onnxsim.onnx": FP32,
    "timm_deit_ts_op14_ortopt.onnx": FP32,
    "timm_deit_ts_op14_ort_extended.onnx": FP32,
    "timm_deit_ts_op14_fp16.onnx": FP16,
    "timm_deit_ts_op14_fp16_keepio.onnx": FP16,
    "timm_deit_ts_op14_dynbatch.onnx": FP32,
    "timm_deit_ts_op14_nofold.onnx": FP32,
    "timm_deit_ts_op14_extdata.onnx": FP32,
}


def _onnxruntime_refuses(path) -> str | None:
    """The reason the installed onnxruntime cannot load the original model (too new an opset or IR), or None."""
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        return str(exc).splitlines()[0][:200]
    return None


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    path = fixture_path(request.param)
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == "")
    if opset > onnx.defs.onnx_opset_version():
        pytest.skip(f"the installed onnx {onnx.__version__} does not know opset {opset}")
    # The conversion itself needs no onnxruntime support for the input's opset; the parity test does.
    model, report = vit2bpu.convert(path, parity=False)
    return request.param, path, model, report


def test_variant_structure(variant):
    _, _, model, report = variant
    assert_bpu_form(model)
    assert report.unconverted == []


def test_variant_every_block(variant):
    _, _, _, report = variant
    rewritten = {r.name: r.rewritten for r in report.passes}
    assert rewritten["attention"] == 2
    assert rewritten["layernorm"] == 5


def test_variant_cpu_nodes_on_x5(variant):
    from vit2bpu import check

    name, _, model, _ = variant
    cpu = collections.Counter(p.op_type for p in check.predict(model, "x5").cpu_nodes())
    # Only the two Softmax nodes and the Reshape that restores the logits' shape; keep_io_types
    # adds the float16 Casts at the input and the output.
    expected = {"Softmax": 2, "Reshape": 1}
    if name.endswith("fp16_keepio.onnx"):
        expected["Cast"] = 2
    assert dict(cpu) == expected


def test_variant_parity(variant):
    name, path, model, _ = variant
    refused = _onnxruntime_refuses(path)
    if refused:
        pytest.skip(f"onnxruntime cannot run the original: {refused}")
    min_cosine, max_error = VARIANTS[name]
    _, report = vit2bpu.convert(path)
    assert report.parity_passed
    original = onnx.load(str(path))
    feeds = random_input(original, seed=7)
    feeds = {k: v for k, v in feeds.items()}
    for key, value in feeds.items():
        if value.shape[0] != 1:
            feeds[key] = value[:1]
    expected, got = run(path, feeds)[0], run(model, feeds)[0]
    assert got.dtype == expected.dtype
    assert cosine(expected, got) >= min_cosine
    assert float(np.max(np.abs(expected.astype(np.float64) - got))) <= max_error


def test_dynamic_batch_pinned_by_option():
    path = fixture_path("timm_deit_ts_op14_dynbatch.onnx")
    model, report = vit2bpu.convert(path, input_shapes={"input": [3, 3, 64, 64]})
    assert_bpu_form(model)
    feeds = random_input(onnx.load(str(path)), seed=1)
    feeds["input"] = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    assert cosine(run(path, feeds)[0], run(model, feeds)[0]) > 0.99999


def test_external_data_in_and_out(tmp_path):
    model, _ = vit2bpu.convert(fixture_path("timm_deit_ts_op14_extdata.onnx"))
    written = vit2bpu.save(model, tmp_path / "out.onnx", external_data=True)
    assert written == [str(tmp_path / "out.onnx.data"), str(tmp_path / "out.onnx")]
    assert (tmp_path / "out.onnx").stat().st_size < 100_000
    reloaded = onnx.load(str(tmp_path / "out.onnx"))
    assert_bpu_form(reloaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    # The in-memory model still contains its weights after saving.
    assert all(not t.external_data for t in model.graph.initializer)
