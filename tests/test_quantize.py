"""``vit2bpu quantize``: the INT8 QDQ simulation, its agreement figures and its error contract.

Thresholds come from the data these tests write, run in onnxruntime 1.16.2 and
1.32.0, which gave the same figures. On the converted DeiT fixture, calibration
on 16 standard-normal samples gives a logits cosine of 0.977 and 100% top-1
agreement on 16 held-out samples. That fixture's logits barely depend on the
input (its random head bias and class token dominate, so FP32 picks the same
class for every input), and so even all-zero calibration agrees with FP32 on it
(cosine 0.987). The calibration-quality test therefore uses a hand-built ViT
whose logits do depend on the input: cosine 0.962 and top-1 81% with normal
samples, 0.643 and 31% with all-zero ones.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from builders import ViTSpec, build_vit
from conftest import fixture_path, run

import vit2bpu
from vit2bpu import cli
from vit2bpu.preprocess import Preprocess, normalize_raw
from vit2bpu.quantize import load_calibration_set, quantize_model

FIXTURE = "timm_deit_ts_op14.onnx"
FIXTURE_SHAPE = (1, 3, 64, 64)
BUILDER_SPEC = ViTSpec(width=32, depth=2, grid=(4, 4), patch=8, classes=10)
BUILDER_SHAPE = (1, 3, 32, 32)


def write_samples(folder, shape, count, *, kind="normal", seed=0, normalize="model", file_format="raw"):
    """Write a calibration set as 'vit2bpu calibrate' does: the JSON files in ``folder``, the tensors in data/.

    ``file_format`` raw writes headerless float32 .bin files, npy writes .npy files.
    """
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        if kind == "normal":
            sample = rng.standard_normal(shape).astype(np.float32)
        elif kind == "pixels":
            sample = rng.integers(0, 256, size=shape).astype(np.float32)
        else:
            sample = np.zeros(shape, np.float32)
        if file_format == "npy":
            np.save(data / f"image_{index:04d}.png.npy", sample)
        else:
            sample.tofile(data / f"image_{index:04d}.png.bin")
    Preprocess(size=tuple(shape[2:]), resize=shape[2], normalize=normalize).save(folder)
    manifest = {"input": {"name": "input", "shape": list(shape), "dtype": "float32"}, "count": count}
    (folder / "manifest.json").write_text(json.dumps(manifest) + "\n")
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


def _softmax_output_scales(model: onnx.ModelProto) -> list[float]:
    """The scale of the QuantizeLinear that reads each Softmax output."""
    inits = {i.name: i for i in model.graph.initializer}
    readers = {name: node for node in model.graph.node for name in node.input}
    scales = []
    for node in model.graph.node:
        if node.op_type == "Softmax":
            quantize = readers[node.output[0]]
            assert quantize.op_type == "QuantizeLinear"
            scales.append(float(onnx.numpy_helper.to_array(inits[quantize.input[1]])))
    return scales


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


def test_int8_model_agrees_with_fp32(fixture_int8, converted):
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


def test_norm_variance_float_softmax_int8(fixture_int8, converted, calibration):
    int8, report = fixture_int8
    assert report.float_nodes["Softmax"] == []
    assert len(report.float_nodes["LayerNorm variance nodes"]) == 5 * 3  # 5 LayerNorms: square, var, Sqrt
    assert _dequantized_inputs(int8, "Sqrt") == [False] * 5
    # onnxruntime fixes a quantized Softmax's output range to [0, 1]: symmetric int8 scale 1/127.
    assert _softmax_output_scales(int8) == pytest.approx([1 / 127] * 2)

    other, other_report = quantize_model(converted, calibration, float_softmax=True, int8_norm_stats=True)
    assert len(other_report.float_nodes["Softmax"]) == 2
    assert other_report.float_nodes["LayerNorm variance nodes"] == []
    assert _dequantized_inputs(other, "Sqrt") == [True] * 5
    # A float Softmax's output is quantized with a calibrated range; these probabilities stay far below 1.
    assert all(scale < 0.5 / 127 for scale in _softmax_output_scales(other))
    # An int8 variance rounds the class token's small variance to zero, which costs about 0.2 of cosine here.
    assert other_report.outputs[0].cosine < report.outputs[0].cosine - 0.1


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
    try:
        _, report = quantize_model(converted, calibration, method=method, samples=8, eval_dir=held_out)
    except vit2bpu.UsageError as exc:
        # onnxruntime 1.16's entropy calibrator imports scipy, which neither package requires.
        assert "pip install scipy" in str(exc)
        assert importlib.util.find_spec("scipy") is None
        return
    assert report.method == method
    assert report.calibration_samples == 8
    assert report.outputs[0].cosine >= 0.95


def test_hb_mapper_normalisation_is_applied(tmp_path, converted):
    # Raw pixels with normalize=hb_mapper must give the same result as the same images normalised in advance.
    raw = write_samples(tmp_path / "raw", FIXTURE_SHAPE, 6, kind="pixels", normalize="hb_mapper")
    normalised = tmp_path / "normalised"
    normalised.mkdir()
    config = Preprocess.load(raw)
    for path in sorted((raw / "data").glob("*.bin")):
        pixels = np.fromfile(path, np.float32).reshape(FIXTURE_SHAPE)
        np.save(normalised / f"{path.stem}.npy", normalize_raw(pixels, config).astype(np.float32))

    _, from_raw = quantize_model(converted, raw)
    _, from_normalised = quantize_model(converted, normalised)

    assert from_raw.normalize == "hb_mapper"
    assert from_normalised.normalize is None
    assert from_normalised.outputs[0].cosine == pytest.approx(from_raw.outputs[0].cosine, abs=1e-6)
    assert from_normalised.outputs[0].max_abs_error == pytest.approx(from_raw.outputs[0].max_abs_error, abs=1e-6)


def test_calibration_folder_forms_load_alike(tmp_path):
    raw = write_samples(tmp_path / "raw", FIXTURE_SHAPE, 3, seed=3, normalize="hb_mapper")
    npy = write_samples(tmp_path / "npy", FIXTURE_SHAPE, 3, seed=3, normalize="hb_mapper", file_format="npy")
    forms = {
        "calibrate output, raw": load_calibration_set(raw, "input", FIXTURE_SHAPE),
        "calibrate output, npy": load_calibration_set(npy, "input", FIXTURE_SHAPE),
        # hb_mapper's cal_data_dir: preprocess.json is read from the parent folder.
        "data folder": load_calibration_set(raw / "data", "input", FIXTURE_SHAPE),
    }
    reference = [forms["calibrate output, raw"].load(path) for path in forms["calibrate output, raw"].files]
    for form, calibration_set in forms.items():
        assert calibration_set.preprocess.normalize == "hb_mapper", form
        samples = [calibration_set.load(path) for path in calibration_set.files]
        assert len(samples) == 3, form
        for sample, expected in zip(samples, reference):
            np.testing.assert_array_equal(sample, expected, err_msg=form)


def test_calibrate_output_is_accepted(tmp_path, converted):
    from images import write_class_folders

    images = tmp_path / "images"
    write_class_folders(images)
    out = tmp_path / "cal"
    assert cli.main(["calibrate", str(images), str(out), "--model", str(converted)]) == 0

    _, report = quantize_model(converted, out)

    assert report.normalize == "model"
    assert report.calibration_samples == len(list((out / "data").iterdir())) == 12
    assert report.outputs[0].cosine > 0.9


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
    report_path = tmp_path / "quantize.json"
    code = cli.main(["quantize", str(converted), str(tmp_path / "q.onnx"), "--calibration", str(calibration),
                     "--samples", "4", "--min-cosine", "0.9999999", "--report", str(report_path), "-q"])
    assert code == 5
    assert "INT8 agreement is below --min-cosine 0.9999999: output 'logits' has cosine" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()
    data = json.loads(report_path.read_text())
    assert data["int8_model"] is None
    assert data["outputs"][0]["cosine"] < 0.9999999


@pytest.mark.parametrize("case, code, message", [
    ("missing folder", 2, "not found"),
    ("empty folder", 2, "contains no tensor files (.bin, .npy)"),
    ("no data folder", 2, "has preprocess.json but no data/ folder"),
    ("npy of the wrong shape", 2, "has shape [1, 3, 32, 32], expected the model input shape [1, 3, 64, 64]"),
    ("npy of the wrong dtype", 2, "has dtype float64, expected float32"),
    ("npy that is not an array", 2, "is not a readable .npy array"),
    ("bin of the wrong size", 2, "has 12288 bytes, expected 49152 (headerless float32"),
    ("manifest for another shape", 2, "records the input shape [1, 3, 32, 32], but the model input shape is"),
])
def test_cli_bad_calibration_data(case, code, message, tmp_path, converted, capsys):
    folder = tmp_path / "cal"
    if case != "missing folder":
        write_samples(folder, FIXTURE_SHAPE, 2, file_format="npy" if case.startswith("npy") else "raw")
    if case == "empty folder":
        for path in (folder / "data").iterdir():
            path.unlink()
    elif case == "no data folder":
        for path in (folder / "data").iterdir():
            path.unlink()
        (folder / "data").rmdir()
    elif case == "npy of the wrong shape":
        np.save(folder / "data" / "image_0001.png.npy", np.zeros((1, 3, 32, 32), np.float32))
    elif case == "npy of the wrong dtype":
        np.save(folder / "data" / "image_0001.png.npy", np.zeros(FIXTURE_SHAPE, np.float64))
    elif case == "npy that is not an array":
        (folder / "data" / "image_0001.png.npy").write_text("not a numpy file\n")
    elif case == "bin of the wrong size":
        np.zeros((1, 3, 32, 32), np.float32).tofile(folder / "data" / "image_0001.png.bin")
    elif case == "manifest for another shape":
        manifest = {"input": {"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32"}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "q.onnx"
    assert cli.main(["quantize", str(converted), str(out), "--calibration", str(folder)]) == code
    err = capsys.readouterr().err
    assert message in err
    if case.startswith(("npy", "bin")):
        assert "image_0001.png." in err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_output_equal_to_input(tmp_path, converted, calibration, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(converted.read_bytes())
    before = model.read_bytes()
    assert cli.main(["quantize", str(model), str(model), "--calibration", str(calibration)]) == 6
    assert "would overwrite the converted model" in capsys.readouterr().err
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
