"""Regenerate the ONNX test fixtures in tests/fixtures and their MANIFEST.json.

Every fixture is exported by models/export.py from a seeded random model, then
optionally post-processed the way users post-process ViT exports (onnxsim,
the onnxruntime transformer optimizer, onnxruntime's saved optimized graph,
float16 conversion, external data). Each file is then verified: the ONNX checker
passes, onnxruntime runs it, and its output is compared with PyTorch's.

Usage:
    python models/make_fixtures.py                 # all fixtures and MANIFEST.json
    python models/make_fixtures.py --only NAME...  # some fixtures; other manifest entries are kept
    python models/make_fixtures.py --list          # print the fixture names
    python models/make_fixtures.py --demo          # only models/deit_tiny_demo.onnx
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable

import export
from export import ModelConfig

import numpy as np
import onnx
import onnxruntime
import torch

LOG = logging.getLogger("make_fixtures")

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures"
MANIFEST_NAME = "MANIFEST.json"
DEMO_PATH = REPO_ROOT / "models" / "deit_tiny_demo.onnx"

# Seed of the random input used to compare onnxruntime with PyTorch. The weight
# seed of every fixture is 0.
VERIFY_INPUT_SEED = 1
# Batch size used to check that a dynamic-batch fixture really accepts another batch.
DYNAMIC_BATCH_CHECK = 3
# Maximum absolute logit difference accepted between onnxruntime and PyTorch.
# The float16 graphs are compared with the float32 PyTorch model: on 20 random
# inputs their error was at most 2.2e-4 (onnxruntime 1.32 CPU, logits within +-0.35).
FLOAT32_TOLERANCE = 1e-4
FLOAT16_TOLERANCE = 2e-3

SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": (64, 64), "patch_size": 16, "num_classes": 10}
TIMM_DEIT = ModelConfig(kind="timm-deit", **SMALL)
TIMM_DEIT_SDPA = ModelConfig(kind="timm-deit", sdpa=True, **SMALL)
TIMM_DEIT_DISTILLED = ModelConfig(kind="timm-deit-distilled", **SMALL)
HF_VIT_EAGER = ModelConfig(kind="hf-vit", attn="eager", **SMALL)
HF_VIT_SDPA = ModelConfig(kind="hf-vit", attn="sdpa", **SMALL)
HF_DEIT_TEACHER_EAGER = ModelConfig(kind="hf-deit-teacher", attn="eager", **SMALL)
# Width 78 is not a multiple of 8 and neither is its head dim 26. The 64x48
# (HxW) image gives a non-square 4x3 patch grid: 12 patches + class token = 13 tokens.
TIMM_DEIT_W78 = ModelConfig(
    kind="timm-deit", embed_dim=78, depth=3, num_heads=3, img_size=(64, 48), patch_size=16, num_classes=10
)
TINY_CNN = ModelConfig(kind="tiny-cnn", img_size=(32, 32), num_classes=10)
DEMO = ModelConfig(kind="timm-deit", **export.PRESETS["deit-tiny"])

# Node metadata key in which the dynamo exporter stores Python stack traces. They
# contain absolute paths of the exporting machine and line numbers of export.py,
# so fixtures drop them to stay reproducible. The other metadata keys are kept.
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"

MODEL_SOURCES = {
    "timm-deit": "timm.models.vision_transformer.VisionTransformer",
    "timm-deit-distilled": "timm.models.deit.VisionTransformerDistilled",
    "hf-vit": "transformers.ViTForImageClassification",
    "hf-deit-teacher": "transformers.DeiTForImageClassificationWithTeacher",
    "tiny-cnn": "export.TinyCNN (torch.nn)",
}


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One committed ONNX file and how it is made."""

    name: str
    config: ModelConfig
    description: str
    exporter: str = "torchscript"
    opset: int = 14
    dynamic_batch: bool = False
    constant_folding: bool = True
    # Key of POST_PROCESSORS applied to the exported file, or None.
    post_process: str | None = None


def simplify_with_onnxsim(source: Path, output: Path, fixture: Fixture) -> dict:
    import onnxsim

    simplified, check_ok = onnxsim.simplify(onnx.load(str(source)))
    if not check_ok:
        raise RuntimeError(f"onnxsim could not validate its simplified model of {source}")
    onnx.save_model(simplified, str(output))
    return {"post_processor": f"onnxsim.simplify (onnxsim {onnxsim.__version__})"}


