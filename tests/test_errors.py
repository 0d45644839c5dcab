"""The error contract: every failure is one line with a documented exit code, and nothing partial is written."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import fixture_path
from onnx import TensorProto, helper, numpy_helper

import vit2bpu
from vit2bpu import cli, model_io

FIXTURE = "timm_deit_ts_op14.onnx"


def _save(model, path):
    onnx.save(model, str(path))
    return path


def _io(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _relu_model(opset=14, shape=(1, 4)):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [_io("x", list(shape))],
                              [_io("y", list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def test_missing_external_data(tmp_path, capsys):
    shutil.copy(fixture_path("timm_deit_ts_op14_extdata.onnx"), tmp_path / "m.onnx")  # without its .data file
    assert cli.main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")]) == 3
    err = capsys.readouterr().err
    assert "external data file 'timm_deit_ts_op14_extdata.onnx.data'" in err
    assert "is missing" in err


def test_checker_failure(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"], name="dangling")], "g", [_io("x", [1, 4])],
                              [_io("y", [1, 4])])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), tmp_path / "bad.onnx")
    assert cli.main([str(path), str(tmp_path / "o.onnx")]) == 3
    err = capsys.readouterr().err
    assert "fails onnx.checker" in err
    assert "bad.onnx" in err


def test_unknown_domain_names_the_node(tmp_path, capsys):
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="custom_node", domain="com.example")
    graph = helper.make_graph([node], "g", [_io("x", [1, 4])], [_io("y", [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("com.example", 1)])
    path = _save(model, tmp_path / "custom.onnx")
    assert cli.main([str(path), str(tmp_path / "o.onnx")]) == 4
    err = capsys.readouterr().err
    assert "custom_node" in err and "Frobnicate" in err and "com.example" in err


def test_symbolic_inner_dimension_needs_input_shape(tmp_path, capsys):
    path = _save(_relu_model(shape=(1, "tokens")), tmp_path / "dyn.onnx")
    assert cli.main([str(path), str(tmp_path / "o.onnx")]) == 4
    err = capsys.readouterr().err
    assert "symbolic dimension 'tokens'" in err
    assert "--input-shape x=1xN" in err
    assert cli.main([str(path), str(tmp_path / "o.onnx"), "--input-shape", "x=1x7", "-q"]) == 0


def test_input_shape_for_unknown_input(tmp_path, capsys):
    path = _save(_relu_model(), tmp_path / "m.onnx")
    assert cli.main([str(path), str(tmp_path / "o.onnx"), "--input-shape", "pixels=1x4"]) == 2
    assert "pixels" in capsys.readouterr().err


def test_opset9_is_upgraded(tmp_path):
    path = _save(_relu_model(opset=9), tmp_path / "old.onnx")
    assert cli.main([str(path), str(tmp_path / "o.onnx"), "-q"]) == 0
    assert onnx.load(str(tmp_path / "o.onnx")).opset_import[0].version == 11


def test_failed_upgrade_is_reported(tmp_path, monkeypatch, capsys):
    def refuse(model, version):
        raise RuntimeError("No Adapter For Relu")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    path = _save(_relu_model(opset=10), tmp_path / "old.onnx")
    assert cli.main([str(path), str(tmp_path / "o.onnx")]) == 4
    err = capsys.readouterr().err
    assert "could not upgrade opset 10 to 11" in err
    assert "No Adapter For Relu" in err


def test_disk_full_leaves_nothing(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_io.os, "fsync", full)
    assert cli.main([str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx")]) == 6
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_external_data_failure_removes_both(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def fail_on_model(src, dst):
        calls.append(os.path.basename(dst))
        if str(dst).endswith(".onnx"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    model, _ = vit2bpu.convert(fixture_path(FIXTURE), parity=False)
    monkeypatch.setattr(model_io.os, "replace", fail_on_model)
    with pytest.raises(vit2bpu.OutputError):
        vit2bpu.save(model, tmp_path / "o.onnx", external_data=True)
    assert calls == ["o.onnx.data", "o.onnx"]  # data first, model last
    assert list(tmp_path.iterdir()) == []


def test_internal_error_is_one_line_without_debug(tmp_path, monkeypatch, capsys):
    from vit2bpu.passes import layout

    def broken(self, graph, editor, ctx, result):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(layout.PropagateLayout, "apply", broken)
    assert cli.main([str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "internal error: RuntimeError: simulated bug" in err
    with pytest.raises(RuntimeError):
        cli.main([str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx"), "--debug"])
    assert not (tmp_path / "o.onnx").exists()


def test_output_suffix_must_be_onnx(tmp_path, capsys):
    assert cli.main([str(fixture_path(FIXTURE)), str(tmp_path / "o.bin")]) == 2
    assert "does not end in .onnx" in capsys.readouterr().err


def test_no_traceback_reaches_the_user(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vit2bpu", str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("vit2bpu: error: ")


def test_input_never_modified(tmp_path):
    path = tmp_path / "in.onnx"
    shutil.copy(fixture_path(FIXTURE), path)
    before = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    assert cli.main([str(path), str(tmp_path / "o.onnx"), "-q"]) == 0
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("selection", [[], ["restore_tokens"], ["patch_embed"], ["linear"], ["layernorm"],
                                       ["attention"], ["softmax"], ["layout"], ["fold_norm_affine"]])
def test_any_pass_subset_gives_a_valid_model(selection):
    model, report = vit2bpu.convert(fixture_path(FIXTURE), passes=selection)
    onnx.checker.check_model(model, full_check=True)
    assert report.parity_passed


@pytest.mark.parametrize("array, message", [
    (np.zeros((1, 3, 32, 32), np.float32), "has shape [1, 3, 32, 32], the model takes [1, 3, 64, 64]"),
    (np.zeros((1, 3, 64, 64), np.float64), "is float64, the model takes float32"),
])
def test_bad_parity_input_is_a_usage_error(tmp_path, capsys, array, message):
    np.save(tmp_path / "x.npy", array)
    args = [str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx"), "--parity-input", str(tmp_path / "x.npy")]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_outputs_get_the_umask_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        args = [str(fixture_path(FIXTURE)), str(tmp_path / "o.onnx"), "--external-data", "--report",
                str(tmp_path / "r.json"), "-q"]
        assert cli.main(args) == 0
    finally:
        os.umask(umask)
    for name in ("o.onnx", "o.onnx.data", "r.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
