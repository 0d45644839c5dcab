"""Export a reference Vision Transformer to ONNX.

Models are built from configs, never downloaded: weights come from a local
state-dict file (--weights) or are random with a fixed seed. Random weights get
non-trivial LayerNorm affines, biases and token embeddings, because exporters
merge all-equal tensors (LayerNorm gamma of ones, zero biases) into Identity
nodes and the converter would then never see them.

Example:
    python models/export.py timm-deit deit_tiny.onnx --opset 17
    python models/export.py hf-vit vit.onnx --attn sdpa --exporter dynamo --opset 18
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

# Every model here is built from a config, so the Hugging Face hub must never be
# contacted. The variable is read when transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx
import torch
from torch import nn

LOG = logging.getLogger("export")

MODEL_KINDS = ("timm-deit", "timm-deit-distilled", "hf-vit", "hf-deit-teacher", "tiny-cnn")
HF_MODEL_KINDS = ("hf-vit", "hf-deit-teacher")
EXPORTERS = ("torchscript", "dynamo")

# Sizes of the standard timm configs (deit_*_patch16_224, vit_large_patch16_224,
# vit_huge_patch14_224 in timm 1.0.31), all at 224x224 with 1000 classes.
PRESETS = {
    "deit-tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16},
    "deit-small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16},
    "deit-base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16},
    "vit-large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16},
    "vit-huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "patch_size": 14},
}

# protobuf cannot serialize a message of 2 GiB or more, so larger models must
# keep their tensors in a separate file. The 64 MiB margin leaves room for the
# graph itself, which tensor_bytes does not count.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 64 * 2**20
MIN_DYNAMO_OPSET = 18
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}

# Number of gamma entries set to exactly 0 in the first LayerNorm of a model
# with random weights, so converters meet the gamma-with-zeros case.
ZERO_GAMMA_CHANNELS = 3

# Output channels of the two convolution blocks of TinyCNN.
TINY_CNN_CHANNELS = (16, 32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and export-relevant options of one reference model."""

    kind: str
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    # timm: use F.scaled_dot_product_attention instead of the explicit q @ k^T form.
    sdpa: bool = False
    # transformers: value of attn_implementation ("eager" or "sdpa").
    attn: str = "eager"

    @property
    def num_patches(self) -> int:
        height, width = self.img_size
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def num_tokens(self) -> int:
        """Sequence length inside the encoder: patches plus class (and distillation) tokens."""
        if self.kind == "tiny-cnn":
            return 0
        prefix_tokens = 2 if self.kind in ("timm-deit-distilled", "hf-deit-teacher") else 1
        return self.num_patches + prefix_tokens

    @property
    def input_name(self) -> str:
        return "pixel_values" if self.kind in HF_MODEL_KINDS else "input"

    def validate(self) -> None:
        """Raise ValueError for a config that the model classes would reject or build wrongly."""
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown model {self.kind!r}; expected one of {', '.join(MODEL_KINDS)}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed dim {self.embed_dim} is not divisible by {self.num_heads} heads; "
                "choose --embed-dim as a multiple of --heads"
            )
        height, width = self.img_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of patch size {self.patch_size}"
            )
        if self.attn not in ("eager", "sdpa"):
            raise ValueError(f"invalid attention implementation {self.attn!r}; expected eager or sdpa")


class LogitsOnly(nn.Module):
    """Wrap a transformers classifier so that the graph has one output, the logits.

    DeiTForImageClassificationWithTeacher also returns cls_logits and
    distillation_logits. Its logits are their mean, so both heads stay in the graph.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class TinyCNN(nn.Module):
    """Two Conv-BatchNorm-ReLU blocks, global average pooling and a linear head.

    A model with no transformer pattern, for checking that a converter leaves
    everything but the Linear head alone.
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = TINY_CNN_CHANNELS):
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, first, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
            nn.Conv2d(first, second, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(second),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(second, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))


def build_timm_model(config: ModelConfig) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    model_class = VisionTransformerDistilled if config.kind == "timm-deit-distilled" else VisionTransformer
    model = model_class(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
    )
    # timm picks fused attention from the environment at construction time
    # (timm.layers.use_fused_attn), so set it explicitly on every attention module.
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = config.sdpa
    return model