def optimize_with_ort_transformers(source: Path, output: Path, fixture: Fixture) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level=1 is the default of optimize_model for model_type "vit": onnxruntime
    # first applies its basic graph optimizations, then the Python fusions run.
    optimized = optimize_model(
        str(source),
        model_type="vit",
        num_heads=fixture.config.num_heads,
        hidden_size=fixture.config.embed_dim,
        opt_level=1,
    )
    optimized.save_model_to_file(str(output))
    statistics = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    return {
        "post_processor": (
            f"onnxruntime.transformers.optimizer.optimize_model(model_type='vit', "
            f"num_heads={fixture.config.num_heads}, hidden_size={fixture.config.embed_dim}, opt_level=1)"
        ),
        "fused_operator_statistics": statistics,
    }


def save_ort_extended(source: Path, output: Path, fixture: Fixture) -> dict:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(output)
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return {
        "post_processor": (
            "onnxruntime.InferenceSession on CPUExecutionProvider with graph_optimization_level="
            "ORT_ENABLE_EXTENDED and optimized_model_filepath"
        )
    }


def convert_to_float16(source: Path, output: Path, fixture: Fixture, keep_io_types: bool) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=keep_io_types)
    onnx.save_model(converted, str(output))
    return {
        "post_processor": (
            f"onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types={keep_io_types})"
        )
    }


def save_with_external_data(source: Path, output: Path, fixture: Fixture) -> dict:
    # size_threshold=0 moves every initializer, shape tensors included. onnxruntime
    # 1.32 still loads this TorchScript graph because its shape tensors are Constant
    # nodes, which stay inline.
    export.save_model(onnx.load(str(source)), output, external_data=True, size_threshold=0)
    return {
        "post_processor": (
            "onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True, "
            "size_threshold=0, convert_attribute=False)"
        ),
        "external_data": output.name + ".data",
    }


POST_PROCESSORS: dict[str, Callable[[Path, Path, Fixture], dict]] = {
    "onnxsim": simplify_with_onnxsim,
    "ortopt": optimize_with_ort_transformers,
    "ort_extended": save_ort_extended,
    "fp16": lambda source, output, fixture: convert_to_float16(source, output, fixture, keep_io_types=False),
    "fp16_keepio": lambda source, output, fixture: convert_to_float16(source, output, fixture, keep_io_types=True),
    "extdata": save_with_external_data,
}


def timm_fixture(opset: int, **options) -> Fixture:
    return Fixture(
        name=f"timm_deit_ts_op{opset}.onnx",
        config=TIMM_DEIT,
        description=f"timm DeiT, explicit attention (fused_attn=False), TorchScript exporter, opset {opset}",
        opset=opset,
        **options,
    )


def op14_variant(suffix: str, description: str, **options) -> Fixture:
    return Fixture(
        name=f"timm_deit_ts_op14_{suffix}.onnx",
        config=TIMM_DEIT,
        description=f"timm DeiT (explicit attention, TorchScript, opset 14) {description}",
        **options,
    )


