"""The Python API: ``convert`` a model in memory or on disk, ``save`` the result."""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import __version__
from .errors import ParityError, UnsupportedModelError, UsageError, Vit2BpuError
from .graph import export_model, light_model, release_memory
from .model_io import (check_structure, default_opset, load_model, save_model, upgrade_to_min_opset, validate_model,
                       weight_bytes)
from .options import DEFAULT_MIN_COSINE, ConvertOptions
from .parity import check_parity, parity_failures
from .pass_manager import PassContext, run_passes
from .passes import REWRITE_NAMES, build_pipeline
from .report import ConversionReport, float_dtype_name, op_counts, structure_issues

log = logging.getLogger(__name__)

OUTPUT_OPSET = 11
# ONNX 1.6 introduced IR version 7 together with opset 11; the vendor toolchain reads both.
OUTPUT_IR_VERSION = 7


def convert(model: onnx.ModelProto | str | os.PathLike, options: ConvertOptions | None = None,
            **overrides: Any) -> tuple[onnx.ModelProto, ConversionReport]:
    """Convert a ViT-family ONNX model into the opset-11, all-4-D convolution form.

    ``model`` is a ``ModelProto`` or a path. Options come as a ``ConvertOptions``
    or as keyword arguments with the same names (``target="x3"``,
    ``input_shapes={"input": [1, 3, 224, 224]}``, ``parity=False``, ...).
    Returns the converted model and a ``ConversionReport``. Raises a
    ``Vit2BpuError`` subclass on bad input, unsupported content or a parity failure.
    """
    if options is None:
        options = ConvertOptions(**overrides)
    elif overrides:
        raise UsageError("pass either a ConvertOptions or keyword options, not both")
    options.validate()
    started = time.perf_counter()
    report = ConversionReport(target=options.target, layernorm=options.layernorm_form(),
                              softmax=options.softmax_form())

    # 1. Load and validate; opset 9 and 10 are upgraded to 11 first.
    path = None
    if isinstance(model, (str, os.PathLike)):
        path = str(model)
        original = load_model(path, validate=False)
        report.input = path
    else:
        original = model
    report.warnings.extend(validate_model(original, path))
    report.input_opset = default_opset(original)
    report.ops_before = op_counts(original)
    working = upgrade_to_min_opset(original, path)
    if options.simplify:
        working = _simplify(working, options)

    # 2. Run the passes in their declared order.
    graph = gs.import_onnx(working)
    graph.toposort()  # some post-processors (onnxruntime's float16 converter) leave nodes unsorted
    ctx = PassContext(options=options, opset=default_opset(working))
    if path is not None:
        # The input was read here, so it can go now: its weights move into the graph, and each
        # one the passes replace is freed as they go. Parity then reads the original from its file.
        _detach_from_input(graph)
        del original, working
        release_memory()
    pipeline = build_pipeline(list(options.passes) if options.passes is not None else None)
    report.passes = run_passes(graph, pipeline, ctx)
    report.input_shapes = {t.name: list(t.shape) for t in graph.inputs}

    # 3. Write the opset-11 model and check its structure.
    converted = _export(graph)
    del graph
    release_memory()
    report.ops_after = op_counts(converted)
    report.unconverted = structure_issues(converted, ctx.output_restore_nodes)
    _explain_unconverted(report)
    rewrites = {r.name: r.rewritten for r in report.passes if r.name in REWRITE_NAMES}
    if not rewrites.get("layernorm") and not rewrites.get("attention"):
        report.warnings.append("no transformer pattern (LayerNorm or attention) was found; only Linear layers and "
                               "opset were converted")
    if options.strict and report.unconverted:
        first = report.unconverted[0]
        raise UnsupportedModelError(f"{len(report.unconverted)} node(s) are not in the 4-D convolution form, "
                                    f"first: {first['reason']}", path=path, node=first["node"],
                                    op_type=first["op_type"], hint="drop --strict to write the partial conversion")
    report.seconds["convert"] = time.perf_counter() - started

    # 4. Parity with onnxruntime.
    if options.parity:
        started_parity = time.perf_counter()
        _run_parity(original if path is None else path, converted, report, options)
        report.seconds["parity"] = time.perf_counter() - started_parity
    return converted, report


def save(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False,
         input_path: str | os.PathLike | None = None, force: bool = False, keep_weights: bool = True) -> list[str]:
    """Write a converted model atomically; see ``model_io.save_model``."""
    return save_model(model, path, external_data=external_data, input_path=input_path, force=force,
                      keep_weights=keep_weights)