def build_hf_model(config: ModelConfig) -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

    config_class, model_class = {
        "hf-vit": (ViTConfig, ViTForImageClassification),
        "hf-deit-teacher": (DeiTConfig, DeiTForImageClassificationWithTeacher),
    }[config.kind]
    # layer_norm_eps and hidden_act keep the transformers defaults (1e-12, exact "gelu").
    hf_config = config_class(
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=int(config.embed_dim * config.mlp_ratio),
        image_size=list(config.img_size),
        patch_size=config.patch_size,
        num_labels=config.num_classes,
        attn_implementation=config.attn,
    )
    model = model_class(hf_config)
    if model.config._attn_implementation != config.attn:
        raise RuntimeError(
            f"transformers built {config.kind} with attn_implementation="
            f"{model.config._attn_implementation!r} instead of {config.attn!r}"
        )
    return model


def build_model(config: ModelConfig, seed: int = 0) -> nn.Module:
    """Build the model of config in eval mode, with the default init of its library drawn from seed.

    transformers classifiers come back wrapped in LogitsOnly.
    """
    config.validate()
    torch.manual_seed(seed)
    if config.kind in HF_MODEL_KINDS:
        model = LogitsOnly(build_hf_model(config))
    elif config.kind == "tiny-cnn":
        model = TinyCNN(num_classes=config.num_classes)
    else:
        model = build_timm_model(config)
    return model.eval()


def unwrap(model: nn.Module) -> nn.Module:
    """Return the library model inside a LogitsOnly wrapper, or model itself."""
    return model.model if isinstance(model, LogitsOnly) else model


def randomize_weights(
    model: nn.Module, seed: int = 0, zero_gamma_channels: int = ZERO_GAMMA_CHANNELS
) -> tuple[str, list[int]] | None:
    """Replace the all-equal tensors of a fresh model with small seeded random values.

    LayerNorm gamma becomes 1 + 0.1 * randn, and LayerNorm beta, Linear and Conv
    biases, class and distillation tokens and position embeddings become 0.02 * randn.
    BatchNorm statistics and affines are randomized too. The first LayerNorm then
    gets zero_gamma_channels exact zeros in gamma, spread over its channels.
    Returns that LayerNorm's module name and zeroed channels, or None if the model
    has no LayerNorm.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn_like(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)

    token_names = ("cls_token", "dist_token", "distillation_token", "pos_embed", "position_embeddings")
    layer_norms = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                layer_norms.append((name, module))
                if module.weight is not None:
                    module.weight.copy_(1.0 + 0.1 * randn_like(module.weight))
                if module.bias is not None:
                    module.bias.copy_(0.02 * randn_like(module.bias))
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                if module.bias is not None:
                    module.bias.copy_(0.02 * randn_like(module.bias))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(1.0 + 0.1 * randn_like(module.weight))
                module.bias.copy_(0.02 * randn_like(module.bias))
                module.running_mean.copy_(0.1 * randn_like(module.running_mean))
                module.running_var.copy_(1.0 + 0.1 * randn_like(module.running_var).abs())

        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] in token_names:
                parameter.copy_(0.02 * randn_like(parameter))

        if not layer_norms or zero_gamma_channels <= 0:
            return None
        name, first_norm = layer_norms[0]
        channels = first_norm.weight.shape[-1]
        zero_indices = torch.linspace(0, channels - 1, zero_gamma_channels).round().long().unique()
        first_norm.weight[zero_indices] = 0.0
    return name, zero_indices.tolist()


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict (.pth/.pt via torch.load, or .safetensors) into the library model.

    Checkpoints that nest the state dict under "model" or "state_dict" are accepted.
    Raises RuntimeError, naming the keys, when the state dict does not match the model.
    """
    # NOTE: keys must use the module names of the installed library. transformers 5
    # renamed ViT/DeiT modules (vit.encoder.layer.N.attention.attention.query became
    # vit.layers.N.attention.q_proj), and only from_pretrained converts the old names.
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    unwrap(model).load_state_dict(state_dict, strict=True)


def make_example_input(config: ModelConfig, batch: int = 1, seed: int = 0) -> torch.Tensor:
    height, width = config.img_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


