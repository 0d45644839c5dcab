"""``vit2bpu calibrate``: write hb_mapper calibration tensors from a folder of images.

Each chosen image is preprocessed with ``preprocess.load_image`` and saved as one
float32 ``[1, 3, H, W]`` tensor in the model's NCHW input layout, for hb_mapper's
``cal_data_type: float32``. hb_mapper 1.24.3 reads each calibration file with
``numpy.fromfile`` (no header), so the default ``--format raw`` writes headerless
``.bin`` files; ``--format npy`` writes ``.npy`` files for numpy users, which
hb_mapper cannot read. The arrays go to ``OUT_DIR/data/``, the folder that
``hb-config`` writes as ``cal_data_dir``. ``OUT_DIR`` itself receives
``preprocess.json`` (read by ``hb-config``) and ``manifest.json`` (which image became
which file, the input name and shape, the seed and the skipped files).

The helpers for the model's image input, the preprocessing options and the
seeded subset are shared with ``vit2bpu eval``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .errors import EXIT_OK, InputModelError, OutputError, UsageError
from .model_io import load_model
from .preprocess import (DATA_SUBDIR, IMAGE_SUFFIXES, NORMALIZE_CHOICES, PRESETS, SETTINGS_FILE, Preprocess,
                         Skipped, from_options, list_images, load_image)
from .progress import Progress

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# --format -> file suffix
FORMATS = {"raw": ".bin", "npy": ".npy"}

# Exceptions that Pillow raises for a missing, truncated, corrupt or non-image file. Image.open
# turns most into UnidentifiedImageError (an OSError) and a truncated file fails with OSError on
# load, but plugin code such as the PNG chunk reader also raises SyntaxError or ValueError
# (Pillow 12.3 and 13.0). DecompressionBombError derives from Exception only.
try:
    from PIL.Image import DecompressionBombError
except ImportError:  # load_image raises a UsageError with the install command for Pillow
    DecompressionBombError = OSError
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, DecompressionBombError)


# --- options shared with ``vit2bpu eval`` ---------------------------------------------------------------------

def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """argparse type: ``HxW`` (``224x224``) or one number for a square size."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size '{text}': write HxW, e.g. 224x224") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"invalid size '{text}': write HxW with two positive integers")
    return dims[0], dims[1]


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the preprocessing options that ``calibrate`` and ``eval`` share."""
    group = parser.add_argument_group("preprocessing (explicit values override the preset)")
    group.add_argument("--preset", choices=sorted(PRESETS), default="timm-deit",
                       help="evaluation transform of the model family (default: timm-deit)")
    group.add_argument("--size", type=parse_size, metavar="HxW",
                       help="crop size in pixels (default: the height and width of the model input)")
    group.add_argument("--resize", type=positive_int, metavar="N",
                       help="length in pixels of the shorter image side before the centre crop "
                            "(default: the preset's ratio to the crop size)")
    group.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"),
                       help="resampling filter for the resize (default: the preset's)")
    group.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                       help="per-channel mean of pixel values scaled to [0, 1] (default: the preset's)")
    group.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                       help="per-channel standard deviation of pixel values scaled to [0, 1] (default: the preset's)")
    group.add_argument("--normalize", choices=NORMALIZE_CHOICES, default="model",
                       help="where mean/std are applied: 'model' (the tensor is normalised, default) or "
                            "'hb_mapper' (raw 0-255 pixels, hb_mapper normalises with data_mean_and_scale)")


@dataclass
class ImageInput:
    """The single NCHW image input of a model; a dimension is None when it is symbolic."""

    name: str
    batch: int | None
    channels: int | None
    height: int | None
    width: int | None
    dtype: np.dtype

    def dims(self) -> list:
        return [d if d is not None else "?" for d in (self.batch, self.channels, self.height, self.width)]


def read_image_input(model: onnx.ModelProto, path: str) -> ImageInput:
    """Return the model's image input, or raise UsageError unless it has one float input of rank 4 with 3 channels."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
        raise UsageError(f"model has {len(inputs)} inputs ({names}); only models with a single image input "
                         "[batch, 3, height, width] are supported", path=path)
    tensor_type = inputs[0].type.tensor_type
    name = inputs[0].name
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):  # undefined (0) or an element type numpy has no dtype for
        dtype = None
    if dtype is None or dtype.kind != "f":
        raise UsageError(f"input '{name}' has element type {dtype}, expected a float image tensor", path=path)
    if not tensor_type.HasField("shape"):
        raise UsageError(f"input '{name}' has no declared shape, expected [batch, 3, height, width]", path=path)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if len(dims) != 4:
        shape_text = [d if d is not None else "?" for d in dims]
        raise UsageError(f"input '{name}' has shape {shape_text} of rank {len(dims)}, expected a 4-D image input "
                         "[batch, 3, height, width]", path=path)
    image_input = ImageInput(name, *dims, dtype=dtype)
    if image_input.channels not in (None, 3):
        raise UsageError(f"input '{name}' has shape {image_input.dims()}, expected 3 colour channels in "
                         "NCHW layout [batch, 3, height, width]", path=path)
    return image_input


