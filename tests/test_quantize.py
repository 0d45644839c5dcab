"""``vit2bpu quantize``: the INT8 QDQ simulation, its agreement figures and its error contract.

Thresholds come from runs of these tests in onnxruntime 1.16.2 and 1.32.0, which
gave the same figures: on the converted DeiT fixture, calibration on normal
samples gives a logits cosine of 0.976 and 100% top-1 agreement on held-out
samples. That fixture's logits barely depend on the input (its random head bias
and class token dominate, so FP32 picks the same class for every input), and so
even all-zero calibration agrees with FP32 on it. The calibration-quality test
therefore uses a hand-built ViT whose logits do depend on the input: cosine
0.964 and top-1 81% with normal samples, 0.583 and 38% with all-zero ones.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import ViTSpec, build_vit
from conftest import fixture_path, run

import vit2bpu
from vit2bpu import cli
from vit2bpu.preprocess import Preprocess, normalize_raw
from vit2bpu.quantize import quantize_model

FIXTURE = "timm_deit_ts_op14.onnx"
FIXTURE_SHAPE = (1, 3, 64, 64)
BUILDER_SPEC = ViTSpec(width=32, depth=2, grid=(4, 4), patch=8, classes=10)
BUILDER_SHAPE = (1, 3, 32, 32)


def write_samples(folder, shape, count, *, kind="normal", seed=0, normalize="model"):
    """Write a calibration folder as 'vit2bpu calibrate' does: one float32 .npy per sample plus preprocess.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        if kind == "normal":
            sample = rng.standard_normal(shape)
        elif kind == "pixels":
            sample = rng.integers(0, 256, size=shape)
        else:
            sample = np.zeros(shape)
        np.save(folder / f"image_{index:04d}.npy", sample.astype(np.float32))
    Preprocess(size=tuple(shape[2:]), resize=shape[2], normalize=normalize).save(folder)
    (folder / "manifest.json").write_text(json.dumps({"samples": count}) + "\n")
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model, _ = vit2bpu.convert(fixture_path(FIXTURE), parity=False)
    path = tmp_path_factory.mktemp("converted") / "deit_bpu.onnx"
    vit2bpu.save(model, path)
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_samples(tmp_path_factory.mktemp("cal"), FIXTURE_SHAPE, 16, seed=1)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return write_samples(tmp_path_factory.mktemp("eval"), FIXTURE_SHAPE, 16, seed=2)


@pytest.fixture(scope="module")
def fixture_int8(converted, calibration, held_out):
    return quantize_model(converted, calibration, eval_dir=held_out)


def _dequantized_inputs(model: onnx.ModelProto, op_type: str) -> list[bool]:
    """For every node of ``op_type``: whether its first input comes out of a DequantizeLinear."""
    producers = {out: node for node in model.graph.node for out in node.output}
    return [producers.get(node.input[0]) is not None and producers[node.input[0]].op_type == "DequantizeLinear"
            for node in model.graph.node if node.op_type == op_type]


# ---------------------------------------------------------------- the simulation


def test_int8_model_is_qdq_at_opset13(fixture_int8):
    int8, report = fixture_int8
    ops = [n.op_type for n in int8.graph.node]
    opset = next(e.version for e in int8.opset_import if e.domain in ("", "ai.onnx"))
    assert opset >= 13
    assert ops.count("QuantizeLinear") > 0
    assert ops.count("DequantizeLinear") > ops.count("QuantizeLinear")  # weights are stored quantized
    assert report.qdq_nodes == ops.count("QuantizeLinear") + ops.count("DequantizeLinear")
    assert report.opset_copy_check["converted"] is True
    assert report.opset_copy_check["cosine"] > 0.99999


def test_int8_model_runs_and_agrees_with_fp32(fixture_int8, converted):
    int8, report = fixture_int8
    sample = np.random.default_rng(5).standard_normal(FIXTURE_SHAPE).astype(np.float32)
    (logits,) = run(int8, {"input": sample})
    (reference,) = run(converted, {"input": sample})
    assert logits.shape == reference.shape == (1, 10)
    assert not np.array_equal(logits, reference)  # quantization changes the numbers
    (result,) = report.outputs
    assert result.name == "logits"
    assert report.eval_samples == 16
    assert result.cosine >= 0.95
    assert result.min_sample_cosine >= 0.9
    assert result.top1_agreement >= 0.9
    assert result.max_abs_error < 0.5