def export_torchscript(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    opset: int,
    input_name: str,
    dynamic_batch: bool,
    constant_folding: bool,
) -> None:
    dynamic_axes = {input_name: {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # torch 2.14 raises a DeprecationWarning on every TorchScript export.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=["logits"],
            dynamic_axes=dynamic_axes,
            do_constant_folding=constant_folding,
        )


def export_dynamo(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    opset: int,
    input_name: str,
    dynamic_batch: bool,
) -> None:
    if opset < MIN_DYNAMO_OPSET:
        raise ValueError(
            f"opset {opset} is below {MIN_DYNAMO_OPSET}, the lowest opset the dynamo exporter "
            "writes natively; use --opset 18 or newer, or --exporter torchscript"
        )
    dynamic_shapes = None
    if dynamic_batch:
        # torch.export specializes a dimension whose example size is 1, so trace
        # a dynamic batch with an example of batch 2.
        if example.shape[0] == 1:
            example = torch.cat([example, example])
        dynamic_shapes = ({0: torch.export.Dim("batch")},)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[input_name],
        output_names=["logits"],
        dynamic_shapes=dynamic_shapes,
    )
    program.save(str(path))


def export_model_proto(
    model: nn.Module,
    config: ModelConfig,
    *,
    exporter: str = "torchscript",
    opset: int | None = None,
    batch: int = 1,
    dynamic_batch: bool = False,
    constant_folding: bool = True,
) -> onnx.ModelProto:
    """Export model to an in-memory ModelProto, with any external data loaded."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and not constant_folding:
        raise ValueError("disabling constant folding applies to the TorchScript exporter only")
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    example = make_example_input(config, batch)

    # The exporters write large models as several files, so export into a
    # scratch folder and load the result back whole.
    with tempfile.TemporaryDirectory(prefix="vit2bpu-export-") as scratch:
        path = Path(scratch) / "model.onnx"
        if exporter == "torchscript":
            export_torchscript(
                model,
                example,
                path,
                opset=opset,
                input_name=config.input_name,
                dynamic_batch=dynamic_batch,
                constant_folding=constant_folding,
            )
        else:
            export_dynamo(
                model, example, path, opset=opset, input_name=config.input_name, dynamic_batch=dynamic_batch
            )
        return onnx.load(str(path), load_external_data=True)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Return the size of all initializer data, an estimate of the serialized model size."""
    return sum(len(tensor.raw_data) for tensor in model.graph.initializer)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    external_data: bool | None = None,
    size_threshold: int = 1024,
) -> None:
    """Save model to path, with external data in one file named path + ".data".

    external_data=None chooses external data only when the tensors reach the
    2 GiB protobuf limit. Initializers of at least size_threshold bytes go to the
    data file; Constant node values always stay inline. Keep the default threshold
    for models that onnxruntime must load: onnxruntime 1.32 rejects a Reshape or
    ConstantOfShape whose shape tensor is external ("Cannot parse data from
    external tensors"). An existing .data file is removed first, because onnx
    appends to it instead of overwriting it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    if external_data is None:
        external_data = tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD_BYTES
    if data_path.exists():
        data_path.unlink()
    if external_data:
        # onnx.save_model moves the tensor data of the proto it is given into the
        # data file, so save a copy and leave the caller's proto intact.
        model_copy = onnx.ModelProto()
        model_copy.CopyFrom(model)
        onnx.save_model(
            model_copy,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=size_threshold,
            convert_attribute=False,
        )
    else:
        onnx.save_model(model, str(path))


def export_model(
    config: ModelConfig,
    output: str | os.PathLike,
    *,
    exporter: str = "torchscript",
    opset: int | None = None,
    batch: int = 1,
    dynamic_batch: bool = False,
    constant_folding: bool = True,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    external_data: bool | None = None,
) -> tuple[nn.Module, onnx.ModelProto]:
    """Build, export and save one model; return the PyTorch model and the saved ModelProto."""
    model = build_model(config, seed)
    if weights is not None:
        load_weights(model, weights)
    else:
        zeroed = randomize_weights(model, seed)
        if zeroed is not None:
            LOG.info("random weights (seed %d); gamma channels %s of LayerNorm %s are 0", seed, zeroed[1], zeroed[0])
    proto = export_model_proto(
        model,
        config,
        exporter=exporter,
        opset=opset,
        batch=batch,
        dynamic_batch=dynamic_batch,
        constant_folding=constant_folding,
    )
    save_model(proto, output, external_data)
    return model, proto


def parse_img_size(text: str) -> tuple[int, int]:
    """Parse "S" or "HxW" into (height, width)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid image size {text!r}; expected S or HxW, e.g. 224 or 64x48")
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"invalid image size {text!r}; expected S or HxW, e.g. 224 or 64x48")
    return sizes[0], sizes[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a reference Vision Transformer (random or local weights) to ONNX.",
    )
    parser.add_argument("model", choices=MODEL_KINDS, help="model family to build")
    parser.add_argument("output", type=Path, help="path of the .onnx file to write")

    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="size of a standard timm config (embed dim, depth, heads, patch size); "
        "the options below override single values",
    )
    parser.add_argument("--embed-dim", type=int, help="embedding width C (default 192)")
    parser.add_argument("--depth", type=int, help="number of encoder blocks (default 12)")
    parser.add_argument("--heads", type=int, help="number of attention heads (default 3)")
    parser.add_argument(
        "--img-size", type=parse_img_size, help="input image size in pixels, S or HxW (default 224)"
    )
    parser.add_argument("--patch-size", type=int, help="patch size in pixels (default 16)")
    parser.add_argument("--num-classes", type=int, default=1000, help="number of output classes (default 1000)")
    parser.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP hidden width / embed dim (default 4)")

    parser.add_argument("--batch", type=int, default=1, help="batch size of the exported input (default 1)")
    parser.add_argument(
        "--dynamic-batch", action="store_true", help="make the batch dimension of input and output dynamic"
    )

    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript", help="torch.onnx exporter")
    parser.add_argument(
        "--opset",
        type=int,
        help=f"ONNX opset (default {DEFAULT_OPSET['torchscript']} for torchscript, "
        f"{DEFAULT_OPSET['dynamo']} for dynamo, which needs {MIN_DYNAMO_OPSET} or newer)",
    )
    parser.add_argument(
        "--no-constant-folding",
        dest="constant_folding",
        action="store_false",
        help="export with do_constant_folding=False (TorchScript exporter only)",
    )

    parser.add_argument(
        "--sdpa", action="store_true", help="timm models: use fused scaled_dot_product_attention"
    )
    parser.add_argument(
        "--attn",
        choices=("eager", "sdpa"),
        help="transformers models: attn_implementation (default eager)",
    )

    parser.add_argument(
        "--weights",
        type=Path,
        help="local state dict (.pth, .pt or .safetensors) to load; default: random weights from --seed",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help=f"seed of the random weights (default 0); {ZERO_GAMMA_CHANNELS} gamma entries "
        "of the first LayerNorm are set to 0",
    )
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="save initializers of 1 KiB or more to OUTPUT.data (default: only for models near 2 GiB or over)",
    )
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ModelConfig:
    if args.sdpa and args.model in HF_MODEL_KINDS:
        parser.error("--sdpa applies to timm models; use --attn sdpa for transformers models")
    if args.attn is not None and args.model not in HF_MODEL_KINDS:
        parser.error("--attn applies to transformers models; use --sdpa for timm models")

    sizes = dict(PRESETS[args.preset]) if args.preset else {}
    overrides = {
        "embed_dim": args.embed_dim,
        "depth": args.depth,
        "num_heads": args.heads,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
    }
    sizes.update({key: value for key, value in overrides.items() if value is not None})
    config = ModelConfig(
        kind=args.model,
        num_classes=args.num_classes,
        mlp_ratio=args.mlp_ratio,
        sdpa=args.sdpa,
        attn=args.attn or "eager",
        **sizes,
    )
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    config = config_from_args(args, parser)
    if args.exporter == "dynamo" and not args.constant_folding:
        parser.error("--no-constant-folding applies to the TorchScript exporter only")
    if args.exporter == "dynamo" and args.opset is not None and args.opset < MIN_DYNAMO_OPSET:
        parser.error(
            f"--opset {args.opset} is below {MIN_DYNAMO_OPSET}, the lowest opset the dynamo exporter "
            "writes natively; use --opset 18 or newer, or --exporter torchscript"
        )
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"weights file not found: {args.weights}")
    if args.batch < 1:
        parser.error(f"invalid --batch {args.batch}; expected 1 or more")

    LOG.info("exporting %s with the %s exporter to %s", config, args.exporter, args.output)
    _, proto = export_model(
        config,
        args.output,
        exporter=args.exporter,
        opset=args.opset,
        batch=args.batch,
        dynamic_batch=args.dynamic_batch,
        constant_folding=args.constant_folding,
        weights=args.weights,
        seed=args.seed,
        external_data=True if args.external_data else None,
    )
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    LOG.info("wrote %s: %d nodes, opsets %s", args.output, len(proto.graph.node), opsets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
