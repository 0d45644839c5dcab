"""Synthetic image folders and a colour classifier whose predictions are known exactly, for calibrate and eval tests.

``write_class_folders`` writes 3 classes (blue, green, red: indices 0, 1, 2 in sorted
order) of 4 images each, solid or striped, as PNG and JPEG of different sizes and aspect
ratios. ``save_colour_classifier`` writes an ONNX graph that averages each normalised
colour channel (GlobalAveragePool) and maps the means to logits with a Gemm, so a
blue, green or red image scores highest on class 0, 1 or 2.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

# Class name -> RGB colour; the sorted names give the class indices blue 0, green 1, red 2.
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
CLASS_NAMES = sorted(COLOURS)

# File name -> (width, height, striped): landscape, portrait, square and a 3:1 strip.
IMAGE_SPECS = {
    "solid.png": (80, 60, False),
    "striped.png": (60, 90, True),
    "solid.jpg": (50, 50, False),
    "striped.jpeg": (120, 40, True),
}

# Files that list_images returns but Pillow cannot read, placed inside the class folders.
UNREADABLE_FILES = ("red/truncated.jpg", "green/notes.png", "blue/empty.jpg")


def colour_image(colour: tuple[int, int, int], width: int, height: int, striped: bool) -> Image.Image:
    """Return a solid image, or vertical 3-pixel stripes of the colour at full and half intensity."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = colour
    if striped:
        for start in range(3, width, 6):
            pixels[:, start:start + 3] = [c // 2 for c in colour]
    return Image.fromarray(pixels, "RGB")


def write_class_folders(root: Path) -> list[str]:
    """Write the 12 class images below ``root`` and return their relative paths, sorted."""
    written = []
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for file_name, (width, height, striped) in IMAGE_SPECS.items():
            options = {"quality": 95} if file_name.endswith((".jpg", ".jpeg")) else {}
            colour_image(colour, width, height, striped).save(root / name / file_name, **options)
            written.append(f"{name}/{file_name}")
    return sorted(written)


def write_unreadable_files(root: Path) -> list[str]:
    """Write a truncated JPEG, a text file named .png and a zero-byte .jpg; return their relative paths, sorted."""
    buffer = io.BytesIO()
    colour_image((200, 30, 40), 64, 64, True).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    contents = {
        "red/truncated.jpg": jpeg[: len(jpeg) // 2],
        "green/notes.png": b"these are notes, not an image\n",
        "blue/empty.jpg": b"",
    }
    for relative, data in contents.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return sorted(contents)


def colour_classifier_weights(classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the Gemm weight [3, classes] and bias [classes] of the colour classifier.

    Class 0, 1 and 2 score 10 times the mean of the normalised blue, green and red channel.
    Classes 3 to 6 score the constants -2 to -5, so they fill ranks 2 to 5 behind the true
    colour, and class 7 scores -1000, so it is never in the top 5.
    """
    weight = np.zeros((3, classes), np.float32)
    bias = np.zeros(classes, np.float32)
    for index, channel in enumerate((2, 1, 0)[:classes]):
        weight[channel, index] = 10.0
    constants = [-2.0, -3.0, -4.0, -5.0, -1000.0]
    for index in range(3, classes):
        bias[index] = constants[index - 3] if index - 3 < len(constants) else -1000.0
    return weight, bias


def save_colour_classifier(path: Path, batch="N", height=64, width=64, classes: int = 8,
                           output: str = "logits") -> Path:
    """Write the colour classifier with input 'image' [batch, 3, height, width] (str dims are symbolic).

    ``output`` selects the graph output: 'logits' is [batch, classes] and 'symbolic' declares the
    logits as [batch, 'classes']. 'pooled' outputs the pooled [batch, 3, 1, 1] tensor, and
    'mislabelled' outputs that tensor but declares it as [batch, classes], so only a run shows the error.
    """
    weight, bias = colour_classifier_weights(classes)
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"], name="pool")]
    if output == "pooled":
        outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [batch, 3, 1, 1])]
    elif output == "mislabelled":
        outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [batch, classes])]
    else:
        nodes.append(helper.make_node("Flatten", ["pooled"], ["means"], name="flatten", axis=1))
        nodes.append(helper.make_node("Gemm", ["means", "weight", "bias"], ["logits"], name="head"))
        shape = [batch, "classes" if output == "symbolic" else classes]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)]
    graph = helper.make_graph(
        nodes, "colour_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, height, width])], outputs,
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7  # onnxruntime 1.16 reads IR versions up to 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
