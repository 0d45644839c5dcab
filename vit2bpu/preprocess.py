"""Image preprocessing and the one normalisation setting shared by ``calibrate``, ``eval`` and ``hb-config``.

The converted model takes the tensor it was exported with: a float32 NCHW image,
resized, centre-cropped and normalised with the training mean and std. Where
that normalisation happens is one setting, ``normalize``:

- ``model`` (default): the model input is the normalised tensor. Calibration
  data is written normalised and hb_mapper gets ``norm_type: no_preprocess``.
- ``hb_mapper``: hb_mapper applies mean and scale itself
  (``norm_type: data_mean_and_scale``, ``mean_value`` = 255 * mean,
  ``scale_value`` = 1 / (255 * std)), so calibration data is written
  unnormalised, as float32 pixel values in [0, 255].

``calibrate`` writes the tensors into ``OUT_DIR/data/`` and records the setting
in ``OUT_DIR/preprocess.json``; ``hb-config`` reads it from there, so the YAML and
the data always agree. The data sits in a subfolder because hb_mapper reads every
file in ``cal_data_dir`` as a tensor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputModelError, UsageError

NORMALIZE_CHOICES = ("model", "hb_mapper")
SETTINGS_FILE = "preprocess.json"
DATA_SUBDIR = "data"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """Settings that turn an image into the model input tensor."""

    size: tuple[int, int] = (224, 224)          # output H, W
    resize: int = 248                           # shorter side before the centre crop
    interpolation: str = "bicubic"              # bicubic | bilinear | nearest
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalize: str = "model"                    # model | hb_mapper
    preset: str = "timm-deit"

    def validate(self) -> None:
        if self.normalize not in NORMALIZE_CHOICES:
            raise UsageError(f"unknown normalisation place '{self.normalize}'",
                             hint=f"choose one of: {', '.join(NORMALIZE_CHOICES)}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise UsageError(f"unknown interpolation '{self.interpolation}'")
        if any(s <= 0 for s in self.std):
            raise UsageError(f"std values must be positive, got {list(self.std)}")
        # The shorter side is resized to ``resize``, so the crop fits any aspect ratio only when
        # both of its sides are at most ``resize``.
        if self.resize < max(self.size):
            raise UsageError(f"resize {self.resize} is smaller than a side of the crop {list(self.size)}")

    def hb_mean_value(self) -> list[float]:
        """hb_mapper's ``mean_value``: the mean in 0-255 pixel units."""
        return [255.0 * m for m in self.mean]

    def hb_scale_value(self) -> list[float]:
        """hb_mapper's ``scale_value``: multiplies (pixel - mean), so 1 / (255 * std)."""
        return [1.0 / (255.0 * s) for s in self.std]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["size"] = list(self.size)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SETTINGS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Preprocess":
        path = Path(folder) / SETTINGS_FILE
        if not path.exists():
            raise InputModelError(f"no {SETTINGS_FILE} in '{folder}'",
                                  hint="write the calibration data with 'vit2bpu calibrate' first")
        data = json.loads(path.read_text(encoding="utf-8"))
        data["size"] = tuple(data["size"])
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        config = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        config.validate()
        return config


# Presets matching the evaluation transforms of the model families vit2bpu targets:
# timm DeiT/ViT (crop_pct 0.875-0.9, bicubic), transformers ViT (resize straight to 224,
# bilinear, mean and std 0.5) and transformers DeiT (resize 256, crop 224, bicubic).
PRESETS: dict[str, dict] = {
    "timm-deit": {"resize": 248, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "timm-vit": {"resize": 248, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "hf-vit": {"resize": 224, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "hf-deit": {"resize": 256, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}


def from_options(preset: str = "timm-deit", size: tuple[int, int] | None = None, resize: int | None = None,
                 interpolation: str | None = None, mean=None, std=None, normalize: str = "model") -> Preprocess:
    """Build a Preprocess from a preset, with explicit values taking precedence."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preprocessing preset '{preset}'", hint=f"choose one of: {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    config = Preprocess(preset=preset, normalize=normalize, **values)
    if size is not None:
        config.size = tuple(size)
        if resize is None:
            # Keep the preset's crop ratio for another input size.
            config.resize = int(round(values["resize"] * max(config.size) / 224))
    if resize is not None:
        config.resize = resize
    if interpolation is not None:
        config.interpolation = interpolation
    if mean is not None:
        config.mean = tuple(float(m) for m in mean)
    if std is not None:
        config.std = tuple(float(s) for s in std)
    config.validate()
    return config


def load_image(path: str | Path, config: Preprocess) -> np.ndarray:
    """Read an image and return the model input ``[1, 3, H, W]`` float32 for ``config``.

    Raises OSError or ValueError for unreadable files; callers report and skip them.
    """
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading images needs Pillow", hint="pip install 'vit2bpu[images]'") from None
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[config.interpolation]
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = config.resize / min(width, height)
        resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), resample)
    out_h, out_w = config.size
    left = (resized.width - out_w) // 2
    top = (resized.height - out_h) // 2
    cropped = resized.crop((left, top, left + out_w, top + out_h))
    pixels = np.asarray(cropped, dtype=np.float32)  # H, W, 3 in [0, 255]
    if config.normalize == "model":
        pixels = (pixels / 255.0 - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def normalize_raw(batch: np.ndarray, config: Preprocess) -> np.ndarray:
    """Apply mean/std to raw [0, 255] NCHW pixels, as hb_mapper does with ``data_mean_and_scale``."""
    mean = np.asarray(config.mean, np.float32).reshape(1, 3, 1, 1) * 255.0
    scale = 1.0 / (255.0 * np.asarray(config.std, np.float32).reshape(1, 3, 1, 1))
    return (batch - mean) * scale


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp", ".gif"}


def list_images(folder: str | Path) -> list[Path]:
    """Return every file below ``folder`` whose suffix is an image format, sorted for a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"image folder '{folder}' does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class Skipped:
    """Files a command could not read, with the reason; reported, never fatal for the whole set."""

    files: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path, error: Exception) -> None:
        self.files.append((str(path), f"{error.__class__.__name__}: {error}"))
