"""``vit2bpu quantize``: an open INT8 simulation of the BPU toolchain with onnxruntime's static quantization.

hb_mapper calibrates and quantizes the opset-11 converted model in closed code.
This command does the same kind of post-training quantization in the open, so
the INT8 accuracy loss can be measured before the vendor toolchain runs:

1. The converted graph is copied to opset 13 with ``onnx.version_converter``,
   because QuantizeLinear/DequantizeLinear (QDQ) take the per-channel ``axis``
   attribute only from opset 13 on. The copy is checked against the opset-11
   graph on calibration samples.
2. ``onnxruntime.quantization.quantize_static`` calibrates activation ranges on
   the float32 tensors that ``vit2bpu calibrate`` writes and inserts QDQ pairs:
   int8 weights (per output channel by default) and symmetric int8
   activations. hb_mapper reports one calibration threshold per node and runs
   signed int8 ops such as HzSQuantizedConv (D-Robotics rdk_doc, ptq_process.md),
   which a symmetric int8 range models.
3. The INT8 graph and the opset-11 FP32 graph run on the same samples, and each
   output's cosine similarity, max abs error and top-1 agreement are reported.

The INT8 file is a measuring tool only: the opset-11 converted model stays what
goes to hb_mapper.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .errors import EXIT_OK, OutputError, ParityError, UnsupportedModelError, UsageError, Vit2BpuError
from .model_io import PROTOBUF_LIMIT, default_opset, load_model, same_file, save_model, write_text_atomically
from .parity import OutputParity, compare_outputs
from .preprocess import DATA_SUBDIR, SETTINGS_FILE, Preprocess, normalize_raw

log = logging.getLogger(__name__)

SIMULATION_OPSET = 13
CONVERTED_OPSET = 11
METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("int8", "uint8")
# The opset-13 copy must reproduce the opset-11 graph to float32 rounding.
OPSET_COPY_MIN_COSINE = 0.99999
OPSET_COPY_MAX_REL_ERROR = 1e-4
# Written by 'vit2bpu calibrate' beside preprocess.json, with the input shape it wrote the tensors for.
MANIFEST_FILE = "manifest.json"


@dataclass
class OutputAgreement(OutputParity):
    """FP32-vs-INT8 agreement of one output, with the worst single-sample cosine."""

    min_sample_cosine: float = 1.0


@dataclass
class QuantizeReport:
    """Settings, warnings and measured FP32-vs-INT8 agreement of one ``quantize`` run."""

    model: str | None = None
    int8_model: str | None = None
    calibration_dir: str = ""
    eval_dir: str | None = None
    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "int8"
    calibration_samples: int = 0
    eval_samples: int = 0
    normalize: str | None = None
    source_opset: int | None = None
    simulation_opset: int = SIMULATION_OPSET
    opset_copy_check: dict = field(default_factory=dict)
    float_nodes: dict = field(default_factory=dict)
    qdq_nodes: int = 0
    outputs: list[OutputAgreement] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    onnxruntime_version: str = ""

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["outputs"] = [o.to_dict() for o in self.outputs]
        return data

    def summary_lines(self) -> list[str]:
        activations = "int8 symmetric" if self.activation_type == "int8" else "uint8 asymmetric"
        weights = "int8 per-channel" if self.per_channel else "int8 per-tensor"
        lines = [f"INT8 simulation: onnxruntime {self.onnxruntime_version} QDQ at opset {self.simulation_opset}, "
                 f"{self.qdq_nodes} QuantizeLinear/DequantizeLinear nodes",
                 f"  calibration: {self.calibration_samples} sample(s) from {self.calibration_dir}, method "
                 f"{self.method}, weights {weights}, activations {activations}"]
        if self.normalize == "hb_mapper":
            lines.append("  samples are raw pixels (preprocess.json normalize=hb_mapper); mean/std applied before "
                         "the model, as hb_mapper's HzPreprocess does")
        float_counts = [f"{len(names)} {label}" for label, names in self.float_nodes.items() if names]
        if float_counts:
            lines.append(f"  kept in float: {', '.join(float_counts)}")
        where = f"sample(s) from {self.eval_dir}" if self.eval_dir else "calibration sample(s)"
        lines.append(f"  INT8 vs FP32 on {self.eval_samples} {where}:")
        for r in self.outputs:
            top1 = "" if r.top1_agreement is None else f", top-1 agreement {r.top1_agreement:.1%}"
            lines.append(f"  output '{r.name}': cosine {r.cosine:.5f} (lowest sample {r.min_sample_cosine:.5f}), "
                         f"max abs error {r.max_abs_error:.3g}{top1}")
        for warning in self.warnings:
            lines.append(f"  warning: {warning}")
        lines.append("  note: the INT8 model is a simulation for measuring accuracy, so give hb_mapper the opset-11 "
                     "converted model")
        return lines


# ---------------------------------------------------------------- calibration data


# Tensor file formats of 'vit2bpu calibrate': headerless float32 (hb_mapper reads it with numpy.fromfile) and .npy.
TENSOR_SUFFIXES = (".bin", ".npy")


@dataclass
class CalibrationSet:
    """The validated tensor files of a calibration folder and how to turn them into model inputs."""

    files: list[Path]
    input_name: str
    shape: tuple[int, ...]
    preprocess: Preprocess | None = None

    def load(self, path: Path) -> np.ndarray:
        if path.suffix.lower() == ".npy":
            sample = np.load(path, allow_pickle=False)
        else:
            sample = np.fromfile(path, dtype=np.float32).reshape(self.shape)
        if self.preprocess is not None and self.preprocess.normalize == "hb_mapper":
            sample = normalize_raw(sample, self.preprocess).astype(np.float32)
        return sample


def locate_calibration(folder: str | Path) -> tuple[Path, Path | None]:
    """Return the folder of tensor files and the folder of ``preprocess.json`` (None without one).

    ``folder`` is either the OUT_DIR of ``vit2bpu calibrate``, which contains
    ``preprocess.json`` and the tensors in ``data/``, or a folder of tensor files:
    that ``data/`` folder itself (the one hb_mapper gets as ``cal_data_dir``) or any
    other. Raises UsageError when the folder is missing.
    """
    root = Path(folder)
    if not root.exists():
        raise UsageError(f"calibration folder '{root}' not found",
                         hint="write one with 'vit2bpu calibrate IMAGES_DIR OUT_DIR --model MODEL.onnx'")
    if not root.is_dir():
        raise UsageError(f"calibration path '{root}' is not a folder")
    if (root / SETTINGS_FILE).exists():
        data = root / DATA_SUBDIR
        if not data.is_dir():
            raise UsageError(f"calibration folder '{root}' has {SETTINGS_FILE} but no {DATA_SUBDIR}/ folder of "
                             "tensors", hint="write the calibration set again with 'vit2bpu calibrate'")
        return data, root
    if root.name == DATA_SUBDIR and (root.parent / SETTINGS_FILE).exists():
        return root, root.parent
    log.info("%s: no %s, so the tensors are taken as model inputs", root, SETTINGS_FILE)
    return root, None


def load_calibration_set(folder: str | Path, input_name: str, shape: Sequence[int]) -> CalibrationSet:
    """List and validate the float32 tensor files (``.bin`` or ``.npy``) of a calibration folder.

    Every file must contain one tensor of exactly the model input's shape: a
    ``.npy`` array of that shape and dtype float32, or a headerless ``.bin`` of
    that many float32 values. Raises UsageError naming the folder or the first
    invalid file.
    """
    data, settings = locate_calibration(folder)
    expected = tuple(int(d) for d in shape)
    if settings is not None:
        _check_manifest(settings, expected)
    files = sorted(p for p in data.iterdir() if p.is_file() and p.suffix.lower() in TENSOR_SUFFIXES)
    if not files:
        raise UsageError(f"calibration folder '{data}' contains no tensor files ({', '.join(TENSOR_SUFFIXES)})",
                         hint="write them with 'vit2bpu calibrate'")
    for path in files:
        if path.suffix.lower() == ".npy":
            _check_npy(path, expected)
        else:
            _check_raw(path, expected)
    return CalibrationSet(files, input_name, expected, _read_preprocess(settings))


def _check_npy(path: Path, expected: tuple[int, ...]) -> None:
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"calibration file '{path}' is not a readable .npy array: {exc}") from None
    if header.dtype != np.float32:
        raise UsageError(f"calibration file '{path}' has dtype {header.dtype}, expected float32",
                         hint="save the samples as float32, the model input's dtype")
    if tuple(header.shape) != expected:
        raise UsageError(f"calibration file '{path}' has shape {list(header.shape)}, expected the model input "
                         f"shape {list(expected)}", hint="write the samples for this model's input size")


def _check_raw(path: Path, expected: tuple[int, ...]) -> None:
    size = path.stat().st_size
    expected_size = int(np.prod(expected)) * 4
    if size != expected_size:
        raise UsageError(f"calibration file '{path}' has {size} bytes, expected {expected_size} (headerless float32 "
                         f"of the model input shape {list(expected)})",
                         hint="write the samples for this model's input size")


def _check_manifest(folder: Path, expected: tuple[int, ...]) -> None:
    """Compare the input shape that ``vit2bpu calibrate`` recorded with the model's, when a manifest exists."""
    path = folder / MANIFEST_FILE
    if not path.exists():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("input", {}).get("shape")
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"'{path}' is not a readable manifest: {exc}") from None
    if recorded is not None and tuple(recorded) != expected:
        raise UsageError(f"'{path}' records the input shape {recorded}, but the model input shape is "
                         f"{list(expected)}", hint="calibrate again with --model set to this model")


