"""``vit2bpu hb-config``: the hb_mapper makertbin YAML and its single normalisation setting."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from conftest import fixture_path

import vit2bpu
from vit2bpu import cli
from vit2bpu.preprocess import Preprocess, from_options


@pytest.fixture(scope="module")
def converted_path(tmp_path_factory):
    model, _ = vit2bpu.convert(fixture_path("timm_deit_ts_op14.onnx"), parity=False)
    path = tmp_path_factory.mktemp("model") / "deit_bpu.onnx"
    vit2bpu.save(model, path)
    return path


def _calibration(folder, normalize):
    (folder / "data").mkdir(parents=True)
    np.zeros((1, 3, 64, 64), np.float32).tofile(folder / "data" / "a.bin")
    from_options("timm-deit", size=(64, 64), normalize=normalize).save(folder)
    return folder


def _write(args, capsys):
    assert cli.main(["hb-config", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_default_featuremap_config(converted_path, tmp_path, capsys):
    cal = _calibration(tmp_path / "cal", "model")
    out = tmp_path / "c.yaml"
    _write([converted_path, "--calibration", cal, "-o", out], capsys)
    config = yaml.safe_load(out.read_text())
    assert set(config) == {"model_parameters", "input_parameters", "calibration_parameters", "compiler_parameters"}
    assert config["model_parameters"]["march"] == "bayes-e"
    inputs = config["input_parameters"]
    assert inputs["input_name"] == "input"
    assert inputs["input_shape"] == "1x3x64x64"
    assert inputs["input_type_train"] == "featuremap"
    assert inputs["norm_type"] == "no_preprocess"
    calibration = config["calibration_parameters"]
    assert calibration["cal_data_dir"] == str(cal / "data")
    assert calibration["cal_data_type"] == "float32"
    assert calibration["run_on_bpu"].split("; ") == ["/blocks/blocks.0/attn/Softmax", "/blocks/blocks.1/attn/Softmax"]
    assert config["compiler_parameters"]["debug"] is False
    assert config["compiler_parameters"]["optimize_level"] == "O3"


def test_mean_and_scale_move_into_hb_mapper(converted_path, tmp_path, capsys):
    cal = _calibration(tmp_path / "cal", "hb_mapper")
    out = tmp_path / "c.yaml"
    _write([converted_path, "--calibration", cal, "-o", out, "--input-type-rt", "nv12"], capsys)
    inputs = yaml.safe_load(out.read_text())["input_parameters"]
    assert inputs["norm_type"] == "data_mean_and_scale"
    assert inputs["input_type_train"] == "rgb"
    assert inputs["input_type_rt"] == "nv12"
    mean = [float(v) for v in inputs["mean_value"].split()]
    scale = [float(v) for v in inputs["scale_value"].split()]
    np.testing.assert_allclose(mean, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(scale, [1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)], rtol=1e-6)


def test_x3_has_no_softmax_run_on_bpu(converted_path, tmp_path, capsys):
    out = tmp_path / "c.yaml"
    _write([converted_path, "--target", "x3", "-o", out], capsys)
    config = yaml.safe_load(out.read_text())
    assert config["model_parameters"]["march"] == "bernoulli2"
    assert "run_on_bpu" not in config["calibration_parameters"]
    assert config["calibration_parameters"]["calibration_type"] == "skip"


def test_softmax_on_cpu_option(converted_path, tmp_path, capsys):
    out = tmp_path / "c.yaml"
    _write([converted_path, "--softmax-on-cpu", "-o", out], capsys)
    assert "run_on_bpu" not in yaml.safe_load(out.read_text())["calibration_parameters"]


def test_contradicting_normalize_is_rejected(converted_path, tmp_path, capsys):
    cal = _calibration(tmp_path / "cal", "model")
    assert cli.main(["hb-config", str(converted_path), "--calibration", str(cal), "--normalize", "hb_mapper"]) == 2
    assert "contradicts" in capsys.readouterr().err


def test_unconverted_model_is_rejected(tmp_path, capsys):
    assert cli.main(["hb-config", str(fixture_path("timm_deit_ts_op17.onnx")), "-o", str(tmp_path / "c.yaml")]) == 2
    assert "opset 17" in capsys.readouterr().err


def test_preprocess_round_trip(tmp_path):
    config = from_options("hf-vit", size=(64, 64), normalize="hb_mapper")
    config.save(tmp_path)
    loaded = Preprocess.load(tmp_path)
    assert loaded == config
    assert loaded.mean == (0.5, 0.5, 0.5)
