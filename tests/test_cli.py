"""The command line: the main job, the report, and the error contract with its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import fixture_path

import vit2bpu
from vit2bpu import cli

FIXTURE = "timm_deit_ts_op14.onnx"


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vit2bpu", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_convert_prints_summary_and_writes_opset11(tmp_path):
    out = tmp_path / "out.onnx"
    result = _run(fixture_path(FIXTURE), out)
    assert result.returncode == 0, result.stderr
    assert "attention" in result.stdout
    assert "parity 'logits': cosine" in result.stdout
    assert onnx.load(str(out)).opset_import[0].version == 11
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]  # no temporary file left


def test_report_json(tmp_path):
    report = tmp_path / "report.json"
    assert cli.main([str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx"), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["output_opset"] == 11
    assert data["parity_passed"] is True
    assert {p["name"] for p in data["passes"]} >= {"linear", "layernorm", "attention", "layout"}
    assert data["ops_after"]["Softmax"] == 2
    assert any(name.endswith("qkv/MatMul") for name in data["renamed"])


def test_missing_input(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx")]) == 3
    err = capsys.readouterr().err
    assert "nope.onnx: file not found" in err
    assert "Traceback" not in err


def test_not_onnx(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a protobuf\n" * 10)
    assert cli.main([str(bad), str(tmp_path / "o.onnx")]) == 3
    err = capsys.readouterr().err
    assert "notes.onnx" in err
    assert "not a valid ONNX file" in err or "contains no ONNX graph" in err


def test_truncated_input(tmp_path, capsys):
    data = fixture_path(FIXTURE).read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    assert cli.main([str(truncated), str(tmp_path / "o.onnx")]) == 3
    err = capsys.readouterr().err
    assert "truncated.onnx" in err
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(fixture_path(FIXTURE).read_bytes())
    before = model.read_bytes()
    assert cli.main([str(model), str(model)]) == 6
    assert "refusing to overwrite" in capsys.readouterr().err
    assert model.read_bytes() == before


def test_force_replaces_input(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(fixture_path(FIXTURE).read_bytes())
    assert cli.main([str(model), str(model), "--force", "-q"]) == 0
    assert onnx.load(str(model)).opset_import[0].version == 11


def test_missing_output_folder(tmp_path, capsys):
    assert cli.main([str(fixture_path(FIXTURE)), str(tmp_path / "no" / "such" / "o.onnx")]) == 6
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert cli.main([str(fixture_path(FIXTURE)), str(folder / "o.onnx")]) == 6
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_parity_failure_writes_nothing(tmp_path, monkeypatch, capsys):
    from vit2bpu.passes import linear

    original = linear.LinearToConv._rewrite

    def corrupt(self, editor, graph, node, x, kernel, bias, output):
        # A wrong weight in one Linear: the parity check must catch it.
        if "fc2" in node.name and "blocks.1" in node.name:
            kernel = kernel * 1.5
        return original(self, editor, graph, node, x, kernel, bias, output)

    monkeypatch.setattr(linear.LinearToConv, "_rewrite", corrupt)
    report = tmp_path / "r.json"
    code = cli.main([str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx"), "--report", str(report)])
    assert code == 5
    err = capsys.readouterr().err
    assert "parity check failed" in err
    assert "first divergent block: blocks.1" in err
    assert not (tmp_path / "o.onnx").exists()
    assert json.loads(report.read_text())["parity_passed"] is False


def test_unknown_option_is_a_usage_error(tmp_path, capsys):
    assert cli.main([str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx"), "--target", "x9"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_input_shape_pins_dynamic_batch(tmp_path):
    out = tmp_path / "o.onnx"
    args = [str(fixture_path("timm_deit_ts_op14_dynbatch.onnx")), str(out), "--input-shape", "input=2x3x64x64", "-q"]
    assert cli.main(args) == 0
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 64, 64]


def test_symbolic_batch_pinned_with_a_note(tmp_path):
    result = _run(fixture_path("timm_deit_ts_op14_dynbatch.onnx"), tmp_path / "o.onnx")
    assert result.returncode == 0, result.stderr
    assert "symbolic batch dimension" in result.stdout
    assert "pinned to 1" in result.stdout


def test_user_parity_input(tmp_path):
    sample = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "sample.npy", sample)
    report = tmp_path / "r.json"
    args = [str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx"), "--parity-input", str(tmp_path / "sample.npy"),
            "--report", str(report), "-q"]
    assert cli.main(args) == 0
    assert json.loads(report.read_text())["parity"][0]["cosine"] > 0.99999


def test_pure_cnn_converts_with_warning(tmp_path):
    result = _run(fixture_path("resnet_tiny_op13.onnx"), tmp_path / "o.onnx")
    assert result.returncode == 0, result.stderr
    assert "no transformer pattern" in result.stdout


def test_strict_fails_on_partial_conversion(tmp_path, capsys):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="rank4_linear")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 4])], [weight])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    assert cli.main([str(path), str(tmp_path / "o.onnx"), "--strict"]) == 4
    err = capsys.readouterr().err
    assert "rank4_linear" in err and "MatMul" in err
    assert cli.main([str(path), str(tmp_path / "o.onnx"), "-q"]) == 0


def test_python_module_and_api_agree(tmp_path):
    model, report = vit2bpu.convert(fixture_path(FIXTURE), parity=False)
    written = vit2bpu.save(model, tmp_path / "api.onnx")
    assert written == [str(tmp_path / "api.onnx")]
    assert report.parity is None
    assert Path(written[0]).stat().st_size > 0
