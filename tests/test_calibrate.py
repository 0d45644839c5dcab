"""``vit2bpu calibrate``: the tensor files, their values, the seeded subset, the JSON files and the error exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import fixture_path
from images import (IMAGE_SPECS, UNREADABLE_FILES, save_colour_classifier, write_class_folders,
                    write_unreadable_files)
from onnx import TensorProto, helper
from PIL import Image

from vit2bpu import cli
from vit2bpu.calibrate import tensor_names
from vit2bpu.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, normalize_raw

FIXTURE = "timm_deit_ts_op14.onnx"  # input 'input' [1, 3, 64, 64]


def calibrate(*args) -> int:
    return cli.main(["calibrate", *map(str, args)])


def npy_name(relative: str) -> str:
    return relative.replace("/", "_") + ".bin"


def npy_files(out) -> list[str]:
    return sorted(p.name for p in (out / "data").glob("*.bin"))


def load_tensor(path) -> np.ndarray:
    """Read a headerless float32 calibration file, as hb_mapper does, in the shape its manifest records."""
    path = Path(path)
    manifest = json.loads((path.parent.parent / "manifest.json").read_text())
    return np.fromfile(path, dtype=np.float32).reshape(manifest["input"]["shape"])


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
    (root / "red" / "readme.txt").write_text("not an image suffix, so never listed\n")
    return root


def save_noise_image(path, width: int, height: int) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


def hand_crop_96x60(path) -> np.ndarray:
    """Return the 64x64 timm-deit crop of a 96x60 image as HWC float32 pixels in 0-255, computed by hand.

    timm-deit keeps the ratio 248/224 of shorter side to crop, so the shorter side (the height, 60)
    becomes round(248 * 64 / 224) = 71 and the width round(96 * 71 / 60) = round(113.6) = 114.
    The centre crop then starts at row (71 - 64) // 2 = 3 and column (114 - 64) // 2 = 25.
    """
    with Image.open(path) as image:
        resized = np.asarray(image.convert("RGB").resize((114, 71), Image.BICUBIC), np.float32)
    return resized[3:67, 25:89]


def save_model_with_inputs(path, inputs: dict[str, list]) -> None:
    """Write an Identity graph with the given float inputs (name -> shape)."""
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in inputs]
    graph = helper.make_graph(
        nodes, "identity",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, shape) for name, shape in inputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.save(model, str(path))


# --- output files --------------------------------------------------------------------------------------------------

def test_one_raw_float32_file_per_image(image_folder, tmp_path, capsys):
    out = tmp_path / "cal"
    assert calibrate(image_folder, out, "--model", fixture_path(FIXTURE)) == 0
    expected = sorted(npy_name(f"{cls}/{name}") for cls in ("blue", "green", "red") for name in IMAGE_SPECS)
    # The tensors sit alone in data/, and no staging folder or temporary file is left behind.
    assert sorted(p.name for p in (out / "data").iterdir()) == expected
    assert sorted(p.name for p in out.iterdir()) == ["data", "manifest.json", "preprocess.json"]
    for name in expected:
        # Headerless: exactly 1 * 3 * 64 * 64 float32 values, as numpy.fromfile in hb_mapper expects.
        assert (out / "data" / name).stat().st_size == 3 * 64 * 64 * 4, name
    summary = capsys.readouterr().out
    assert "wrote 12 .bin files (float32 [1, 3, 64, 64])" in summary
    assert "skipped 3 unreadable" in summary
    assert str(out / "data") in summary
    assert "normalize=model" in summary


def test_manifest_lists_files_and_skipped(image_folder, tmp_path, capsys):
    out = tmp_path / "cal"
    assert calibrate(image_folder, out, "--model", fixture_path(FIXTURE), "--seed", 3) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    relative_paths = sorted(f"{cls}/{name}" for cls in ("blue", "green", "red") for name in IMAGE_SPECS)
    assert manifest["files"] == {relative: "data/" + npy_name(relative) for relative in relative_paths}
    assert manifest["input"] == {"name": "input", "shape": [1, 3, 64, 64], "dtype": "float32"}
    assert manifest["count"] == 12
    assert manifest["available_images"] == 15
    assert manifest["requested_count"] is None
    assert manifest["seed"] == 3
    assert manifest["normalize"] == "model"
    assert [entry["image"] for entry in manifest["skipped"]] == sorted(UNREADABLE_FILES)
    errors = {entry["image"]: entry["error"] for entry in manifest["skipped"]}
    assert errors["red/truncated.jpg"].startswith("OSError")
    assert errors["green/notes.png"].startswith("UnidentifiedImageError")
    assert errors["blue/empty.jpg"].startswith("UnidentifiedImageError")
    stderr_lines = capsys.readouterr().err.splitlines()
    for relative in UNREADABLE_FILES:
        assert sum(line.startswith(f"vit2bpu calibrate: skipped {relative}: ") for line in stderr_lines) == 1


def test_colliding_names_get_a_suffix(tmp_path):
    root = tmp_path / "images"
    save_noise_image(root / "a" / "b_c.png", 70, 70)
    save_noise_image(root / "a_b" / "c.png", 70, 70)
    out = tmp_path / "cal"
    assert calibrate(root, out, "--model", fixture_path(FIXTURE)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {"a/b_c.png": "data/a_b_c.png.bin", "a_b/c.png": "data/a_b_c.png.2.bin"}
    assert npy_files(out) == ["a_b_c.png.2.bin", "a_b_c.png.bin"]


def test_npy_format(image_folder, tmp_path):
    out = tmp_path / "cal"
    assert calibrate(image_folder, out, "--model", fixture_path(FIXTURE), "--format", "npy", "--count", "2") == 0
    arrays = [np.load(p) for p in sorted((out / "data").glob("*.npy"))]
    assert [a.shape for a in arrays] == [(1, 3, 64, 64)] * 2
    assert all(a.dtype == np.float32 for a in arrays)
    assert json.loads((out / "manifest.json").read_text())["format"] == "npy"


def test_tensor_names_unique_case_insensitively():
    assert tensor_names(["A/x.png", "a_x.png", "a/X.png"]) == ["A_x.png.bin", "a_x.png.2.bin", "a_X.png.3.bin"]
    assert tensor_names(["a/x.png"], ".npy") == ["a_x.png.npy"]


# --- values --------------------------------------------------------------------------------------------------------

def test_normalised_values_match_hand_computation(tmp_path):
    image = tmp_path / "images" / "noise.png"
    save_noise_image(image, 96, 60)
    out = tmp_path / "cal"
    assert calibrate(tmp_path / "images", out, "--model", fixture_path(FIXTURE)) == 0
    crop = hand_crop_96x60(image)
    expected = ((crop / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)[None]
    written = load_tensor(out / "data" / "noise.png.bin")
    assert written.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(written, expected, atol=1e-5)


def test_hb_mapper_writes_raw_pixels(tmp_path, capsys):
    image = tmp_path / "images" / "noise.png"
    save_noise_image(image, 96, 60)
    out = tmp_path / "cal"
    assert calibrate(tmp_path / "images", out, "--model", fixture_path(FIXTURE), "--normalize", "hb_mapper") == 0
    written = load_tensor(out / "data" / "noise.png.bin")
    assert written.dtype == np.float32
    np.testing.assert_array_equal(written[0], hand_crop_96x60(image).transpose(2, 0, 1))
    assert written.max() > 200
    assert written.min() >= 0
    assert "normalize=hb_mapper" in capsys.readouterr().out
    config = Preprocess.load(out)
    assert config.normalize == "hb_mapper"
    # hb_mapper's mean and scale turn the raw data into the model's normalised input.
    model_out = tmp_path / "cal_model"
    assert calibrate(tmp_path / "images", model_out, "--model", fixture_path(FIXTURE)) == 0
    np.testing.assert_allclose(normalize_raw(written, config), load_tensor(model_out / "data" / "noise.png.bin"), atol=1e-5)


def test_solid_red_has_exact_normalised_values(clean_folder, tmp_path):
    out = tmp_path / "cal"
    assert calibrate(clean_folder, out, "--model", fixture_path(FIXTURE)) == 0
    written = load_tensor(out / "data" / "red_solid.png.bin")
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(written[0, channel], value, atol=1e-5, err_msg=f"channel {channel}")


# --- subset and settings -------------------------------------------------------------------------------------------

def test_subset_follows_the_seed(clean_folder, tmp_path):
    def chosen(seed: int, name: str) -> list[str]:
        out = tmp_path / name
        assert calibrate(clean_folder, out, "--model", fixture_path(FIXTURE), "--count", 5, "--seed", seed) == 0
        assert len(npy_files(out)) == 5
        return sorted(json.loads((out / "manifest.json").read_text())["files"])

    all_images = sorted(f"{cls}/{name}" for cls in ("blue", "green", "red") for name in IMAGE_SPECS)
    first = chosen(1, "first")
    indices = sorted(np.random.default_rng(1).choice(12, size=5, replace=False).tolist())
    assert first == [all_images[i] for i in indices]
    assert chosen(1, "again") == first
    assert chosen(2, "other") != first


def test_count_above_available_takes_all(clean_folder, tmp_path):
    out = tmp_path / "cal"
    assert calibrate(clean_folder, out, "--model", fixture_path(FIXTURE), "--count", 50) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 12
    assert manifest["requested_count"] == 50


def test_default_preprocess_json_round_trips(clean_folder, tmp_path):
    out = tmp_path / "cal"
    assert calibrate(clean_folder, out, "--model", fixture_path(FIXTURE)) == 0
    assert Preprocess.load(out) == Preprocess(size=(64, 64), resize=71, interpolation="bicubic", mean=IMAGENET_MEAN,
                                              std=IMAGENET_STD, normalize="model", preset="timm-deit")


def test_explicit_options_round_trip(clean_folder, tmp_path):
    out = tmp_path / "cal"
    args = [clean_folder, out, "--model", fixture_path(FIXTURE), "--preset", "hf-vit", "--resize", 80,
            "--interpolation", "nearest", "--mean", 0.1, 0.2, 0.3, "--std", 0.4, 0.5, 0.6, "--normalize", "hb_mapper"]
    assert calibrate(*args) == 0
    assert Preprocess.load(out) == Preprocess(size=(64, 64), resize=80, interpolation="nearest", mean=(0.1, 0.2, 0.3),
                                              std=(0.4, 0.5, 0.6), normalize="hb_mapper", preset="hf-vit")


def test_symbolic_batch_model(clean_folder, tmp_path):
    out = tmp_path / "cal"
    assert calibrate(clean_folder, out, "--model", fixture_path("timm_deit_ts_op14_dynbatch.onnx"), "--count", 2) == 0
    assert [load_tensor(p).shape for p in (out / "data").glob("*.bin")] == [(1, 3, 64, 64)] * 2


def test_symbolic_size_needs_size_option(clean_folder, tmp_path, capsys):
    model = save_colour_classifier(tmp_path / "any_size.onnx", batch="N", height="H", width="W")
    assert calibrate(clean_folder, tmp_path / "cal", "--model", model) == 2
    assert "symbolic height or width" in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()
    assert calibrate(clean_folder, tmp_path / "cal", "--model", model, "--size", "48x32", "--count", 3) == 0
    assert [load_tensor(p).shape for p in (tmp_path / "cal" / "data").glob("*.bin")] == [(1, 3, 48, 32)] * 3
    assert Preprocess.load(tmp_path / "cal").size == (48, 32)


# --- output folder -------------------------------------------------------------------------------------------------

def test_non_empty_folder_needs_force(clean_folder, tmp_path, capsys):
    out = tmp_path / "cal"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert calibrate(clean_folder, out, "--model", fixture_path(FIXTURE)) == 6
    assert "output folder is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_force_replaces_npy_and_json(clean_folder, tmp_path):
    out = tmp_path / "cal"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me\n")
    (out / "data" / "stale.png.bin").write_bytes(b"old calibration data")
    (out / "data" / "red_solid.png.bin").write_bytes(b"old calibration data")
    (out / "manifest.json").write_text("{}")
    assert calibrate(clean_folder, out, "--model", fixture_path(FIXTURE), "--force") == 0
    assert not (out / "data" / "stale.png.bin").exists()
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert load_tensor(out / "data" / "red_solid.png.bin").shape == (1, 3, 64, 64)
    assert json.loads((out / "manifest.json").read_text())["count"] == 12
    assert len(npy_files(out)) == 12


def test_force_warns_about_other_files_in_data(clean_folder, tmp_path, caplog):
    out = tmp_path / "cal"
    (out / "data").mkdir(parents=True)
    (out / "data" / "sample.txt").write_bytes(b"raw tensor of an older tool")
    assert calibrate(clean_folder, out, "--model", fixture_path(FIXTURE), "--force") == 0
    assert (out / "data" / "sample.txt").exists()
    assert "kept 1 entries that are not tensor files (sample.txt)" in caplog.text


def test_output_path_is_a_file(clean_folder, tmp_path, capsys):
    out = tmp_path / "cal"
    out.write_text("a file\n")
    assert calibrate(clean_folder, out, "--model", fixture_path(FIXTURE)) == 6
    assert "not a folder" in capsys.readouterr().err


# --- bad input -----------------------------------------------------------------------------------------------------

def test_missing_image_folder_is_a_usage_error(tmp_path, capsys):
    assert calibrate(tmp_path / "nowhere", tmp_path / "cal", "--model", fixture_path(FIXTURE)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()


def test_no_readable_image(tmp_path, capsys):
    root = tmp_path / "broken"
    write_unreadable_files(root)
    out = tmp_path / "cal"
    assert calibrate(root, out, "--model", fixture_path(FIXTURE)) == 3
    err = capsys.readouterr().err
    assert "none of the 3 chosen images could be read" in err
    assert err.count("vit2bpu calibrate: skipped ") == 3
    assert not out.exists()  # the folder this run created is removed again


def test_no_readable_image_keeps_existing_data(tmp_path):
    root = tmp_path / "broken"
    write_unreadable_files(root)
    out = tmp_path / "cal"
    (out / "data").mkdir(parents=True)
    (out / "data" / "earlier.png.bin").write_bytes(b"earlier run")
    assert calibrate(root, out, "--model", fixture_path(FIXTURE), "--force") == 3
    assert [p.name for p in out.iterdir()] == ["data"]
    assert npy_files(out) == ["earlier.png.bin"]


def test_folder_without_images(tmp_path, capsys):
    root = tmp_path / "texts"
    root.mkdir()
    (root / "readme.txt").write_text("no images here\n")
    assert calibrate(root, tmp_path / "cal", "--model", fixture_path(FIXTURE)) == 3
    assert "no image files" in capsys.readouterr().err


def test_missing_model(clean_folder, tmp_path, capsys):
    assert calibrate(clean_folder, tmp_path / "cal", "--model", tmp_path / "nope.onnx") == 3
    assert "nope.onnx: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("inputs, message", [
    ({"image": [1, 3, 64, 64], "mask": [1, 3, 64, 64]}, "model has 2 inputs ('image', 'mask')"),
    ({"tokens": [1, 197, 192]}, "of rank 3, expected a 4-D image input"),
    ({"image": [1, 64, 64, 3]}, "expected 3 colour channels"),
    ({"image": [2, 3, 64, 64]}, "has a fixed batch of 2"),
])
def test_unsupported_model_input(clean_folder, tmp_path, capsys, inputs, message):
    model = tmp_path / "model.onnx"
    save_model_with_inputs(model, inputs)
    assert calibrate(clean_folder, tmp_path / "cal", "--model", model) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--count", "0"], "must be at least 1"),
    (["--size", "64x"], "invalid size"),
    (["--size", "32x32"], "does not match input 'input'"),
    (["--preset", "resnet"], "invalid choice"),
    (["--normalize", "bpu"], "invalid choice"),
])
def test_invalid_option(clean_folder, tmp_path, capsys, option, message):
    assert calibrate(clean_folder, tmp_path / "cal", "--model", fixture_path(FIXTURE), *option) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()


def test_command_line_entry_point(image_folder, tmp_path):
    out = tmp_path / "cal"
    result = subprocess.run([sys.executable, "-m", "vit2bpu", "calibrate", str(image_folder), str(out), "--model",
                             str(fixture_path(FIXTURE)), "--count", "4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote ")
    assert "Traceback" not in result.stderr
