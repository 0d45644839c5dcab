"""``vit2bpu check``: predicted placement, and agreement with recorded hb_mapper checker output."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from conftest import FIXTURES, fixture_path

import vit2bpu
from vit2bpu import check, cli

CHECKER_LOGS = FIXTURES / "hb_checker"
DEMO = Path(__file__).resolve().parent.parent / "models" / "deit_tiny_demo.onnx"


def _converted(path, **options):
    model, _ = vit2bpu.convert(path, parity=False, **options)
    return model


def _verify(model, log_name, target="x5"):
    report = check.predict(model, target)
    rows = check.parse_checker_output((CHECKER_LOGS / log_name).read_text())
    return report, check.compare(report, rows, model)


def test_converted_fixture_agrees_with_checker():
    report, result = _verify(_converted(fixture_path("timm_deit_ts_op11.onnx")), "small_x5.log")
    assert result["agrees"]
    assert result["checker_cpu_by_op_type"] == {"Reshape": 1, "Softmax": 2}
    assert result["predicted_cpu_by_op_type"] == {"Reshape": 1, "Softmax": 2}
    assert result["checker_subgraphs"] == 3
    assert report.subgraphs == 3


def test_original_export_agrees_with_checker():
    model = onnx.load(str(fixture_path("timm_deit_ts_op11.onnx")))
    report, result = _verify(model, "small_orig.log")
    assert result["agrees"]
    assert result["checker_cpu_by_op_type"] == {"Softmax": 2}
    # The toolchain's own Reshape after the head is listed apart from the model's nodes.
    assert [r["node"] for r in result["toolchain_inserted"] if r["device"] == "CPU"] == ["/head/Gemm_transpose_output_reshape"]
    assert report.subgraphs == 3


def test_converted_deit_tiny_agrees_with_checker():
    report, result = _verify(_converted(DEMO), "demo_x5.log")
    assert result["agrees"]
    assert result["checker_cpu_by_op_type"] == {"Reshape": 1, "Softmax": 12}
    assert result["predicted_cpu_by_op_type"] == {"Reshape": 1, "Softmax": 12}
    assert result["checker_subgraphs"] == 13
    assert report.subgraphs == 13


def test_x3_reasons_name_the_limit():
    report = check.predict(_converted(fixture_path("timm_deit_ts_op14.onnx"), target="x3"), "x3")
    reasons = {p.op_type: p.reason for p in report.cpu_nodes()}
    assert "1xBxMxK x 1x1xKxN" in reasons["MatMul"]
    assert "RDK X3" in reasons["Softmax"]
    assert "Sub" not in reasons  # the x3 LayerNorm centres with a Conv
    assert report.counts()["Conv"]["CPU"] == 1  # the 16x16 patch embedding
    assert "16x16" in next(p.reason for p in report.cpu_nodes() if p.op_type == "Conv")


def test_x3_forms_have_fewer_cpu_nodes():
    path = fixture_path("timm_deit_ts_op14.onnx")
    x3 = len(check.predict(_converted(path, target="x3"), "x3").cpu_nodes())
    x5_forms = len(check.predict(_converted(path, target="x5"), "x3").cpu_nodes())
    original = len(check.predict(onnx.load(str(path)), "x3").cpu_nodes())
    assert x3 < x5_forms < original


def test_run_on_bpu_moves_softmax():
    model = _converted(fixture_path("timm_deit_ts_op14.onnx"))
    report = check.predict(model, "x5", {"Softmax"})
    assert [p.op_type for p in report.cpu_nodes()] == ["Reshape"]
    assert report.subgraphs == 1


def test_parse_truncated_names_and_split_div():
    text = "\n".join([
        "\x1b[92mINFO\x1b[0m The main quantized node information:",
        "Node                                                ON   Subgraph  Type       Cosine Similarity",
        "-" * 40,
        "/a/Div_reciprocal                                   BPU  id(0)     HzLut      --",
        "...ry/long/name/of/a/node/that/was/cut/Reshape_out  CPU  --        Reshape    --",
        "/a/Softmax                                          CPU  --        Softmax    --",
        "2026-12-04 INFO The quantized model output:",
    ])
    rows = check.parse_checker_output(text)
    assert [r["device"] for r in rows] == ["BPU", "CPU", "CPU"]
    mapped = check.map_checker_rows(rows, ["/a/Div", "/a/Softmax", "/a/very/long/name/of/a/node/that/was/cut/Reshape_out"])
    assert [m["model_node"] for m in mapped] == ["/a/Div", "/a/very/long/name/of/a/node/that/was/cut/Reshape_out",
                                                "/a/Softmax"]


def test_cli_json(capsys):
    assert cli.main(["check", str(fixture_path("timm_deit_ts_op14.onnx")), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["march"] == "bayes-e"
    assert data["by_op_type"]["Softmax"] == {"BPU": 0, "CPU": 2}
    assert "rejects this opset-14 model" in data["warnings"][0]


def test_cli_checker_log(capsys, tmp_path):
    onnx.save(_converted(fixture_path("timm_deit_ts_op11.onnx")), str(tmp_path / "m.onnx"))
    assert cli.main(["check", str(tmp_path / "m.onnx"), "--checker-output", str(CHECKER_LOGS / "small_x5.log")]) == 0
    assert "the prediction agrees with the checker" in capsys.readouterr().out


def test_verify_without_hb_mapper(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(check.shutil, "which", lambda name: None)
    model = _converted(fixture_path("timm_deit_ts_op11.onnx"))
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert cli.main(["check", str(tmp_path / "m.onnx"), "--verify"]) == 2
    assert "needs hb_mapper on PATH" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["x3", "x5", "j5"])
def test_every_target_places_every_node(target):
    report = check.predict(_converted(fixture_path("timm_deit_ts_op14.onnx")), target)
    assert all(p.device in ("BPU", "CPU", "folded") for p in report.placements)
    assert all(p.reason for p in report.placements)
