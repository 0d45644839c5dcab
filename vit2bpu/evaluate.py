"""``vit2bpu eval``: top-1 and top-5 accuracy of an ONNX classifier on an ImageNet-style folder, with onnxruntime.

Labels come from one subfolder per class (the class index is the position of the
folder name in sorted order, as torchvision's ``ImageFolder`` assigns it) or from
a labels file of ``relative/path.jpg LABEL_INDEX`` lines. The same command runs
the original, the converted and the INT8 (QDQ) graph, so their accuracies compare
directly.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibrate import (UNREADABLE_IMAGE_ERRORS, ImageInput, add_preprocess_arguments, choose_subset,
                        positive_int, preprocess_from_args, read_image_input, relative_name, report_skipped)
from .errors import EXIT_OK, InputModelError, OutputError, UsageError
from .model_io import load_model, write_text_atomically
from .preprocess import IMAGE_SUFFIXES, Preprocess, Skipped, list_images, load_image, normalize_raw
from .progress import Progress

log = logging.getLogger(__name__)

TOP_K = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx",
                        help="classifier with one image input [batch, 3, H, W] and logits [batch, classes] as its "
                             "first output")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="folder with one subfolder per class, or the root that --labels paths are relative to")
    parser.add_argument("--labels", metavar="FILE",
                        help="text file of 'relative/path.jpg LABEL_INDEX' lines (a comma may separate the two); "
                             "blank lines and lines starting with # are ignored")
    add_preprocess_arguments(parser)
    parser.add_argument("--batch", type=positive_int, default=32, metavar="N",
                        help="images per onnxruntime run when the model has a symbolic batch dimension (default 32)")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="evaluate a random subset of N images (picked with --seed) instead of all")
    parser.add_argument("--seed", type=int, default=0, help="seed for picking the --limit images (default 0)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the result as JSON: top1 and top5 in percent, per-class counts, "
                             "skipped files and the preprocessing")


@dataclass
class Sample:
    """One labelled image."""

    path: Path
    relative: str
    label: int


# --- labels ------------------------------------------------------------------------------------------------------

def samples_from_class_folders(root: Path) -> tuple[list[Sample], list[str]]:
    """Label every image below each subfolder of ``root`` with the folder's index in sorted order.

    Like torchvision's ImageFolder, every subfolder counts as a class (hidden ones too, and empty
    ones keep their index) and images directly inside ``root`` are ignored.
    """
    images = list_images(root)
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise UsageError(f"image folder '{root}' has no class subfolders",
                         hint="put each class in its own subfolder, or pass --labels FILE")
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    outside = 0
    for path in images:
        relative = relative_name(path, root)
        folder, _, rest = relative.partition("/")
        if not rest:
            outside += 1
            continue
        samples.append(Sample(path, relative, index[folder]))
    if outside:
        log.warning("%s: ignored %d images outside the class subfolders", root, outside)
    return samples, classes


def parse_labels_line(line: str, where: str) -> tuple[str, int]:
    """Split ``path LABEL`` or ``path,LABEL`` at the last separator, so paths may contain spaces."""
    if "," in line:
        path, _, label = line.rpartition(",")
    else:
        parts = line.rsplit(None, 1)
        path, label = parts if len(parts) == 2 else ("", parts[0])
    path, label = path.strip(), label.strip()
    if not path:
        raise UsageError(f"{where}: expected 'relative/path.jpg LABEL_INDEX', got '{line}'")
    try:
        index = int(label)
    except ValueError:
        raise UsageError(f"{where}: label '{label}' is not a class index",
                         hint="write integer class indices; remove any header line") from None
    if index < 0:
        raise UsageError(f"{where}: label {index} is negative")
    return path, index


def samples_from_labels_file(labels: Path, root: Path) -> list[Sample]:
    """Read ``labels`` and return its images, sorted by path; the paths are relative to ``root``."""
    if not root.is_dir():
        raise UsageError(f"image folder '{root}' does not exist")
    try:
        text = labels.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"labels file '{labels}' not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"labels file '{labels}' could not be read: {exc}") from None
    entries: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{labels}:{number}"
        path, index = parse_labels_line(line, where)
        path = path.replace("\\", "/")
        if path in entries and entries[path] != index:
            raise UsageError(f"{where}: '{path}' is labelled {index} here and {entries[path]} on an earlier line")
        entries[path] = index
    if not entries:
        raise UsageError(f"labels file '{labels}' has no 'relative/path.jpg LABEL_INDEX' lines")
    return [Sample(root / path, path, index) for path, index in sorted(entries.items())]


# --- onnxruntime -------------------------------------------------------------------------------------------------

class Classifier:
    """An onnxruntime CPU session over the model's image input and its first output (the logits)."""

    def __init__(self, path: str, image_input: ImageInput, output_name: str, batch: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types, none derived from RuntimeError
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            raise InputModelError(f"onnxruntime {ort.__version__} cannot load the model: {first}", path=str(path),
                                  hint="run it where a newer onnxruntime is installed if the opset is too new") from None
        self.path = str(path)
        self.input = image_input
        self.output_name = output_name
        # A symbolic batch takes --batch images per run; a fixed batch B takes exactly B, padded at the end.
        self.batch = batch if image_input.batch is None else image_input.batch
        self.classes: int | None = None

    def probe(self, size: tuple[int, int]) -> int:
        """Run one image of zeros and return the number of classes K, checking that the output is [B, K]."""
        return self.predict(np.zeros((1, 3, *size), np.float32)).shape[1]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Return the logits [N, K] for images [N, 3, H, W], run in slices of ``self.batch``.

        For a model with a fixed batch B, the last slice is padded to B with copies of its last image.
        """
        results = []
        for start in range(0, len(images), self.batch):
            feed = images[start:start + self.batch]
            count = len(feed)
            if self.input.batch is not None and count < self.batch:
                padding = np.repeat(feed[-1:], self.batch - count, axis=0)
                feed = np.concatenate([feed, padding])
            logits = self._run(np.ascontiguousarray(feed, dtype=self.input.dtype))
            results.append(logits[:count])
        return np.concatenate(results)

    def _run(self, feed: np.ndarray) -> np.ndarray:
        try:
            (logits,) = self.session.run([self.output_name], {self.input.name: feed})
        except Exception as exc:  # onnxruntime's Fail, InvalidArgument, RuntimeException, ...
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            raise InputModelError(f"onnxruntime failed on a batch of shape {list(feed.shape)}: {first}",
                                  path=self.path) from None
        if logits.ndim != 2 or logits.shape[0] != feed.shape[0] or logits.shape[1] < 1:
            raise UsageError(f"output '{self.output_name}' has shape {list(logits.shape)} for an input batch of "
                             f"{feed.shape[0]}; eval expects logits [batch, classes]", path=self.path)
        return logits


def logits_output(model, path: str) -> str:
    """Return the name of the first output, or raise UsageError when its declared rank is not 2."""
    output = model.graph.output[0]
    if len(model.graph.output) > 1:
        log.warning("%s: the model has %d outputs; scoring the first, '%s'", path, len(model.graph.output),
                    output.name)
    tensor_type = output.type.tensor_type
    if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != 2:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
        raise UsageError(f"output '{output.name}' has shape {dims}; eval expects logits [batch, classes]", path=path)
    return output.name


# --- scoring -------------------------------------------------------------------------------------------------------

@dataclass
class ClassCounts:
    images: int = 0
    top1: int = 0
    top5: int = 0


class Accuracy:
    """Top-1 and top-k hit counts, overall and per class; k is 5, or K for a model with fewer classes."""

    def __init__(self, classes: int):
        self.k = min(TOP_K, classes)
        self.per_class: dict[int, ClassCounts] = {}

    def add(self, logits: np.ndarray, labels: list[int]) -> None:
        # A stable sort breaks ties between equal logits towards the lower class index.
        ranked = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, :self.k]
        for row, label in zip(ranked, labels):
            counts = self.per_class.setdefault(label, ClassCounts())
            counts.images += 1
            counts.top1 += int(row[0] == label)
            counts.top5 += int(label in row)

    @property
    def images(self) -> int:
        return sum(c.images for c in self.per_class.values())

    def correct(self, metric: str) -> int:
        return sum(getattr(c, metric) for c in self.per_class.values())

    def percent(self, metric: str) -> float:
        return 100.0 * self.correct(metric) / self.images if self.images else 0.0


def check_labels_fit(samples: list[Sample], classes: int, class_names: list[str] | None, args) -> None:
    """Raise UsageError when a label is not an output index of the model; warn when folders and outputs differ."""
    if class_names is not None:
        if len(class_names) > classes:
            raise UsageError(f"'{args.images}' has {len(class_names)} class subfolders but the model outputs "
                             f"{classes} classes", hint="pass --labels FILE to map images to output indices")
        if len(class_names) < classes:
            log.warning("%s: found %d class subfolders but the model has %d outputs; the i-th subfolder in sorted "
                        "order is scored as class i, so pass --labels FILE if the subfolders are a subset of the "
                        "classes", args.images, len(class_names), classes)
        return
    beyond = [s for s in samples if s.label >= classes]
    if beyond:
        raise UsageError(f"'{args.labels}' labels '{beyond[0].relative}' as {beyond[0].label} (and "
                         f"{len(beyond) - 1} more beyond the range), but the model outputs {classes} classes, "
                         f"indices 0 to {classes - 1}")


def score(samples: list[Sample], config: Preprocess, classifier: Classifier, accuracy: Accuracy) -> Skipped:
    """Preprocess and classify every sample in batches, adding the hits to ``accuracy``; return the skipped files."""
    skipped = Skipped()
    tensors: list[np.ndarray] = []
    labels: list[int] = []

    def flush() -> None:
        batch = np.concatenate(tensors)
        if config.normalize == "hb_mapper":
            batch = normalize_raw(batch, config)  # load_image left raw 0-255 pixels, as hb_mapper receives them
        accuracy.add(classifier.predict(batch), labels)
        tensors.clear()
        labels.clear()

    with Progress(len(samples), "eval") as progress:
        for sample in samples:
            try:
                tensors.append(load_image(sample.path, config))
                labels.append(sample.label)
            except UNREADABLE_IMAGE_ERRORS as exc:
                skipped.add(sample.relative, exc)
            if len(tensors) == classifier.batch:
                flush()
            progress.update()
        if tensors:
            flush()
    return skipped


def result_dict(args, classifier: Classifier, accuracy: Accuracy, class_names: list[str] | None, skipped: Skipped,
                config: Preprocess) -> dict:
    per_class = {}
    for index in sorted(accuracy.per_class):
        counts = accuracy.per_class[index]
        name = class_names[index] if class_names is not None else str(index)
        per_class[name] = {"index": index, "images": counts.images, "top1": counts.top1, "top5": counts.top5}
    return {
        "model": str(args.model),
        "images_dir": str(args.images),
        "labels": str(args.labels) if args.labels else None,
        "output": classifier.output_name,
        "images": accuracy.images,
        "top1": round(accuracy.percent("top1"), 4),
        "top5": round(accuracy.percent("top5"), 4),
        "top1_correct": accuracy.correct("top1"),
        "top5_correct": accuracy.correct("top5"),
        "top5_k": accuracy.k,
        "per_class": per_class,
        "skipped": [{"image": image, "error": reason} for image, reason in skipped.files],
        "preprocess": config.to_dict(),
    }


def run(args) -> int:
    model = load_model(args.model)
    image_input = read_image_input(model, args.model)
    output_name = logits_output(model, args.model)
    del model
    config = preprocess_from_args(args, image_input)
    if args.json:
        json_folder = Path(args.json).parent
        if not json_folder.is_dir():
            raise OutputError(f"folder '{json_folder}' for the JSON result does not exist", path=str(args.json),
                              hint="create it first")

    root = Path(args.images)
    class_names = None
    if args.labels:
        samples = samples_from_labels_file(Path(args.labels), root)
    else:
        samples, class_names = samples_from_class_folders(root)
    if not samples:
        raise InputModelError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found in the class subfolders",
                              path=str(root))
    samples = choose_subset(samples, args.limit, args.seed)

    classifier = Classifier(args.model, image_input, output_name, args.batch)
    classes = classifier.probe(config.size)
    check_labels_fit(samples, classes, class_names, args)
    accuracy = Accuracy(classes)
    skipped = score(samples, config, classifier, accuracy)
    report_skipped(skipped, "eval")
    if accuracy.images == 0:
        raise InputModelError(f"none of the {len(samples)} images could be read", path=str(root),
                              hint="see the skipped files above")

    if args.json:
        result = result_dict(args, classifier, accuracy, class_names, skipped, config)
        write_text_atomically(args.json, json.dumps(result, indent=2) + "\n")
    line = f"top-1 {accuracy.percent('top1'):.2f}% top-5 {accuracy.percent('top5'):.2f}% on {accuracy.images} images"
    if skipped.files:
        line += f" ({len(skipped.files)} unreadable files skipped)"
    print(line)
    return EXIT_OK