def _read_preprocess(folder: Path | None) -> Preprocess | None:
    if folder is None:
        return None
    try:
        return Preprocess.load(folder)
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"'{folder / SETTINGS_FILE}' is invalid: {exc.__class__.__name__}: {exc}") from None


def _constant_sample_count(samples: CalibrationSet, files: Sequence[Path]) -> int:
    return sum(1 for path in files if float(np.ptp(samples.load(path))) == 0.0)


class _NpyReader:
    """onnxruntime CalibrationDataReader over calibration tensor files, one sample per ``get_next``."""

    def __init__(self, samples: CalibrationSet, files: Sequence[Path]):
        self.samples = samples
        self.files = list(files)
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.files):
            return None
        path = self.files[self.position]
        self.position += 1
        return {self.samples.input_name: self.samples.load(path)}

    def rewind(self) -> None:
        self.position = 0


def _reader(samples: CalibrationSet, files: Sequence[Path]):
    from onnxruntime.quantization import CalibrationDataReader

    # Subclass at call time so importing this module does not import onnxruntime.quantization.
    reader_class = type("NpyCalibrationReader", (_NpyReader, CalibrationDataReader), {})
    return reader_class(samples, files)


# ---------------------------------------------------------------- graph preparation


def simulation_copy(model: onnx.ModelProto,
                    check_inputs: Sequence[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, dict]:
    """Return an opset-13 copy of ``model`` and the numerical check against the original.

    Models already at opset 13 or newer are returned unchanged. Raises
    UnsupportedModelError when onnx's version converter fails or changes the outputs.
    """
    opset = default_opset(model)
    if opset is not None and opset >= SIMULATION_OPSET:
        return model, {"converted": False}
    try:
        copy = onnx.version_converter.convert_version(model, SIMULATION_OPSET)
        onnx.checker.check_model(copy)
    except Exception as exc:  # the converter raises RuntimeError, ValidationError and others
        raise UnsupportedModelError(f"onnx's version converter could not copy opset {opset} to "
                                    f"{SIMULATION_OPSET}: {str(exc).strip().splitlines()[0]}") from None
    cosine, max_rel = _agreement(model, copy, check_inputs)
    check = {"converted": True, "samples": len(check_inputs), "cosine": cosine, "max_rel_error": max_rel}
    if not (cosine >= OPSET_COPY_MIN_COSINE and max_rel <= OPSET_COPY_MAX_REL_ERROR):
        raise UnsupportedModelError(
            f"the opset-{SIMULATION_OPSET} copy made by onnx {onnx.__version__}'s version converter does not match "
            f"the opset-{opset} graph (cosine {cosine:.7f}, max error {max_rel:.3g} of the largest output value)",
            hint="the INT8 simulation would measure the converter's error; please report this model")
    return copy, check


def _agreement(reference: onnx.ModelProto, candidate: onnx.ModelProto,
               feeds_list: Sequence[dict[str, np.ndarray]]) -> tuple[float, float]:
    """Return the lowest output cosine and the largest abs error relative to the output's max magnitude."""
    first = _session(reference)
    second = _session(candidate)
    lowest_cosine, largest_rel = 1.0, 0.0
    for feeds in feeds_list:
        for name, ref, got in zip([o.name for o in first.get_outputs()], first.run(None, feeds),
                                  second.run(None, feeds)):
            result = compare_outputs(name, ref, got)
            scale = max(float(np.abs(ref).max()), 1e-12)
            lowest_cosine = min(lowest_cosine, result.cosine)
            largest_rel = max(largest_rel, result.max_abs_error / scale)
    return lowest_cosine, largest_rel


def float_node_names(model: onnx.ModelProto, *, float_softmax: bool, int8_norm_stats: bool) -> dict[str, list[str]]:
    """Name the nodes that stay in float: Softmax when asked, and the LayerNorm variance paths.

    - Softmax: hb_mapper (hmct 1.1.0, RDK X5 toolchain) runs a standalone Softmax
      on the CPU in float between a dequantize and a quantize, unless its YAML
      lists the node under ``run_on_bpu``, as ``vit2bpu hb-config`` does for X5
      and J5. So Softmax is quantized by default, and onnxruntime gives its
      output the fixed range [0, 1]. With ``float_softmax`` (X3, or hb-config
      ``--softmax-on-cpu``) it runs in float on the dequantized int8 scores, and
      its output is quantized with a calibrated range for the next MatMul.
    - LayerNorm variance (square -> mean of squares -> Sqrt): one int8 scale per
      tensor covers every token, so tokens whose variance is far below the
      largest one, such as the class token, round to a variance of zero and
      their normalised values blow up. On the converted timm DeiT test fixture,
      calibrated on 16 standard-normal samples, this alone drops the logits
      cosine from about 0.98 to about 0.77 (onnxruntime 1.16.2 and 1.32.0).
    """
    # NOTE: hb_mapper's documentation does not say at what precision hmct computes
    # the LayerNorm variance, so the default here may be kinder than the real BPU.
    float_nodes: dict[str, list[str]] = {"Softmax": [], "LayerNorm variance nodes": []}
    if float_softmax:
        float_nodes["Softmax"] = [n.name for n in model.graph.node if n.op_type == "Softmax"]
    if not int8_norm_stats:
        float_nodes["LayerNorm variance nodes"] = _norm_variance_nodes(model.graph)
    return float_nodes


def _norm_variance_nodes(graph: onnx.GraphProto) -> list[str]:
    """Return the nodes from the square to the Sqrt of every LayerNorm-style variance in ``graph``.

    The walk starts at each Sqrt and follows the non-constant input back through
    Add (epsilon), Conv (1x1 with weights 1/C) and ReduceMean until it reaches a
    square: Pow, or Mul of a tensor with itself. Paths that end elsewhere are not
    variances and are left alone.
    """
    producers = {out: node for node in graph.node for out in node.output}
    constants = {init.name for init in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    names: list[str] = []
    for sqrt in (n for n in graph.node if n.op_type == "Sqrt"):
        path = [sqrt.name]
        node = producers.get(sqrt.input[0])
        while node is not None and node.op_type in ("Add", "Conv", "ReduceMean"):
            path.append(node.name)
            variable = [name for name in node.input[:2] if name and name not in constants]
            node = producers.get(variable[0]) if len(variable) == 1 else None
        is_square = node is not None and (node.op_type == "Pow" or (node.op_type == "Mul"
                                                                      and node.input[0] == node.input[1]))
        if is_square:
            names.extend(path + [node.name])
    return names


# ---------------------------------------------------------------- quantization and evaluation


def _quant_enums(method: str, activation_type: str):
    from onnxruntime.quantization import CalibrationMethod, QuantType

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    activations = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    return methods[method], activations[activation_type], QuantType.QInt8


class _DropPreprocessingAdvice(logging.Filter):
    """Log filter for onnxruntime's advice to pre-process the model, which it logs on every call.

    The advice does not apply because the converted graph is final.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


def run_quantize_static(model: onnx.ModelProto, samples: CalibrationSet, files: Sequence[Path], *, method: str,
                        per_channel: bool, activation_type: str, nodes_to_exclude: Sequence[str]) -> onnx.ModelProto:
    """Calibrate on ``files`` and return the QDQ INT8 model written by ``quantize_static``."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    calibrate_method, activation_qtype, weight_qtype = _quant_enums(method, activation_type)
    extra_options = {
        # Symmetric int8 models the BPU's one-threshold-per-node calibration, while uint8 stays asymmetric.
        "ActivationSymmetric": activation_type == "int8",
        "WeightSymmetric": True,
    }
    # NOTE: minmax keeps only per-sample minima and maxima, but the entropy and percentile calibrators
    # keep every intermediate tensor of every sample in memory until they build their histograms.
    with tempfile.TemporaryDirectory(prefix="vit2bpu-quantize-") as folder:
        source = Path(folder) / "fp32_opset13.onnx"
        target = Path(folder) / "int8_qdq.onnx"
        onnx.save(model, str(source))
        root = logging.getLogger()
        advice_filter = _DropPreprocessingAdvice()
        root.addFilter(advice_filter)
        printed = io.StringIO()
        try:
            # The histogram calibrators print their progress to stdout, and onnxruntime 1.16 calls
            # onnx.mapping, which onnx 1.15 reports as deprecated on every weight.
            with contextlib.redirect_stdout(printed), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                quantize_static(str(source), str(target), _reader(samples, files), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, activation_type=activation_qtype,
                                weight_type=weight_qtype, calibrate_method=calibrate_method,
                                nodes_to_exclude=list(nodes_to_exclude), extra_options=extra_options)
        except Vit2BpuError:
            raise
        except ModuleNotFoundError as exc:
            # onnxruntime 1.16's entropy calibrator imports scipy, which onnxruntime does not require.
            import onnxruntime as ort

            raise UsageError(f"--method {method} with onnxruntime {ort.__version__} needs the Python package "
                             f"'{exc.name}'", hint=f"pip install {exc.name}, or choose another --method") from None
        except Exception as exc:  # onnxruntime raises its own types for failed calibration runs
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            raise UnsupportedModelError(f"onnxruntime's quantize_static failed: {first}",
                                        hint="rerun with --debug for the traceback") from exc
        finally:
            root.removeFilter(advice_filter)
            if printed.getvalue().strip():
                log.debug("quantize_static printed:\n%s", printed.getvalue().rstrip())
        return onnx.load(str(target))


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def evaluate_int8(fp32: onnx.ModelProto, int8: onnx.ModelProto, samples: CalibrationSet,
                  files: Sequence[Path]) -> list[OutputAgreement]:
    """Run both models on ``files`` and compare every output across all samples."""
    import onnxruntime as ort

    reference = _session(fp32)
    try:
        candidate = _session(int8)
    except Exception as exc:  # onnxruntime's own exception types
        raise ParityError(f"onnxruntime {ort.__version__} failed to load the INT8 model: "
                          f"{str(exc).strip().splitlines()[0][:300]}", hint="rerun with --debug and report it") from None
    names = [o.name for o in reference.get_outputs()]
    collected_ref: dict[str, list[np.ndarray]] = {n: [] for n in names}
    collected_got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for path in files:
        feeds = {samples.input_name: samples.load(path)}
        for name, value in zip(names, reference.run(names, feeds)):
            collected_ref[name].append(value)
        for name, value in zip(names, candidate.run(names, feeds)):
            collected_got[name].append(value)
    results = []
    for name in names:
        overall = compare_outputs(name, np.concatenate(collected_ref[name]), np.concatenate(collected_got[name]))
        lowest = min(compare_outputs(name, ref, got).cosine
                     for ref, got in zip(collected_ref[name], collected_got[name]))
        results.append(OutputAgreement(**overall.__dict__, min_sample_cosine=lowest))
    return results


def quantize_model(model: str | Path | onnx.ModelProto, calibration_dir: str | Path, *, method: str = "minmax",
                   per_channel: bool = True, activation_type: str = "int8", samples: int | None = None,
                   eval_samples: int | None = None, eval_dir: str | Path | None = None,
                   float_softmax: bool = False, int8_norm_stats: bool = False) -> tuple[onnx.ModelProto, QuantizeReport]:
    """Quantize a converted model to an INT8 QDQ simulation and measure its agreement with FP32.

    ``model`` is the opset-11 converted model (path or ModelProto). The first
    ``samples`` tensor files of ``calibration_dir`` (all by default, sorted by
    name) calibrate. Both models then run on the first ``eval_samples`` files of
    ``eval_dir`` (default: the calibration samples, which flatters the INT8
    model when they are few or atypical). Returns the opset-13 INT8 model and a
    ``QuantizeReport``. Raises UsageError for bad options or calibration data,
    InputModelError for an unreadable model and UnsupportedModelError when the
    model cannot be simulated.
    """
    import onnxruntime as ort

    if method not in METHODS:
        raise UsageError(f"unknown calibration method '{method}'", hint=f"choose one of: {', '.join(METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise UsageError(f"unknown activation type '{activation_type}'",
                         hint=f"choose one of: {', '.join(ACTIVATION_TYPES)}")
    for option, value in (("samples", samples), ("eval samples", eval_samples)):
        if value is not None and value < 1:
            raise UsageError(f"the number of {option} must be at least 1, got {value}")

    report = QuantizeReport(method=method, per_channel=per_channel, activation_type=activation_type,
                            calibration_dir=str(calibration_dir), onnxruntime_version=ort.__version__,
                            eval_dir=None if eval_dir is None else str(eval_dir))
    if isinstance(model, onnx.ModelProto):
        fp32 = model
    else:
        report.model = str(model)
        fp32 = load_model(model)
    report.source_opset = default_opset(fp32)
    if fp32.ByteSize() >= PROTOBUF_LIMIT:
        raise UnsupportedModelError("the model is 2 GiB or larger, and quantize passes it to onnxruntime in memory",
                                    path=report.model, hint="quantize a smaller variant of the model")
    input_info = _single_float32_input(fp32, report.model)
    report.warnings.extend(_provenance_warnings(fp32))

    shape = [d.dim_value for d in input_info.type.tensor_type.shape.dim]
    calibration = load_calibration_set(calibration_dir, input_info.name, shape)
    evaluation = calibration if eval_dir is None else load_calibration_set(eval_dir, input_info.name, shape)
    calibration_files, eval_files = _choose_samples(calibration, evaluation, eval_dir is not None, samples,
                                                    eval_samples, report)

    check_inputs = [{input_info.name: calibration.load(p)} for p in calibration_files[:2]]
    simulated, report.opset_copy_check = simulation_copy(fp32, check_inputs)
    report.simulation_opset = default_opset(simulated) or SIMULATION_OPSET
    report.float_nodes = float_node_names(simulated, float_softmax=float_softmax, int8_norm_stats=int8_norm_stats)
    excluded = [name for names in report.float_nodes.values() for name in names]

    int8 = run_quantize_static(simulated, calibration, calibration_files, method=method, per_channel=per_channel,
                               activation_type=activation_type, nodes_to_exclude=excluded)
    report.qdq_nodes = sum(1 for n in int8.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    onnx.helper.set_model_props(int8, {
        "vit2bpu.note": "INT8 QDQ simulation for measuring accuracy, so give hb_mapper the opset-11 converted model",
        "vit2bpu.calibration": json.dumps({"method": method, "per_channel": per_channel,
                                           "activation_type": activation_type,
                                           "samples": len(calibration_files)}),
    })
    report.outputs = evaluate_int8(fp32, int8, evaluation, eval_files)
    return int8, report


def _choose_samples(calibration: CalibrationSet, evaluation: CalibrationSet, separate_eval: bool,
                    samples: int | None, eval_samples: int | None,
                    report: QuantizeReport) -> tuple[list[Path], list[Path]]:
    """Pick the calibration and evaluation files, and record counts and warnings in ``report``."""
    calibration_files = calibration.files[:samples] if samples is not None else calibration.files
    if separate_eval or eval_samples is not None:
        eval_files = evaluation.files[:eval_samples] if eval_samples is not None else evaluation.files
    else:
        eval_files = calibration_files
    report.normalize = calibration.preprocess.normalize if calibration.preprocess is not None else None
    report.calibration_samples = len(calibration_files)
    report.eval_samples = len(eval_files)
    for option, requested, found in (("calibration", samples, len(calibration.files)),
                                     ("evaluation", eval_samples, len(evaluation.files))):
        if requested is not None and requested > found:
            report.warnings.append(f"{requested} {option} samples requested but {found} found, so all {found} "
                                   "are used")
    constant = _constant_sample_count(calibration, calibration_files)
    if constant:
        report.warnings.append(f"{constant} of {len(calibration_files)} calibration samples are constant (every "
                               "value equal), so the activation ranges they give are meaningless. Calibrate on "
                               "real images")
    return calibration_files, eval_files


def _single_float32_input(model: onnx.ModelProto, path: str | None) -> onnx.ValueInfoProto:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"the model has {len(inputs)} inputs, but quantize supports single-input models "
                                    "only, because a calibration folder contains one tensor per sample", path=path)
    info = inputs[0]
    tensor_type = info.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        raise UnsupportedModelError(f"input '{info.name}' is {dtype}, but onnxruntime's static quantization needs a "
                                    "float32 model", path=path, hint="convert the float32 export")
    dims = list(tensor_type.shape.dim)
    if not dims or any(d.dim_value <= 0 for d in dims):
        dims_text = [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in dims]
        raise UnsupportedModelError(f"input '{info.name}' has shape {dims_text}, not a static shape", path=path,
                                    hint="quantize the output of 'vit2bpu', which pins every dimension")
    return info


def _provenance_warnings(model: onnx.ModelProto) -> list[str]:
    messages = []
    opset = default_opset(model)
    if opset != CONVERTED_OPSET:
        messages.append(f"the model is opset {opset}, not the opset {CONVERTED_OPSET} that vit2bpu writes, so the "
                        "INT8 figures describe this graph, not a BPU conversion")
    elif model.producer_name != "vit2bpu":
        messages.append(f"the model was written by '{model.producer_name or 'an unknown producer'}', not vit2bpu, "
                        "so the INT8 figures describe this graph, not a BPU conversion")
    return messages


# ---------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="CONVERTED.onnx", help="opset-11 model written by vit2bpu")
    parser.add_argument("output", metavar="INT8.onnx", help="INT8 QDQ simulation to write (opset 13, atomically)")

    parser.add_argument("--calibration", required=True, metavar="CAL_DIR",
                        help="OUT_DIR of 'vit2bpu calibrate' (preprocess.json and data/), or a folder of float32 "
                             "tensors in the model input shape: headerless .bin or .npy")
    parser.add_argument("--method", choices=METHODS, default="minmax",
                        help="activation range calibration: minmax (default, hb_mapper's max), entropy (a KL "
                             "threshold like hb_mapper's kl, searched over onnxruntime's 128-bin histogram, so it "
                             "can end at the max and equal minmax) or percentile (clips at 99.999%%)")
    channel = parser.add_mutually_exclusive_group()
    channel.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                         help="one weight scale per output channel (default)")
    channel.add_argument("--per-tensor", dest="per_channel", action="store_false",
                         help="one weight scale per weight tensor")

    parser.add_argument("--activation-type", choices=ACTIVATION_TYPES, default="int8",
                        help="int8 with a symmetric range, like the BPU's signed int8 ops (default), or uint8 with "
                             "an asymmetric range")
    parser.add_argument("--float-softmax", action="store_true",
                        help="keep Softmax in float between int8 neighbours, as hb_mapper runs it on the CPU (X3, or "
                             "hb-config --softmax-on-cpu). Default: int8 with the output range fixed to [0, 1], as "
                             "hb-config's run_on_bpu on X5 and J5 has it")
    parser.add_argument("--int8-norm-stats", action="store_true",
                        help="quantize the LayerNorm variance (square, mean of squares, Sqrt) too (default: float)")

    parser.add_argument("--samples", type=int, metavar="N",
                        help="calibrate on the first N tensor files in name order (default: all)")
    parser.add_argument("--eval-samples", type=int, metavar="N",
                        help="compare FP32 and INT8 on the first N files (default: the calibration samples, or "
                             "every file of --eval-data)")
    parser.add_argument("--eval-data", metavar="EVAL_DIR",
                        help="held-out samples in the calibration folder's format, to compare FP32 "
                             "and INT8 on (default: the calibration folder)")

    parser.add_argument("--min-cosine", type=float, metavar="X",
                        help="exit with code 5, writing only --report, when an output's FP32-vs-INT8 cosine is "
                             "below X (default: no check)")
    parser.add_argument("--report", metavar="FILE.json", help="write the settings and measured agreement as JSON")
    parser.add_argument("--force", action="store_true",
                        help="allow INT8.onnx to be the input file, or to end in something other than .onnx")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def run(args) -> int:
    if Path(args.output).suffix.lower() != ".onnx" and not args.force:
        raise UsageError(f"output '{args.output}' does not end in .onnx", hint="pass --force to write it anyway")
    if same_file(args.model, args.output) and not args.force:
        raise OutputError("output path is the input file, and writing it would overwrite the converted model",
                          path=args.output, hint="choose another output path, or pass --force to replace the input")
    int8, report = quantize_model(args.model, args.calibration, method=args.method, per_channel=args.per_channel,
                                  activation_type=args.activation_type, samples=args.samples,
                                  eval_samples=args.eval_samples, eval_dir=args.eval_data,
                                  float_softmax=args.float_softmax,
                                  int8_norm_stats=args.int8_norm_stats)
    low = [r for r in report.outputs if args.min_cosine is not None and not r.cosine >= args.min_cosine]
    written = [] if low else save_model(int8, args.output, input_path=args.model, force=args.force)
    report.int8_model = args.output if written else None
    if args.report:
        write_text_atomically(args.report, json.dumps(report.to_dict(), indent=2) + "\n")
    if not args.quiet:
        print(f"vit2bpu quantize: {args.model} (opset {report.source_opset}) -> {', '.join(written) or 'nothing'}")
        for line in report.summary_lines():
            print(line)
    if low:
        details = ", ".join(f"output '{r.name}' has cosine {r.cosine:.5f}" for r in low)
        raise ParityError(f"INT8 agreement is below --min-cosine {args.min_cosine}: {details}",
                          hint="the INT8 model was not written; try another --method, or more typical calibration "
                               "samples")
    return EXIT_OK