def test_weights_are_per_channel_by_default(fixture_int8, converted, calibration):
    int8, _ = fixture_int8

    def conv_weight_scales(model):
        """(output channels, scale count) of every int8 Conv weight."""
        inits = {i.name: i for i in model.graph.initializer}
        pairs = []
        for node in model.graph.node:
            weight = inits.get(node.input[0])
            if node.op_type == "DequantizeLinear" and weight is not None and weight.data_type == onnx.TensorProto.INT8 \
                    and len(weight.dims) == 4:
                pairs.append((weight.dims[0], int(np.prod(inits[node.input[1]].dims))))
        return pairs

    per_channel = conv_weight_scales(int8)
    assert len(per_channel) > 10
    assert all(scales == channels for channels, scales in per_channel)
    assert any(channels > 1 for channels, _ in per_channel)
    per_tensor_model, report = quantize_model(converted, calibration, per_channel=False, eval_samples=2)
    assert report.per_channel is False
    assert {scales for _, scales in conv_weight_scales(per_tensor_model)} == {1}


def test_softmax_and_norm_variance_stay_float(fixture_int8, converted, calibration):
    int8, report = fixture_int8
    assert len(report.float_nodes["Softmax"]) == 2
    assert len(report.float_nodes["LayerNorm variance nodes"]) == 5 * 3  # 5 LayerNorms: square, var, Sqrt
    assert _dequantized_inputs(int8, "Softmax") == [False, False]
    assert not any(_dequantized_inputs(int8, "Sqrt"))

    all_int8, all_report = quantize_model(converted, calibration, int8_softmax=True, int8_norm_stats=True)
    assert all_report.float_nodes == {"Softmax": [], "LayerNorm variance nodes": []}
    assert _dequantized_inputs(all_int8, "Softmax") == [True, True]
    # An int8 variance zeroes the class token's small variance: the documented drop (0.98 -> 0.79).
    assert all_report.outputs[0].cosine < report.outputs[0].cosine - 0.1


def test_zero_calibration_fails_agreement_threshold(tmp_path):
    # The hand-built ViT's logits depend on the input, unlike the DeiT fixture's (see the module docstring).
    converted, _ = vit2bpu.convert(build_vit(BUILDER_SPEC), parity=False)
    held_out = write_samples(tmp_path / "eval", BUILDER_SHAPE, 32, seed=2)
    realistic = write_samples(tmp_path / "normal", BUILDER_SHAPE, 32, seed=1)
    zeros = write_samples(tmp_path / "zeros", BUILDER_SHAPE, 8, kind="zeros")

    _, good = quantize_model(converted, realistic, eval_dir=held_out)
    _, broken = quantize_model(converted, zeros, eval_dir=held_out)

    assert good.outputs[0].cosine >= 0.93
    assert good.outputs[0].top1_agreement >= 0.6
    assert broken.outputs[0].cosine < 0.93
    assert broken.outputs[0].top1_agreement < 0.6
    assert not any("constant" in w for w in good.warnings)
    assert any("8 of 8 calibration samples are constant" in w for w in broken.warnings)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods(method, converted, calibration, held_out):
    needs_scipy = ort.__version__.startswith("1.16.") and method == "entropy"
    try:
        import scipy  # noqa: F401
        needs_scipy = False
    except ImportError:
        pass
    if needs_scipy:
        with pytest.raises(vit2bpu.UsageError, match="pip install scipy"):
            quantize_model(converted, calibration, method=method, samples=4)
        return
    _, report = quantize_model(converted, calibration, method=method, samples=8, eval_dir=held_out)
    assert report.method == method
    assert report.calibration_samples == 8
    assert report.outputs[0].cosine >= 0.95


def test_hb_mapper_normalisation_is_applied(tmp_path, converted):
    # Raw pixels with normalize=hb_mapper must give the same result as the same images normalised in advance.
    raw = write_samples(tmp_path / "raw", FIXTURE_SHAPE, 6, kind="pixels", normalize="hb_mapper")
    normalised = tmp_path / "normalised"
    normalised.mkdir()
    config = Preprocess.load(raw)
    for path in sorted(raw.glob("*.npy")):
        np.save(normalised / path.name, normalize_raw(np.load(path), config).astype(np.float32))
    Preprocess(size=(64, 64), resize=64, normalize="model").save(normalised)

    _, from_raw = quantize_model(converted, raw)
    _, from_normalised = quantize_model(converted, normalised)

    assert from_raw.normalize == "hb_mapper"
    assert from_normalised.normalize == "model"
    assert from_raw.outputs[0].cosine == pytest.approx(from_normalised.outputs[0].cosine, abs=1e-6)
    assert from_raw.outputs[0].max_abs_error == pytest.approx(from_normalised.outputs[0].max_abs_error, abs=1e-6)


def test_unconverted_model_warns_and_proceeds(tmp_path):
    cal = write_samples(tmp_path / "cal", FIXTURE_SHAPE, 4)
    int8, report = quantize_model(fixture_path(FIXTURE), cal)
    assert report.source_opset == 14
    assert report.opset_copy_check == {"converted": False}
    assert any("opset 14, not the opset 11" in w for w in report.warnings)
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)