def preprocess_from_args(args, image_input: ImageInput) -> Preprocess:
    """Build the Preprocess for the options, taking the crop size from the model unless --size is given."""
    model_size = (image_input.height, image_input.width)
    size = args.size
    if size is None:
        if None in model_size:
            raise UsageError(f"input '{image_input.name}' has shape {image_input.dims()} with a symbolic height "
                             "or width", hint="pass --size HxW")
        size = model_size
    elif any(m is not None and m != s for m, s in zip(model_size, size)):
        raise UsageError(f"--size {size[0]}x{size[1]} does not match input '{image_input.name}' of shape "
                         f"{image_input.dims()}", hint="omit --size to use the model's height and width")
    return from_options(preset=args.preset, size=size, resize=args.resize, interpolation=args.interpolation,
                        mean=args.mean, std=args.std, normalize=args.normalize)


def choose_subset(items: list, count: int | None, seed: int) -> list:
    """Pick ``count`` items without replacement with ``numpy.random.default_rng(seed)``, kept in their input order.

    Returns all items when ``count`` is None or at least ``len(items)``.
    """
    if count is None or count >= len(items):
        return list(items)
    chosen = np.random.default_rng(seed).choice(len(items), size=count, replace=False)
    return [items[i] for i in sorted(chosen.tolist())]


def relative_name(path: Path, root: Path) -> str:
    """Return ``path`` relative to ``root`` with forward slashes, as shown in messages and manifests."""
    return path.relative_to(root).as_posix()


def report_skipped(skipped: Skipped, command: str) -> None:
    for image, reason in skipped.files:
        print(f"vit2bpu {command}: skipped {image}: {reason}", file=sys.stderr)


# --- calibrate -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", metavar="IMAGES_DIR", help="folder of images, searched recursively")
    parser.add_argument("output", metavar="OUT_DIR",
                        help="folder for preprocess.json, manifest.json and the tensor files in its data/ subfolder; "
                             "created if missing, must be empty unless --force")
    parser.add_argument("--model", required=True, metavar="MODEL.onnx",
                        help="model whose single image input sets the tensor name, layout and default size")
    add_preprocess_arguments(parser)
    parser.add_argument("--count", type=positive_int, metavar="N",
                        help="number of images to pick at random (default: all images)")
    parser.add_argument("--seed", type=int, default=0, help="seed for picking the --count images (default 0)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="raw",
                        help="raw: headerless float32 .bin files, as hb_mapper reads them (default); "
                             "npy: .npy files for numpy")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT_DIR, replacing the tensor files in OUT_DIR/data/ and the "
                             "two .json files")


def tensor_names(relative_paths: list[str], suffix: str = ".bin") -> list[str]:
    """Return one unique file name per image: the relative path with '/' replaced by '_', plus ``suffix``.

    A name already taken (compared case-insensitively, for case-insensitive file systems) gets a
    numeric suffix, so 'a/b_c.png' and 'a_b/c.png' become 'a_b_c.png.bin' and 'a_b_c.png.2.bin'.
    """
    used_names = set()
    names = []
    for relative in relative_paths:
        stem = relative.replace("/", "_").replace("\\", "_")
        name = f"{stem}{suffix}"
        number = 2
        while name.lower() in used_names:
            name = f"{stem}.{number}{suffix}"
            number += 1
        used_names.add(name.lower())
        names.append(name)
    return names


def prepare_output_folder(folder: Path, force: bool) -> bool:
    """Create ``folder`` or check that it is empty (or that --force is set); return whether it was created."""
    if folder.exists() and not folder.is_dir():
        raise OutputError("output path exists and is not a folder", path=str(folder))
    if folder.is_dir():
        if any(folder.iterdir()) and not force:
            raise OutputError("output folder is not empty", path=str(folder),
                              hint="choose a new or empty folder, or pass --force to replace its data/ files and "
                                   ".json files")
        return False
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"could not create the output folder: {exc.strerror or exc}", path=str(folder)) from None
    return True


def write_tensors(chosen: list[Path], root: Path, config: Preprocess, staging: Path,
                  file_format: str = "raw") -> tuple[dict, Skipped]:
    """Preprocess each image into ``staging``; return {relative image path: file name} and the skipped files."""
    relative_paths = [relative_name(path, root) for path in chosen]
    written = {}
    skipped = Skipped()
    with Progress(len(chosen), "calibrate") as progress:
        for path, relative, name in zip(chosen, relative_paths, tensor_names(relative_paths, FORMATS[file_format])):
            try:
                tensor = load_image(path, config)
            except UNREADABLE_IMAGE_ERRORS as exc:
                skipped.add(relative, exc)
            else:
                target = staging / name
                try:
                    with open(target, "wb") as handle:
                        if file_format == "npy":
                            np.save(handle, tensor.astype(np.float32, copy=False))
                        else:
                            tensor.astype(np.float32, copy=False).tofile(handle)
                except OSError as exc:
                    raise OutputError(f"could not be written: {exc.strerror or exc}", path=str(target),
                                      hint="check free space and permissions") from None
                written[relative] = name
            progress.update()
    return written, skipped


