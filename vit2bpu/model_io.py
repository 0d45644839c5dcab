"""Reading input models with clear errors, and writing outputs atomically.

Writing goes to temporary names in the destination folder first and then
renames, so a failed run never leaves a partial output and never touches the
input file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InputModelError, OutputError, UnsupportedModelError

log = logging.getLogger(__name__)

MIN_OPSET = 11
# protobuf cannot serialise a message of 2 GiB or more; such models need external data.
PROTOBUF_LIMIT = 2**31 - 1
# com.microsoft ops are lowered by passes/lower_contrib.py; an unknown op there is rejected by that pass.
SUPPORTED_DOMAINS = {"", "ai.onnx", "com.microsoft"}
# onnxruntime writes these standard ops into graphs whose opset predates them (LayerNormalization into
# opset 14); vit2bpu lowers them, so onnx.checker's complaint about them is not fatal.
OPS_LOWERED_ABOVE_THEIR_OPSET = ("LayerNormalization", "Gelu", "Attention")


# Above this many bytes of weights, onnx.checker runs on a copy without the weight values:
# serialising hundreds of megabytes for a structural check took seconds.
STRUCTURAL_CHECK_BYTES = 64 * 2**20
_LARGE_TENSOR_ELEMENTS = 4096


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's initializers, counted without serialising the model."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count * 4
    return total


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose large initializers are graph inputs of the same type and shape."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {vi.name for vi in model.graph.input}
    for tensor in model.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        if count <= _LARGE_TENSOR_ELEMENTS:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return light


def check_structure(model: onnx.ModelProto) -> None:
    """onnx.checker on ``model``, on a copy without weight values when the model is large."""
    onnx.checker.check_model(without_weights(model) if weight_bytes(model) > STRUCTURAL_CHECK_BYTES else model)


def default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def load_model(path: str | os.PathLike, validate: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data and validate it; raise InputModelError with the reason.

    With ``validate=False`` the caller runs ``validate_model`` itself, to keep its findings.
    """
    path = Path(path)
    if not path.exists():
        raise InputModelError("file not found", path=str(path))
    if path.is_dir():
        raise InputModelError("is a directory, expected an .onnx file", path=str(path))
    if path.stat().st_size == 0:
        raise InputModelError("is empty (0 bytes)", path=str(path))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise InputModelError(f"is not a valid ONNX file or is truncated ({exc.__class__.__name__}: {exc})",
                              path=str(path), hint="export the model again") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputModelError("contains no ONNX graph (not an ONNX model, or truncated)", path=str(path))
    _load_external_data(model, path)
    if validate:
        validate_model(model, str(path))
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location is None or not (path.parent / location).exists():
                raise InputModelError(f"external data file '{location}' for tensor '{tensor.name}' is missing",
                                      path=str(path), hint="keep the .data file beside the .onnx file")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise InputModelError(f"external data could not be read: {exc}", path=str(path)) from None


def validate_model(model: onnx.ModelProto, path: str | None = None) -> list[str]:
    """Check the model with onnx.checker and check its opset and domains.

    Returns the checker findings vit2bpu repairs (nodes out of order, ops written
    above their opset), so the caller can report them as warnings.
    """
    findings = []
    opset = default_opset(model)
    if opset is None:
        raise InputModelError("declares no default-domain opset", path=path)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise InputModelError(f"uses opset {opset}, but the installed onnx {onnx.__version__} knows opsets up to {newest}",
                              path=path, hint="upgrade onnx, or export at a lower opset")
    declared_ir = model.ir_version
    try:
        if declared_ir > onnx.IR_VERSION:
            # Newer exporters stamp IR 10 on graphs that use nothing beyond IR 9; check them as the
            # newest IR the installed onnx supports. The output is written at IR 7 either way.
            log.info("%s: IR version %d is newer than onnx %s knows (%d); checking it as %d", path or "model",
                     declared_ir, onnx.__version__, onnx.IR_VERSION, onnx.IR_VERSION)
            model.ir_version = onnx.IR_VERSION
        check_structure(model)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if "topologically sorted" in first_line:
            _check_sortable(model.graph, path)
        elif not _tolerated(first_line):
            raise InputModelError(f"fails onnx.checker: {first_line}", path=path) from None
        findings.append(f"the input fails onnx.checker ({first_line}); vit2bpu repairs this")
        # NOTE: the checker stops at its first finding, so the rest of this model goes unchecked
        # here; the converted model is checked in full before it is written.
        log.info("%s: onnx.checker: %s (vit2bpu repairs this)", path or "model", first_line)
    finally:
        model.ir_version = declared_ir
    for node in model.graph.node:
        if node.domain not in SUPPORTED_DOMAINS:
            raise UnsupportedModelError(f"op in domain '{node.domain}' has no opset-11 form in vit2bpu", path=path,
                                        node=node.name, op_type=node.op_type,
                                        hint="export without runtime-specific fusions")
    return findings