FIXTURES = [
    timm_fixture(11),
    timm_fixture(13),
    timm_fixture(14),
    timm_fixture(17),
    Fixture(
        name="timm_deit_ts_op14_w78h3_d3.onnx",
        config=TIMM_DEIT_W78,
        description=(
            "timm DeiT, width 78 with 3 heads of 26, depth 3, 64x48 (HxW) input giving a 4x3 patch grid "
            "and 13 tokens; explicit attention, TorchScript, opset 14"
        ),
    ),
    Fixture(
        name="timm_deit_distilled_ts_op14.onnx",
        config=TIMM_DEIT_DISTILLED,
        description="timm distilled DeiT (class + distillation tokens, two heads averaged), TorchScript, opset 14",
    ),
    Fixture(
        name="hf_deit_teacher_eager_op14.onnx",
        config=HF_DEIT_TEACHER_EAGER,
        description=(
            "transformers DeiTForImageClassificationWithTeacher, eager attention, layer_norm_eps 1e-12, "
            "TorchScript, opset 14"
        ),
    ),
    Fixture(
        name="hf_vit_sdpa_op14.onnx",
        config=HF_VIT_SDPA,
        description="transformers ViTForImageClassification, sdpa attention, TorchScript, opset 14",
    ),
    Fixture(
        name="hf_vit_eager_op17.onnx",
        config=HF_VIT_EAGER,
        description="transformers ViTForImageClassification, eager attention, TorchScript, opset 17",
        opset=17,
    ),
    Fixture(
        name="timm_deit_dynamo_op18.onnx",
        config=TIMM_DEIT,
        description="timm DeiT, explicit attention, dynamo exporter, opset 18",
        exporter="dynamo",
        opset=18,
    ),
    Fixture(
        name="timm_deit_dynamo_op20.onnx",
        config=TIMM_DEIT,
        description="timm DeiT, explicit attention, dynamo exporter, opset 20",
        exporter="dynamo",
        opset=20,
    ),
    Fixture(
        name="timm_deit_dynamo_op23.onnx",
        config=TIMM_DEIT,
        description="timm DeiT, explicit attention, dynamo exporter, opset 23",
        exporter="dynamo",
        opset=23,
    ),
    Fixture(
        name="timm_deit_sdpa_ts_op14.onnx",
        config=TIMM_DEIT_SDPA,
        description="timm DeiT, fused attention (F.scaled_dot_product_attention), TorchScript, opset 14",
    ),
    Fixture(
        name="timm_deit_sdpa_dynamo_op18.onnx",
        config=TIMM_DEIT_SDPA,
        description="timm DeiT, fused attention (F.scaled_dot_product_attention), dynamo exporter, opset 18",
        exporter="dynamo",
        opset=18,
    ),
    Fixture(
        name="timm_deit_sdpa_dynamo_op23.onnx",
        config=TIMM_DEIT_SDPA,
        description="timm DeiT, fused attention, dynamo exporter, opset 23 (ONNX Attention op)",
        exporter="dynamo",
        opset=23,
    ),
    Fixture(
        name="hf_vit_sdpa_dynamo_op18.onnx",
        config=HF_VIT_SDPA,
        description="transformers ViTForImageClassification, sdpa attention, dynamo exporter, opset 18",
        exporter="dynamo",
        opset=18,
    ),
    op14_variant("onnxsim", "simplified by onnxsim", post_process="onnxsim"),
    Fixture(
        name="hf_vit_eager_op14_onnxsim.onnx",
        config=HF_VIT_EAGER,
        description="transformers ViT, eager attention, TorchScript, opset 14, simplified by onnxsim",
        post_process="onnxsim",
    ),
    op14_variant(
        "ortopt",
        "optimized by onnxruntime.transformers.optimizer (model_type vit, opt_level 1)",
        post_process="ortopt",
    ),
    op14_variant(
        "ort_extended",
        "as saved by onnxruntime with graph_optimization_level ORT_ENABLE_EXTENDED",
        post_process="ort_extended",
    ),
    op14_variant("fp16", "converted to float16, float16 input and output", post_process="fp16"),
    op14_variant(
        "fp16_keepio", "converted to float16 with keep_io_types=True (float32 input and output)",
        post_process="fp16_keepio",
    ),
    op14_variant("dynbatch", "with a dynamic batch dimension on input and output", dynamic_batch=True),
    op14_variant("nofold", "exported with do_constant_folding=False", constant_folding=False),
    op14_variant(
        "extdata",
        "with every initializer in timm_deit_ts_op14_extdata.onnx.data (Constant nodes stay inline)",
        post_process="extdata",
    ),
    Fixture(
        name="hf_deit_teacher_dynamo_op18.onnx",
        config=HF_DEIT_TEACHER_EAGER,
        description="transformers DeiTForImageClassificationWithTeacher, eager attention, dynamo exporter, opset 18",
        exporter="dynamo",
        opset=18,
    ),
    Fixture(
        name="resnet_tiny_op13.onnx",
        config=TINY_CNN,
        description=(
            "small CNN without residual connections or attention: two Conv-BatchNorm-ReLU blocks, "
            "global average pool, Flatten, Linear to 10 classes; TorchScript, opset 13"
        ),
        opset=13,
    ),
]