def publish(staging: Path, folder: Path, written: dict, config: Preprocess, manifest: dict, force: bool) -> None:
    """Move the staged files into place with os.replace: the tensor files into ``folder/data``, then the JSON files.

    With ``force``, tensor files of an earlier run that this run did not replace are deleted.
    """
    data = folder / DATA_SUBDIR
    try:
        config.save(staging)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        data.mkdir(exist_ok=True)
        for name in written.values():
            os.replace(staging / name, data / name)
        os.replace(staging / SETTINGS_FILE, folder / SETTINGS_FILE)
        os.replace(staging / MANIFEST_FILE, folder / MANIFEST_FILE)
    except OSError as exc:
        raise OutputError(f"could not be written: {exc.strerror or exc}", path=str(folder),
                          hint="check free space and permissions") from None
    if not force:
        return
    keep = set(written.values())
    others = []
    for entry in sorted(data.iterdir()):
        if entry.name in keep:
            continue
        if entry.is_file() and entry.suffix in FORMATS.values():
            entry.unlink()
        else:
            others.append(entry.name)
    if others:
        log.warning("%s: kept %d entries that are not tensor files (%s); hb_mapper reads every file in cal_data_dir, "
                    "so remove them before calibrating", data, len(others), ", ".join(others[:5]))


def build_manifest(args, image_input: ImageInput, config: Preprocess, available: int, written: dict,
                   skipped: Skipped) -> dict:
    height, width = config.size
    return {
        "vit2bpu_version": __version__,
        "model": str(args.model),
        "images_dir": str(args.images),
        "input": {"name": image_input.name, "shape": [1, 3, height, width], "dtype": "float32"},
        "format": args.format,
        "normalize": config.normalize,
        "count": len(written),
        "requested_count": args.count,
        "available_images": available,
        "seed": args.seed,
        "files": {image: f"{DATA_SUBDIR}/{name}" for image, name in written.items()},
        "skipped": [{"image": image, "error": reason} for image, reason in skipped.files],
    }


def write_calibration_set(args, image_input: ImageInput, config: Preprocess, images: list[Path],
                          chosen: list[Path]) -> tuple[dict, Skipped]:
    """Write the chosen images, preprocess.json and manifest.json into OUT_DIR; return the written and skipped files.

    Everything is first written to a hidden staging folder inside OUT_DIR and then moved into
    place with os.replace, so a failed or interrupted run leaves OUT_DIR as it was, except for a
    new OUT_DIR, which is removed again.
    """
    folder = Path(args.output)
    created = prepare_output_folder(folder, args.force)
    staging = None
    succeeded = False
    try:
        try:
            staging = Path(tempfile.mkdtemp(prefix=".calibrate-", suffix=".tmp", dir=folder))
        except OSError as exc:
            raise OutputError(f"cannot write in the output folder: {exc.strerror or exc}", path=str(folder)) from None
        written, skipped = write_tensors(chosen, Path(args.images), config, staging, args.format)
        report_skipped(skipped, "calibrate")
        if not written:
            raise InputModelError(f"none of the {len(chosen)} chosen images could be read, so nothing was written",
                                  path=str(args.images), hint="see the skipped files above")
        manifest = build_manifest(args, image_input, config, len(images), written, skipped)
        publish(staging, folder, written, config, manifest, args.force)
        succeeded = True
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created and not succeeded:
            try:
                folder.rmdir()
            except OSError:
                pass  # another process wrote into the new folder meanwhile: leave it
    return written, skipped


def run(args) -> int:
    model = load_model(args.model)
    image_input = read_image_input(model, args.model)
    del model
    if image_input.batch not in (None, 1):
        raise UsageError(f"input '{image_input.name}' has a fixed batch of {image_input.batch}, but calibration "
                         "files hold one image each [1, 3, H, W]", path=args.model,
                         hint=f"convert with --input-shape {image_input.name}=1x3xHxW first")
    config = preprocess_from_args(args, image_input)

    images = list_images(args.images)
    if not images:
        raise InputModelError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found", path=str(args.images))
    chosen = choose_subset(images, args.count, args.seed)
    written, skipped = write_calibration_set(args, image_input, config, images, chosen)

    height, width = config.size
    if config.normalize == "model":
        place = "data normalised with mean/std (normalize=model, hb_mapper norm_type: no_preprocess)"
    else:
        place = "data as raw 0-255 pixels (normalize=hb_mapper, hb_mapper applies mean and scale)"
    print(f"wrote {len(written)} {FORMATS[args.format]} files (float32 [1, 3, {height}, {width}]) to {Path(args.output) / DATA_SUBDIR}, "
          f"skipped {len(skipped.files)} unreadable; {place}")
    return EXIT_OK