def _check_sortable(graph: onnx.GraphProto, path: str | None) -> None:
    """Accept nodes out of order (vit2bpu sorts them) but reject an input that no node produces."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            node = pending[0]
            missing = next(name for name in node.input if name not in available)
            raise InputModelError(f"fails onnx.checker: input '{missing}' of node '{node.name}' ({node.op_type}) is "
                                  "produced by no node, initializer or graph input", path=path)
        for node in ready:
            available.update(node.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]


def _tolerated(message: str) -> bool:
    """Checker findings that vit2bpu repairs: ops written above their opset by onnxruntime."""
    return any(f"No Op registered for {op} with domain_version" in message for op in OPS_LOWERED_ABOVE_THEIR_OPSET)


def upgrade_to_min_opset(model: onnx.ModelProto, path: str | None = None) -> onnx.ModelProto:
    """Convert opset 9 and 10 models to opset 11 with onnx's version converter."""
    opset = default_opset(model)
    if opset is None or opset >= MIN_OPSET:
        return model
    try:
        upgraded = onnx.version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises RuntimeError, ValidationError and others
        raise UnsupportedModelError(f"onnx's version converter could not upgrade opset {opset} to {MIN_OPSET}: {exc}",
                                    path=path, hint="export the model at opset 11 or newer") from None
    log.info("upgraded opset %d to %d with onnx.version_converter", opset, MIN_OPSET)
    return upgraded


def _public_mode(path: Path) -> None:
    """Give a file written through a temporary name the mode a plain open() would (0666 minus the umask).

    mkstemp and mkdtemp create owner-only files, which a toolchain container running as
    another user could not read.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False,
               input_path: str | os.PathLike | None = None, force: bool = False,
               keep_weights: bool = True) -> list[str]:
    """Write ``model`` to ``path`` atomically and return the files written.

    With external data (asked for, or needed above 2 GiB), the weights go to
    ``<name>.data`` beside the model, and ``keep_weights=False`` leaves them out of
    ``model`` afterwards instead of reading them back. Both files are first written to a
    temporary folder inside the destination folder; the data file is renamed
    into place first and the model last; on any failure both are removed.
    """
    path = Path(path)
    if input_path is not None and same_file(input_path, path) and not force:
        raise OutputError("output path is the input file; refusing to overwrite it", path=str(path),
                          hint="choose another output path, or pass --force to replace the input")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder '{folder}' does not exist", path=str(path), hint="create it first")
    if path.is_dir():
        raise OutputError("output path is a directory", path=str(path))
    # The weights dominate the size; leave a margin for the graph itself.
    needs_external = external_data or weight_bytes(model) >= PROTOBUF_LIMIT - 2**26
    data_name = path.name + ".data"
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OutputError(f"cannot write in '{folder}': {exc.strerror}", path=str(path)) from None
    written = []
    try:
        staged_model = staging / path.name
        if needs_external:
            onnx.save_model(model, str(staged_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            with open(staged_model, "wb") as handle:
                handle.write(model.SerializeToString())
                handle.flush()
                os.fsync(handle.fileno())
        if needs_external:
            _public_mode(staging / data_name)
            os.replace(staging / data_name, folder / data_name)
            written.append(str(folder / data_name))
        _public_mode(staged_model)
        os.replace(staged_model, path)
        written.append(str(path))
    except OSError as exc:
        for name in written:
            if name != str(path):
                Path(name).unlink(missing_ok=True)
        raise OutputError(f"could not be written: {exc.strerror or exc}", path=str(path),
                          hint="check free space and permissions") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if needs_external and keep_weights:
        # onnx.save_model moved the weights out of the in-memory model; read them back for the caller.
        onnx.load_external_data_for_model(model, str(folder))
    return written


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write a text file (the JSON report) through a temporary file and a rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder '{folder}' does not exist", path=str(path), hint="create it first")
    temporary = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{path.name}.", suffix=".tmp", delete=False,
                                         encoding="utf-8") as handle:
            temporary = handle.name
            handle.write(text)
        _public_mode(Path(temporary))
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise OutputError(f"could not be written: {exc.strerror or exc}", path=str(path)) from None