def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "timm", "transformers", "onnx", "onnxruntime", "onnxsim", "onnxscript"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_checker(path: Path) -> str:
    """Run onnx.checker on path and return the outcome, including the first line of any error.

    A failure is recorded, not raised, because some post-processors write graphs
    that onnxruntime runs but the ONNX checker rejects.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return "check_model(full_check=True) passed"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        full_check_error = str(error).strip().splitlines()[0]
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        LOG.warning("%s: onnx.checker failed: %s", path.name, error)
        return f"check_model failed: {str(error).strip().splitlines()[0]}"
    LOG.warning("%s: full_check failed: %s", path.name, full_check_error)
    return f"check_model passed; full_check failed: {full_check_error}"


def run_onnxruntime(path: Path, example: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
    (logits,) = session.run(None, {model_input.name: example.numpy().astype(dtype)})
    return logits.astype(np.float32)


def max_abs_error(model: torch.nn.Module, path: Path, example: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(example).numpy()
    actual = run_onnxruntime(path, example)
    if actual.shape != expected.shape:
        raise RuntimeError(f"{path.name}: onnxruntime output shape {actual.shape}, PyTorch {expected.shape}")
    return float(np.abs(actual - expected).max())


def value_info_summary(value: onnx.ValueInfoProto) -> dict:
    tensor_type = value.type.tensor_type
    shape = [dim.dim_param if dim.HasField("dim_param") else dim.dim_value for dim in tensor_type.shape.dim]
    return {"name": value.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name}


def config_summary(config: ModelConfig) -> dict:
    if config.kind == "tiny-cnn":
        return {"channels": list(export.TINY_CNN_CHANNELS), "classes": config.num_classes, "image_size": list(config.img_size)}

    if config.kind.startswith("timm"):
        attention = "sdpa" if config.sdpa else "explicit"
    else:
        attention = config.attn
    return {
        "width": config.embed_dim,
        "depth": config.depth,
        "heads": config.num_heads,
        "tokens": config.num_tokens,
        "classes": config.num_classes,
        "image_size": list(config.img_size),
        "patch_size": config.patch_size,
        "mlp_ratio": config.mlp_ratio,
        "attention": attention,
        "layer_norm_eps": 1e-12 if config.kind.startswith("hf") else 1e-6,
    }


def strip_stack_traces(model: onnx.ModelProto) -> int:
    """Remove the STACK_TRACE_KEY metadata of every node in place; return how many were removed."""
    removed = 0
    for node in model.graph.node:
        kept = [entry for entry in node.metadata_props if entry.key != STACK_TRACE_KEY]
        removed += len(node.metadata_props) - len(kept)
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return removed


def export_fixture(fixture: Fixture, output: Path) -> tuple[torch.nn.Module, dict]:
    """Export and post-process one fixture into output; return the PyTorch model and manifest details."""
    with tempfile.TemporaryDirectory(prefix="vit2bpu-fixture-") as scratch:
        exported = Path(scratch) / "exported.onnx"
        model, proto = export.export_model(
            fixture.config,
            exported,
            exporter=fixture.exporter,
            opset=fixture.opset,
            dynamic_batch=fixture.dynamic_batch,
            constant_folding=fixture.constant_folding,
        )
        details = {"post_processor": None}
        if strip_stack_traces(proto):
            details["removed_node_metadata"] = STACK_TRACE_KEY
        if fixture.post_process is None:
            export.save_model(proto, output, external_data=False)
            return model, details

        source = Path(scratch) / "source.onnx"
        export.save_model(proto, source, external_data=False)
        details.update(POST_PROCESSORS[fixture.post_process](source, output, fixture))
    return model, details


def verify_fixture(fixture: Fixture, model: torch.nn.Module, path: Path) -> dict:
    """Check, run and compare one saved fixture.

    Raises RuntimeError when onnxruntime's output differs from PyTorch's by more than the tolerance.
    """
    results = {"checker": run_checker(path)}
    example = export.make_example_input(fixture.config, batch=1, seed=VERIFY_INPUT_SEED)
    error = max_abs_error(model, path, example)
    results["onnxruntime"] = f"runs on CPUExecutionProvider (onnxruntime {onnxruntime.__version__})"
    results["torch_max_abs_err"] = error
    if fixture.dynamic_batch:
        batch_example = export.make_example_input(fixture.config, batch=DYNAMIC_BATCH_CHECK, seed=VERIFY_INPUT_SEED)
        results[f"torch_max_abs_err_batch{DYNAMIC_BATCH_CHECK}"] = max_abs_error(model, path, batch_example)

    tolerance = FLOAT16_TOLERANCE if fixture.post_process in ("fp16", "fp16_keepio") else FLOAT32_TOLERANCE
    results["tolerance"] = tolerance
    worst = max(value for key, value in results.items() if key.startswith("torch_max_abs_err"))
    if worst > tolerance:
        raise RuntimeError(
            f"{fixture.name}: onnxruntime output differs from PyTorch by {worst:.3g}, over the tolerance {tolerance}"
        )
    return results


def find_zero_gamma(model: torch.nn.Module) -> dict | None:
    """Return the module name and zero channels of the first LayerNorm whose gamma has exact zeros."""
    for name, module in export.unwrap(model).named_modules():
        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
            zeros = (module.weight == 0).nonzero().flatten().tolist()
            if zeros:
                return {"module": name, "channels": zeros}
    return None


def manifest_entry(
    fixture: Fixture, model: torch.nn.Module, path: Path, details: dict, verification: dict
) -> dict:
    proto = onnx.load(str(path), load_external_data=False)
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    op_counts = collections.Counter(node.op_type for node in proto.graph.node)
    exporter = f"torch.onnx.export(dynamo={fixture.exporter == 'dynamo'})"
    if fixture.exporter == "torchscript":
        exporter += f", do_constant_folding={fixture.constant_folding}"
    return {
        "file": fixture.name,
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
        "description": fixture.description,
        "generator": f"models/make_fixtures.py --only {fixture.name}",
        "source_model": MODEL_SOURCES[fixture.config.kind],
        "weights": "random, seed 0 (export.randomize_weights)",
        "layer_norm_gamma_zeros": find_zero_gamma(model),
        "exporter": exporter,
        "requested_opset": fixture.opset,
        "opset": opsets.get("ai.onnx"),
        "opset_imports": opsets,
        **details,
        "versions": package_versions(),
        "config": config_summary(fixture.config),
        "input": value_info_summary(proto.graph.input[0]),
        "output": value_info_summary(proto.graph.output[0]),
        "node_count": len(proto.graph.node),
        "op_counts": dict(op_counts.most_common()),
        **verification,
    }


def external_data_entry(model_entry: dict, data_path: Path) -> dict:
    """Build the manifest entry of an external data file from the entry of its model."""
    entry = {key: value for key, value in model_entry.items() if key not in ("node_count", "op_counts")}
    entry.update(
        file=data_path.name,
        bytes=data_path.stat().st_size,
        sha256=sha256_of(data_path),
        description=f"external data of {model_entry['file']}: all of its initializers in one file",
        external_data_of=model_entry["file"],
    )
    entry.pop("external_data", None)
    return entry


def make_fixture(fixture: Fixture, output_dir: Path) -> list[dict]:
    path = output_dir / fixture.name
    LOG.info("generating %s", fixture.name)
    model, details = export_fixture(fixture, path)
    verification = verify_fixture(fixture, model, path)
    entry = manifest_entry(fixture, model, path, details, verification)
    LOG.info(
        "%s: %d bytes, opset %s, max abs error vs PyTorch %.3g",
        fixture.name,
        entry["bytes"],
        entry["opset"],
        entry["torch_max_abs_err"],
    )
    entries = [entry]
    if "external_data" in details:
        entries.append(external_data_entry(entry, output_dir / details["external_data"]))
    return entries


def write_manifest(output_dir: Path, new_entries: list[dict]) -> None:
    """Write MANIFEST.json, keeping the entries of files that were not regenerated."""
    manifest_path = output_dir / MANIFEST_NAME
    entries = {}
    if manifest_path.exists():
        entries = {entry["file"]: entry for entry in json.loads(manifest_path.read_text())["files"]}
    entries.update({entry["file"]: entry for entry in new_entries})

    order = []
    for fixture in FIXTURES:
        order.append(fixture.name)
        if fixture.post_process == "extdata":
            order.append(fixture.name + ".data")
    known = [entries[name] for name in order if name in entries]
    manifest = {
        "description": (
            "ONNX test fixtures of vit2bpu, one entry per file. Regenerate them with "
            "'python models/make_fixtures.py' in an environment with the listed versions."
        ),
        "files": known,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def make_demo() -> None:
    """Write the full-size timm DeiT-tiny demo model and compare it with PyTorch."""
    model, proto = export.export_model(DEMO, DEMO_PATH, exporter="torchscript", opset=17, seed=0)
    example = export.make_example_input(DEMO, batch=1, seed=VERIFY_INPUT_SEED)
    error = max_abs_error(model, DEMO_PATH, example)
    LOG.info(
        "wrote %s: %d bytes, %d nodes, max abs error vs PyTorch %.3g",
        DEMO_PATH,
        DEMO_PATH.stat().st_size,
        len(proto.graph.node),
        error,
    )


def main(argv: list[str] | None = None) -> int:
    names = [fixture.name for fixture in FIXTURES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=names, help="regenerate only these fixtures")
    parser.add_argument("--list", action="store_true", help="print the fixture names and exit")
    parser.add_argument("--demo", action="store_true", help=f"write only the demo model {DEMO_PATH.name}")
    parser.add_argument(
        "--output-dir", type=Path, default=FIXTURE_DIR, help=f"folder of the fixtures (default {FIXTURE_DIR})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    if args.list:
        print("\n".join(names))
        return 0
    if args.demo:
        make_demo()
        return 0

    selected = [fixture for fixture in FIXTURES if args.only is None or fixture.name in args.only]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for fixture in selected:
        entries.extend(make_fixture(fixture, args.output_dir))
    write_manifest(args.output_dir, entries)
    LOG.info("wrote %d files and %s", len(entries), args.output_dir / MANIFEST_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
