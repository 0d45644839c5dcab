"""Numerical parity between the original and the converted graph, measured with onnxruntime."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from .errors import ParityError, UsageError, Vit2BpuError

log = logging.getLogger(__name__)

# Two logits closer than this (relative) are a tie: a top-1 difference between them is not counted.
TIE_TOLERANCE = 1e-4


@dataclass
class OutputParity:
    """Agreement of one output across the seeded or user-given samples."""

    name: str
    dtype: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    top1_agreement: float | None = None
    top1_disagreements: int = 0
    top1_ties: int = 0

    def to_dict(self) -> dict:
        return {k: (float(v) if isinstance(v, (np.floating, float)) and v is not None else v)
                for k, v in self.__dict__.items()}


def _session(model: onnx.ModelProto | str, what: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        if isinstance(model, onnx.ModelProto):
            from .model_io import weight_bytes

            if weight_bytes(model) >= 2**31 - 2**26:
                raise ParityError(f"the {what} model is over 2 GiB in memory; pass it as a file")
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except ParityError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for unsupported opsets and ops
        opset = None
        if isinstance(model, onnx.ModelProto):
            opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), None)
        first = str(exc).strip().splitlines()[0][:300]
        if what == "converted":
            raise Vit2BpuError(f"onnxruntime {ort.__version__} cannot run the converted model: {first}",
                               hint="this is a vit2bpu bug; please report it with the input model") from None
        raise ParityError(f"onnxruntime {ort.__version__} cannot run the {what} model"
                          + (f" (opset {opset})" if opset else "") + f": {first}",
                          hint="skip the check with --no-parity, or run it where a newer onnxruntime is installed") from None


def make_inputs(session, shapes: Mapping[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs (ones for integer inputs) in the pinned shapes."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in session.get_inputs():
        shape = shapes[info.name]
        if "float16" in info.type:
            feeds[info.name] = rng.standard_normal(shape).astype(np.float16)
        elif "float" in info.type or "double" in info.type:
            feeds[info.name] = rng.standard_normal(shape).astype(np.float32 if "double" not in info.type else np.float64)
        elif "bool" in info.type:
            feeds[info.name] = np.ones(shape, dtype=bool)
        else:
            feeds[info.name] = np.ones(shape, dtype=np.int64 if "int64" in info.type else np.int32)
    return feeds


def load_user_inputs(path: str | os.PathLike, input_names: list[str]) -> dict[str, np.ndarray]:
    """Read parity inputs from a .npy (single-input models) or .npz (arrays named after the inputs) file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"parity input file '{path}' not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        raise UsageError(f"parity input file '{path}' is not a .npy or .npz file",
                         hint="save the arrays with numpy.save or numpy.savez") from None
    if isinstance(data, np.ndarray):
        if len(input_names) != 1:
            raise UsageError(f"'{path}' contains one array but the model has inputs {input_names}; use an .npz "
                             "with one array per input name")
        return {input_names[0]: data}
    missing = sorted(set(input_names) - set(data.files))
    if missing:
        raise UsageError(f"'{path}' has arrays {sorted(data.files)} but not the model inputs {missing}")
    return {name: data[name] for name in input_names}


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _check_user_inputs(session, user_inputs: Mapping[str, np.ndarray], input_shapes: Mapping[str, list[int]]) -> None:
    """Reject parity inputs whose shape or element type differs from the model's pinned inputs."""
    for info in session.get_inputs():
        value = np.asarray(user_inputs[info.name])
        expected_shape = list(input_shapes.get(info.name, []))
        if list(value.shape) != expected_shape:
            raise UsageError(f"parity input '{info.name}' has shape {list(value.shape)}, the model takes "
                             f"{expected_shape}", hint="give arrays of the input shape, or change --input-shape")
        expected_type = _ORT_TYPES.get(info.type)
        if expected_type is not None and value.dtype != expected_type:
            raise UsageError(f"parity input '{info.name}' is {value.dtype}, the model takes "
                             f"{np.dtype(expected_type)}", hint=f"convert it with array.astype(numpy.{np.dtype(expected_type)})")


def compare_outputs(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputParity:
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    if ref.shape != got.shape:
        raise ParityError(f"output '{name}' has shape {list(got.shape)} after conversion, {list(ref.shape)} before")
    diff = np.abs(ref - got)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(ref), 1e-6)).max()) if diff.size else 0.0
    norm = float(np.linalg.norm(ref) * np.linalg.norm(got))
    cosine = float(np.dot(ref.reshape(-1), got.reshape(-1)) / norm) if norm > 0 else (1.0 if max_abs == 0 else 0.0)
    result = OutputParity(name, str(reference.dtype), max_abs, max_rel, cosine)
    if ref.ndim == 2 and ref.shape[1] > 1:
        top_ref = ref.argmax(axis=1)
        top_got = got.argmax(axis=1)
        disagreements = ties = 0
        for row in range(ref.shape[0]):
            if top_ref[row] == top_got[row]:
                continue
            first, second = np.sort(ref[row])[-2:][::-1]
            if abs(first - second) <= TIE_TOLERANCE * max(abs(first), abs(second)):
                ties += 1
            else:
                disagreements += 1
        result.top1_disagreements = disagreements
        result.top1_ties = ties
        result.top1_agreement = 1.0 - disagreements / ref.shape[0]
    return result


def check_parity(original: onnx.ModelProto | str, converted: onnx.ModelProto, input_shapes: Mapping[str, list[int]],
                 *, samples: int = 2, seed: int = 0, user_inputs: Mapping[str, np.ndarray] | None = None,
                 ) -> list[OutputParity]:
    """Run both graphs on the same inputs and compare every output.

    ``original`` may be a path, which onnxruntime needs for models over 2 GiB.
    With ``user_inputs`` those arrays are used; otherwise ``samples`` seeded random
    batches are drawn.
    """
    reference = _session(original, "original")
    candidate = _session(converted, "converted")
    if user_inputs is not None:
        _check_user_inputs(reference, user_inputs, input_shapes)
        batches = [dict(user_inputs)]
    else:
        batches = [make_inputs(reference, input_shapes, seed + i) for i in range(samples)]
    names = [o.name for o in reference.get_outputs()]
    collected_ref = {n: [] for n in names}
    collected_got = {n: [] for n in names}
    for feeds in batches:
        for name, value in zip(names, reference.run(names, feeds)):
            collected_ref[name].append(value)
        for name, value in zip(names, candidate.run(names, feeds)):
            collected_got[name].append(value)
    return [compare_outputs(n, np.concatenate(collected_ref[n]), np.concatenate(collected_got[n])) for n in names]


def parity_failures(results: list[OutputParity], min_cosine: Mapping[str, float] | float, check_top1: bool) -> list[str]:
    """Return one message per output that misses the thresholds."""
    failures = []
    for r in results:
        threshold = min_cosine if isinstance(min_cosine, float) else min_cosine.get(r.dtype, min_cosine["float32"])
        if not r.cosine >= threshold:
            failures.append(f"output '{r.name}': cosine {r.cosine:.7f} < {threshold}")
        if check_top1 and r.top1_disagreements:
            failures.append(f"output '{r.name}': top-1 differs on {r.top1_disagreements} sample(s)")
    return failures