# ---------------------------------------------------------------- command line


def test_cli_writes_model_report_and_summary(tmp_path, converted, calibration, capsys):
    out = tmp_path / "deit_int8.onnx"
    report_path = tmp_path / "quantize.json"
    code = cli.main(["quantize", str(converted), str(out), "--calibration", str(calibration), "--samples", "8",
                     "--eval-samples", "4", "--report", str(report_path)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "output 'logits': cosine" in stdout
    assert "give hb_mapper the opset-11 converted model" in stdout
    assert onnx.load(str(out)).opset_import[0].version >= 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit_int8.onnx", "quantize.json"]
    data = json.loads(report_path.read_text())
    assert data["calibration_samples"] == 8
    assert data["eval_samples"] == 4
    assert data["int8_model"] == str(out)
    assert data["outputs"][0]["name"] == "logits"
    assert 0.9 < data["outputs"][0]["cosine"] <= 1.0


def test_cli_min_cosine_failure_exits_5(tmp_path, converted, calibration, capsys):
    code = cli.main(["quantize", str(converted), str(tmp_path / "q.onnx"), "--calibration", str(calibration),
                     "--samples", "4", "--min-cosine", "0.9999999", "-q"])
    assert code == 5
    assert "INT8 agreement below --min-cosine" in capsys.readouterr().err
    assert (tmp_path / "q.onnx").exists()  # the simulation is still written for inspection


@pytest.mark.parametrize("case, code, message", [
    ("missing folder", 2, "calibration folder"),
    ("empty folder", 2, "contains no .npy files"),
    ("wrong shape", 2, "has shape [1, 3, 32, 32], expected the model input shape [1, 3, 64, 64]"),
    ("wrong dtype", 2, "has dtype float64, expected float32"),
    ("not an array", 2, "is not a readable .npy array"),
])
def test_cli_bad_calibration_data(case, code, message, tmp_path, converted, capsys):
    folder = tmp_path / "cal"
    if case != "missing folder":
        write_samples(folder, FIXTURE_SHAPE, 2)
    if case == "empty folder":
        for path in folder.glob("*.npy"):
            path.unlink()
    bad = folder / "image_0001.npy"
    if case == "wrong shape":
        np.save(bad, np.zeros((1, 3, 32, 32), np.float32))
    elif case == "wrong dtype":
        np.save(bad, np.zeros(FIXTURE_SHAPE, np.float64))
    elif case == "not an array":
        bad.write_text("not a numpy file\n")
    out = tmp_path / "q.onnx"
    assert cli.main(["quantize", str(converted), str(out), "--calibration", str(folder)]) == code
    err = capsys.readouterr().err
    assert message in err
    if case in ("wrong shape", "wrong dtype", "not an array"):
        assert "image_0001.npy" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_output_equal_to_input_is_refused(tmp_path, converted, calibration, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(converted.read_bytes())
    before = model.read_bytes()
    assert cli.main(["quantize", str(model), str(model), "--calibration", str(calibration)]) == 6
    assert "refusing to overwrite" in capsys.readouterr().err
    assert model.read_bytes() == before


@pytest.mark.parametrize("arguments, code, message", [
    (["--samples", "0"], 2, "at least 1"),
    (["--method", "kl"], 2, "invalid choice"),
    (["--per-channel", "--per-tensor"], 2, "not allowed with argument"),
])
def test_cli_invalid_options(arguments, code, message, tmp_path, converted, calibration, capsys):
    args = ["quantize", str(converted), str(tmp_path / "q.onnx"), "--calibration", str(calibration), *arguments]
    assert cli.main(args) == code
    assert message in capsys.readouterr().err


def test_cli_missing_model_and_dynamic_input(tmp_path, calibration, capsys):
    assert cli.main(["quantize", str(tmp_path / "nope.onnx"), str(tmp_path / "q.onnx"),
                     "--calibration", str(calibration)]) == 3
    assert "nope.onnx: file not found" in capsys.readouterr().err
    dynamic = fixture_path("timm_deit_ts_op14_dynbatch.onnx")
    assert cli.main(["quantize", str(dynamic), str(tmp_path / "q.onnx"), "--calibration", str(calibration)]) == 4
    assert "not a static shape" in capsys.readouterr().err


def test_cli_output_suffix_checked(tmp_path, converted, calibration, capsys):
    assert cli.main(["quantize", str(converted), str(tmp_path / "q.bin"), "--calibration", str(calibration)]) == 2
    assert "does not end in .onnx" in capsys.readouterr().err