def _export(graph: gs.Graph) -> onnx.ModelProto:
    graph.opset = OUTPUT_OPSET
    model = export_model(graph, OUTPUT_OPSET)
    model.ir_version = OUTPUT_IR_VERSION
    model.producer_name = "vit2bpu"
    model.producer_version = __version__
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(light_model(graph, OUTPUT_OPSET), strict_mode=False)
    model.graph.value_info.extend(inferred.graph.value_info)
    outputs = {vi.name: vi for vi in inferred.graph.output}
    for vi in model.graph.output:
        if not vi.type.tensor_type.HasField("shape") and vi.name in outputs:
            vi.CopyFrom(outputs[vi.name])
    try:
        check_structure(model)
    except onnx.checker.ValidationError as exc:
        raise UnsupportedModelError(f"the converted model fails onnx.checker: {str(exc).strip().splitlines()[0]}",
                                    hint="please report this with the input model") from None
    return model


def _detach_from_input(graph: gs.Graph) -> None:
    """Load the weights ``graph`` still reads from the input model, so the input model can be freed.

    protobuf keeps a whole message in one arena, so the input's memory returns only when
    nothing refers to any part of it.
    """
    constants = list(graph.tensors().values())
    for node in graph.nodes:  # a Constant node's value is an attribute, outside graph.tensors()
        constants.extend(v for v in node.attrs.values() if isinstance(v, gs.Constant))
    for tensor in constants:
        if isinstance(getattr(tensor, "_values", None), LazyValues):
            tensor.values = tensor._values.load()


def _explain_unconverted(report: ConversionReport) -> None:
    """Attach the reason a pass gave for skipping a node to its structure issue."""
    reasons = {}
    for result in report.passes:
        for skipped in result.skipped:
            reasons.setdefault(skipped["node"], f"{result.name}: {skipped['reason']}")
    for issue in report.unconverted:
        if issue["node"] in reasons:
            issue["skipped_because"] = reasons[issue["node"]]


def _run_parity(original, converted: onnx.ModelProto, report: ConversionReport, options: ConvertOptions) -> None:
    from .parity import load_user_inputs

    user_inputs = options.parity_inputs
    input_names = list(report.input_shapes)
    if isinstance(user_inputs, (str, os.PathLike)):
        user_inputs = load_user_inputs(user_inputs, input_names)
    results = check_parity(original, converted, report.input_shapes, seed=options.parity_seed, user_inputs=user_inputs)
    report.parity = results
    dtype = float_dtype_name(converted)
    threshold = options.min_cosine if options.min_cosine is not None else DEFAULT_MIN_COSINE.get(
        dtype, DEFAULT_MIN_COSINE["float32"])
    report.parity_failures = parity_failures(results, float(threshold), options.check_top1)
    report.parity_passed = not report.parity_failures
    if report.parity_failures:
        block = _first_divergent_block(original, converted, report, float(threshold), user_inputs)
        if block is not None:
            report.parity_failures.append(f"first divergent block: {block}")
        error = ParityError("parity check failed: " + "; ".join(report.parity_failures), results=results,
                          path=report.input,
                          hint="nothing was written; --min-cosine sets the threshold, --no-parity skips the check")
        error.report = report
        raise error


def _first_divergent_block(original, converted: onnx.ModelProto, report: ConversionReport, threshold: float,
                           user_inputs) -> str | None:
    """Name the first block whose output diverges, to point at the faulty rewrite; None when it cannot tell.

    It runs on the inputs and at the threshold the parity check used, so a failure it saw is seen here too.
    """
    from .diff import first_divergent_block

    try:
        return first_divergent_block(original, converted, report.input_shapes, threshold=threshold,
                                     inputs=user_inputs)
    except Vit2BpuError as exc:  # the graphs could not be paired block by block; the parity failure stands
        log.info("per-block diagnosis skipped: %s", exc)
        return None


def _simplify(model: onnx.ModelProto, options: ConvertOptions) -> onnx.ModelProto:
    try:
        import onnxsim
    except ImportError:
        raise UsageError("--simplify needs onnxsim", hint="pip install onnxsim") from None
    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes=dict(options.input_shapes) or None)
    if not ok:
        log.warning("onnxsim could not validate its output; continuing with the unsimplified model")
        return model
    return simplified
