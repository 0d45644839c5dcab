"""``vit2bpu eval``: exact top-1/top-5 on colour images, labels files, batching, JSON output and errors.

The colour classifier from images.py ranks the image's colour first (blue 0, green 1, red 2).
Classes 3, 4, 5 and 6 follow in that order, then the two other colours, and class 7 comes
last. Each expected accuracy below therefore follows from the labels alone.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import fixture_path, run
from images import (CLASS_NAMES, IMAGE_SPECS, UNREADABLE_FILES, save_colour_classifier, write_class_folders,
                    write_unreadable_files)
from onnx import TensorProto, helper

import vit2bpu
from vit2bpu import cli, evaluate
from vit2bpu.preprocess import from_options, load_image

FIXTURE = "timm_deit_ts_op14.onnx"  # input 'input' [1, 3, 64, 64], output 'logits' [1, 10]
DYNAMIC_BATCH_FIXTURE = "timm_deit_ts_op14_dynbatch.onnx"  # input 'input' ['batch', 3, 64, 64]
ALL_IMAGES = sorted(f"{cls}/{name}" for cls in CLASS_NAMES for name in IMAGE_SPECS)
CORRECT_LABELS = {relative: CLASS_NAMES.index(relative.split("/")[0]) for relative in ALL_IMAGES}


def evaluate_cli(*args) -> int:
    return cli.main(["eval", *map(str, args)])


def write_labels(path, labels: dict[str, int], separator: str = " ") -> None:
    path.write_text("".join(f"{relative}{separator}{label}\n" for relative, label in labels.items()))


@pytest.fixture
def clean_folder(tmp_path):
    root = tmp_path / "clean"
    write_class_folders(root)
    return root


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    write_class_folders(root)
    write_unreadable_files(root)
    return root


@pytest.fixture
def colour_model(tmp_path):
    return save_colour_classifier(tmp_path / "colour.onnx")


@pytest.fixture
def feed_shapes(monkeypatch):
    """Record the shape of every batch that eval feeds to onnxruntime."""
    shapes = []
    original = evaluate.Classifier._run

    def recording_run(self, feed):
        shapes.append(feed.shape)
        return original(self, feed)

    monkeypatch.setattr(evaluate.Classifier, "_run", recording_run)
    return shapes


# --- accuracy ------------------------------------------------------------------------------------------------------

def test_class_folders_all_correct(image_folder, colour_model, capsys):
    assert evaluate_cli(colour_model, "--images", image_folder) == 0
    captured = capsys.readouterr()
    assert "top-1 100.00% top-5 100.00% on 12 images" in captured.out
    for relative in UNREADABLE_FILES:
        assert f"vit2bpu eval: skipped {relative}: " in captured.err


def test_wrong_labels_lower_top1_and_top5(clean_folder, colour_model, tmp_path, capsys):
    labels = dict(CORRECT_LABELS)
    labels["red/solid.png"] = 6        # ranked 5th: a top-5 hit only
    labels["green/solid.png"] = 4      # ranked 3rd: a top-5 hit only
    labels["blue/solid.png"] = 2       # red ranks 7th on a blue image: a miss
    labels["red/striped.png"] = 7      # ranked last: a miss
    labels_file = tmp_path / "labels.txt"
    write_labels(labels_file, labels)
    assert evaluate_cli(colour_model, "--images", clean_folder, "--labels", labels_file) == 0
    assert "top-1 66.67% top-5 83.33% on 12 images" in capsys.readouterr().out


def test_labels_file_formats(image_folder, colour_model, tmp_path, capsys):
    lines = ["# path, label", ""]
    for index, (relative, label) in enumerate(CORRECT_LABELS.items()):
        lines.append(f"{relative},{label}" if index % 2 else f"{relative}\t{label}")
    lines.append("red/truncated.jpg 2")
    lines.append("red/missing.png 2")
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text("\n".join(lines) + "\n")
    assert evaluate_cli(colour_model, "--images", image_folder, "--labels", labels_file) == 0
    captured = capsys.readouterr()
    assert "top-1 100.00% top-5 100.00% on 12 images" in captured.out
    assert "skipped red/truncated.jpg: " in captured.err
    assert "skipped red/missing.png: FileNotFoundError" in captured.err
    assert "skipped blue/empty.jpg" not in captured.err  # not listed in the labels file


def test_fewer_than_five_classes(clean_folder, tmp_path, capsys):
    model = save_colour_classifier(tmp_path / "three.onnx", classes=3)
    labels = dict(CORRECT_LABELS)
    labels["red/solid.png"] = 1
    labels_file = tmp_path / "labels.txt"
    write_labels(labels_file, labels)
    report = tmp_path / "result.json"
    assert evaluate_cli(model, "--images", clean_folder, "--labels", labels_file, "--json", report) == 0
    assert "top-1 91.67% top-5 100.00% on 12 images" in capsys.readouterr().out
    assert json.loads(report.read_text())["top5_k"] == 3


def test_limit_takes_a_seeded_subset(clean_folder, colour_model, tmp_path, capsys):
    report = tmp_path / "result.json"
    assert evaluate_cli(colour_model, "--images", clean_folder, "--limit", 5, "--seed", 4, "--json", report) == 0
    assert "on 5 images" in capsys.readouterr().out
    indices = sorted(np.random.default_rng(4).choice(12, size=5, replace=False).tolist())
    expected = {}
    for i in indices:
        name = ALL_IMAGES[i].split("/")[0]
        expected[name] = expected.get(name, 0) + 1
    per_class = json.loads(report.read_text())["per_class"]
    assert {name: counts["images"] for name, counts in per_class.items()} == expected


# --- JSON ----------------------------------------------------------------------------------------------------------

def test_json_result(image_folder, colour_model, tmp_path):
    labels = dict(CORRECT_LABELS)
    labels["red/solid.png"] = 3
    labels["blue/solid.png"] = 7
    labels_file = tmp_path / "labels.txt"
    write_labels(labels_file, {**labels, "green/notes.png": 1})
    report_folder = tmp_path / "reports"
    report_folder.mkdir()
    report = report_folder / "result.json"
    assert evaluate_cli(colour_model, "--images", image_folder, "--labels", labels_file, "--json", report) == 0
    assert [p.name for p in report_folder.iterdir()] == ["result.json"]  # no temporary file left
    data = json.loads(report.read_text())
    assert data["model"] == str(colour_model)
    assert data["images"] == 12
    assert data["top1"] == pytest.approx(100.0 * 10 / 12, abs=1e-3)
    assert data["top5"] == pytest.approx(100.0 * 11 / 12, abs=1e-3)
    assert data["top1_correct"] == 10
    assert data["top5_correct"] == 11
    assert data["per_class"]["2"] == {"index": 2, "images": 3, "top1": 3, "top5": 3}
    assert data["per_class"]["3"] == {"index": 3, "images": 1, "top1": 0, "top5": 1}
    assert data["per_class"]["7"] == {"index": 7, "images": 1, "top1": 0, "top5": 0}
    assert [entry["image"] for entry in data["skipped"]] == ["green/notes.png"]
    assert data["preprocess"]["size"] == [64, 64]
    assert data["preprocess"]["normalize"] == "model"


def test_json_per_class_names_folders(image_folder, colour_model, tmp_path):
    report = tmp_path / "result.json"
    assert evaluate_cli(colour_model, "--images", image_folder, "--json", report) == 0
    per_class = json.loads(report.read_text())["per_class"]
    assert per_class == {name: {"index": i, "images": 4, "top1": 4, "top5": 4} for i, name in enumerate(CLASS_NAMES)}


def test_json_folder_missing(clean_folder, colour_model, tmp_path, capsys):
    assert evaluate_cli(colour_model, "--images", clean_folder, "--json", tmp_path / "no" / "r.json") == 6
    assert "does not exist" in capsys.readouterr().err


# --- batching and normalisation ------------------------------------------------------------------------------------

def test_symbolic_batch_runs_in_batches(clean_folder, colour_model, feed_shapes, capsys):
    assert evaluate_cli(colour_model, "--images", clean_folder, "--batch", 5) == 0
    assert "top-1 100.00% top-5 100.00% on 12 images" in capsys.readouterr().out
    # One probe image, then batches of 5, 5 and 2.
    assert [shape[0] for shape in feed_shapes] == [1, 5, 5, 2]


def test_fixed_batch_is_padded(clean_folder, tmp_path, feed_shapes, capsys):
    model = save_colour_classifier(tmp_path / "batch5.onnx", batch=5)
    assert evaluate_cli(model, "--images", clean_folder, "--batch", 3) == 0
    assert "top-1 100.00% top-5 100.00% on 12 images" in capsys.readouterr().out
    assert [shape[0] for shape in feed_shapes] == [5, 5, 5, 5]


def test_hb_mapper_normalises_before_feeding(clean_folder, colour_model, monkeypatch, capsys):
    feeds = []
    original = evaluate.Classifier._run

    def recording_run(self, feed):
        feeds.append(feed.copy())
        return original(self, feed)

    monkeypatch.setattr(evaluate.Classifier, "_run", recording_run)
    assert evaluate_cli(colour_model, "--images", clean_folder, "--normalize", "hb_mapper") == 0
    assert "top-1 100.00% top-5 100.00% on 12 images" in capsys.readouterr().out
    images = np.concatenate(feeds[1:])
    assert np.abs(images).max() < 3.0  # normalised, not 0-255 pixels
    assert images.max() > 2.0


def test_symbolic_class_count(clean_folder, tmp_path, capsys):
    model = save_colour_classifier(tmp_path / "symbolic.onnx", output="symbolic")
    assert evaluate_cli(model, "--images", clean_folder) == 0
    assert "top-1 100.00% top-5 100.00% on 12 images" in capsys.readouterr().out


def test_int8_qdq_model(clean_folder, colour_model, tmp_path, capsys):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    calibration = tmp_path / "calibration"
    assert cli.main(["calibrate", str(clean_folder), str(calibration), "--model", str(colour_model)]) == 0

    class NpyReader(CalibrationDataReader):
        def __init__(self):
            self.files = iter(sorted((calibration / "data").glob("*.bin")))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {"image": np.fromfile(path, np.float32).reshape(1, 3, 64, 64)}

    quantized = tmp_path / "colour_int8.onnx"
    quantize_static(str(colour_model), str(quantized), NpyReader(), quant_format=QuantFormat.QDQ)
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(quantized)).graph.node}
    capsys.readouterr()
    assert evaluate_cli(quantized, "--images", clean_folder) == 0
    assert "top-1 100.00% top-5 100.00% on 12 images" in capsys.readouterr().out


# --- original and converted ViT ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted_fixture(tmp_path_factory):
    model, _ = vit2bpu.convert(fixture_path(FIXTURE))
    path = tmp_path_factory.mktemp("converted") / "converted.onnx"
    vit2bpu.save(model, path)
    return path


def test_original_and_converted_vit(clean_folder, converted_fixture, tmp_path, capsys):
    config = from_options(size=(64, 64))
    logits = {relative: run(fixture_path(FIXTURE), {"input": load_image(clean_folder / relative, config)})[0][0]
              for relative in ALL_IMAGES}
    own_top1 = tmp_path / "own_top1.txt"
    write_labels(own_top1, {relative: int(np.argmax(row)) for relative, row in logits.items()})
    lowest = tmp_path / "lowest.txt"
    write_labels(lowest, {relative: int(np.argmin(row)) for relative, row in logits.items()})
    assert [d.dim_value for d in onnx.load(str(converted_fixture)).graph.input[0].type.tensor_type.shape.dim] == \
        [1, 3, 64, 64]
    models = [(fixture_path(FIXTURE), []), (converted_fixture, []), (fixture_path(DYNAMIC_BATCH_FIXTURE), ["--batch", 4])]
    for model, extra in models:
        assert evaluate_cli(model, "--images", clean_folder, "--labels", own_top1, *extra) == 0, model
        assert "top-1 100.00% top-5 100.00% on 12 images" in capsys.readouterr().out, model
        assert evaluate_cli(model, "--images", clean_folder, "--labels", lowest, *extra) == 0, model
        assert "top-1 0.00% top-5 0.00% on 12 images" in capsys.readouterr().out, model


# --- errors --------------------------------------------------------------------------------------------------------

def test_output_not_logits(clean_folder, tmp_path, capsys):
    model = save_colour_classifier(tmp_path / "pooled.onnx", output="pooled")
    assert evaluate_cli(model, "--images", clean_folder) == 2
    assert "output 'pooled' has shape ['N', 3, 1, 1]; eval expects logits [batch, classes]" in capsys.readouterr().err


def test_output_shape_checked_at_run_time(clean_folder, tmp_path, capsys):
    model = save_colour_classifier(tmp_path / "mislabelled.onnx", output="mislabelled")
    assert evaluate_cli(model, "--images", clean_folder) == 2
    assert "output 'pooled' has shape [1, 3, 1, 1] for an input batch of 1" in capsys.readouterr().err


def test_input_not_an_image(clean_folder, tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("ReduceMean", ["tokens"], ["logits"], axes=[2], keepdims=0)], "g",
                              [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, 197, 192])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 197])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    path = tmp_path / "tokens.onnx"
    onnx.save(model, str(path))
    assert evaluate_cli(path, "--images", clean_folder) == 2
    assert "of rank 3, expected a 4-D image input" in capsys.readouterr().err


def test_more_folders_than_outputs(clean_folder, tmp_path, capsys):
    model = save_colour_classifier(tmp_path / "two.onnx", classes=2)
    assert evaluate_cli(model, "--images", clean_folder) == 2
    assert "has 3 class subfolders but the model outputs 2 classes" in capsys.readouterr().err


def test_label_beyond_outputs(clean_folder, colour_model, tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    write_labels(labels_file, {**CORRECT_LABELS, "red/solid.png": 8})
    assert evaluate_cli(colour_model, "--images", clean_folder, "--labels", labels_file) == 2
    assert "labels 'red/solid.png' as 8" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("red/solid.png cat\n", "labels.txt:1: label 'cat' is not a class index"),
    ("# header\nred/solid.png\n", "labels.txt:2: expected 'relative/path.jpg LABEL_INDEX'"),
    ("red/solid.png -1\n", "labels.txt:1: label -1 is negative"),
    ("red/solid.png 2\nred/solid.png 1\n", "labels.txt:2: 'red/solid.png' is labelled 1 here and 2"),
    ("# only a comment\n", "has no 'relative/path.jpg LABEL_INDEX' lines"),
])
def test_invalid_labels_file(clean_folder, colour_model, tmp_path, capsys, content, message):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text(content)
    assert evaluate_cli(colour_model, "--images", clean_folder, "--labels", labels_file) == 2
    assert message in capsys.readouterr().err


def test_missing_labels_file(clean_folder, colour_model, tmp_path, capsys):
    assert evaluate_cli(colour_model, "--images", clean_folder, "--labels", tmp_path / "none.txt") == 2
    assert "labels file" in capsys.readouterr().err


def test_no_class_subfolders(tmp_path, colour_model, capsys):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    assert evaluate_cli(colour_model, "--images", root) == 2
    assert "has no class subfolders" in capsys.readouterr().err


def test_missing_image_folder(colour_model, tmp_path, capsys):
    assert evaluate_cli(colour_model, "--images", tmp_path / "nowhere") == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_readable_image(tmp_path, colour_model, capsys):
    root = tmp_path / "broken"
    write_unreadable_files(root)
    assert evaluate_cli(colour_model, "--images", root) == 3
    err = capsys.readouterr().err
    assert "none of the 3 images could be read" in err
    assert err.count("vit2bpu eval: skipped ") == 3


def test_missing_model(clean_folder, tmp_path, capsys):
    assert evaluate_cli(tmp_path / "nope.onnx", "--images", clean_folder) == 3
    assert "nope.onnx: file not found" in capsys.readouterr().err
