"""``vit2bpu hb-config``: write a ``hb_mapper makertbin`` YAML for a converted model.

The keys follow D-Robotics' PTQ guide (rdk_doc ``ptq_process.md``): four groups,
``model_parameters``, ``input_parameters``, ``calibration_parameters`` and
``compiler_parameters``; values are quoted strings (lists separated by ``;``) except
where hb_mapper 1.24.3's schema wants a boolean.

Input normalisation comes from the calibration folder's ``preprocess.json``
(written by ``vit2bpu calibrate``, whose tensors are in its ``data/`` subfolder),
so the YAML and the data always agree:

- ``normalize: model``: the model reads the normalised float tensor it was
  exported with: ``input_type_train/rt: featuremap``, ``norm_type: no_preprocess``;
- ``normalize: hb_mapper``: the model reads RGB pixels and hb_mapper inserts
  ``(pixel - mean_value) * scale_value``: ``input_type_train: rgb``,
  ``norm_type: data_mean_and_scale``.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .errors import EXIT_OK, UsageError
from .model_io import default_opset, load_model, without_weights, write_text_atomically
from .preprocess import DATA_SUBDIR, SETTINGS_FILE, Preprocess
from .targets import TARGETS, get_target

# Targets whose toolchain moves a 4-D Softmax over axis 3 to the BPU when run_on_bpu names it
# (RDK X5 and RDK Ultra tables of the supported-operator list); X3 only does it for axis 1 at
# a model output.
RUN_ON_BPU_SOFTMAX = {"x5", "j5"}
RUNTIME_TYPES = ("rgb", "bgr", "nv12", "yuv444")


def _quote(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def softmax_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the Softmax nodes that run_on_bpu can move to the BPU: 4-D input, last axis."""
    ranks = {}
    inferred = onnx.shape_inference.infer_shapes(without_weights(model))
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    names = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        rank = ranks.get(node.input[0])
        if rank == 4 and axis % 4 == 3:
            names.append(node.name)
    return names


def build_config(model: onnx.ModelProto, model_path: str, target: str, calibration_dir: str | None,
                 preprocess: Preprocess, *, softmax_on_bpu: bool = True, input_type_rt: str | None = None,
                 optimize_level: str = "O3", working_dir: str = "model_output") -> str:
    """Return the YAML text for ``model``."""
    profile = get_target(target)
    if len(model.graph.input) != 1:
        raise UsageError(f"hb-config supports single-input models; this one has {len(model.graph.input)} inputs")
    opset = default_opset(model)
    if opset is not None and opset > 11:
        raise UsageError(f"the model is opset {opset}; hb_mapper reads opset 10-11", path=model_path,
                         hint="convert it with vit2bpu first")
    graph_input = model.graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d <= 0 for d in dims) or dims[0] != 1:
        raise UsageError(f"input '{graph_input.name}' has shape {dims}; hb_mapper needs a static 1xCxHxW input",
                         hint="convert with --input-shape NAME=1x3x224x224")

    if preprocess.normalize == "hb_mapper":
        runtime = input_type_rt or "rgb"
        if runtime not in RUNTIME_TYPES:
            raise UsageError(f"unknown runtime input type '{runtime}'", hint=f"choose one of: {', '.join(RUNTIME_TYPES)}")
        input_lines = [
            ("input_type_train", "rgb"),
            ("input_layout_train", "NCHW"),
            ("input_type_rt", runtime),
            ("input_layout_rt", "NHWC"),
            ("norm_type", "data_mean_and_scale"),
            ("mean_value", " ".join(f"{v:.8g}" for v in preprocess.hb_mean_value())),
            ("scale_value", " ".join(f"{v:.8g}" for v in preprocess.hb_scale_value())),
        ]
    else:
        if input_type_rt not in (None, "featuremap"):
            raise UsageError("with normalisation inside the model the input is a featuremap",
                             hint="calibrate with --normalize hb_mapper to feed images on the board")
        input_lines = [
            ("input_type_train", "featuremap"),
            ("input_layout_train", "NCHW"),
            ("input_type_rt", "featuremap"),
            ("input_layout_rt", "NCHW"),
            ("norm_type", "no_preprocess"),
        ]

    run_on_bpu = softmax_nodes(model) if softmax_on_bpu and profile.name in RUN_ON_BPU_SOFTMAX else []
    stem = Path(model_path).stem
    lines = [
        f"# hb_mapper makertbin config written by vit2bpu for {Path(model_path).name}, target {profile.name} "
        f"(march {profile.march}).",
        f"# Input normalisation: {preprocess.normalize} (preset {preprocess.preset}); calibration data in "
        f"{calibration_dir or '(not given)'}.",
        "model_parameters:",
        f"  onnx_model: {_quote(model_path)}",
        f"  march: {_quote(profile.march)}",
        f"  working_dir: {_quote(working_dir)}",
        f"  output_model_file_prefix: {_quote(stem)}",
        "input_parameters:",
        f"  input_name: {_quote(graph_input.name)}",
        f"  input_shape: {_quote('x'.join(str(d) for d in dims))}",
    ]
    lines += [f"  {key}: {_quote(value)}" for key, value in input_lines]
    lines += ["calibration_parameters:"]
    if calibration_dir:
        lines += [f"  cal_data_dir: {_quote(calibration_dir)}", f"  cal_data_type: {_quote('float32')}",
                  f"  calibration_type: {_quote('default')}"]
    else:
        # Without data hb_mapper can still check and compile the model with fixed thresholds.
        lines += [f"  calibration_type: {_quote('skip')}"]
    if run_on_bpu:
        lines.append(f"  run_on_bpu: {_quote('; '.join(run_on_bpu))}")
    lines += [
        "compiler_parameters:",
        f"  compile_mode: {_quote('latency')}",
        f"  optimize_level: {_quote(optimize_level)}",
        "  debug: False",  # a YAML boolean: hb_mapper's schema rejects the string 'False'

    ]
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="converted opset-11 .onnx file")
    parser.add_argument("--target", choices=sorted(TARGETS), default="x5", help="chip profile (default x5)")
    parser.add_argument("--calibration", metavar="DIR",
                        help="folder written by 'vit2bpu calibrate'; its preprocess.json sets the normalisation")
    parser.add_argument("--normalize", choices=("model", "hb_mapper"),
                        help="normalisation place when no --calibration folder is given (default model)")
    parser.add_argument("--input-type-rt", help="runtime input type on the board with --normalize hb_mapper: "
                                                "rgb (default), bgr, nv12 or yuv444")
    parser.add_argument("--softmax-on-cpu", action="store_true",
                        help="do not list Softmax in run_on_bpu (X5 and J5 list it by default)")
    parser.add_argument("--optimize-level", choices=("O0", "O1", "O2", "O3"), default="O3",
                        help="hbdk compiler optimisation level (default O3; O0 compiles in about a minute)")
    parser.add_argument("--working-dir", default="model_output", help="hb_mapper's output folder (default model_output)")
    parser.add_argument("-o", "--output", metavar="FILE.yaml", help="write here instead of MODEL.yaml beside the model")


def calibration_setting(folder: str | None, normalize: str | None) -> tuple[str | None, Preprocess]:
    """Return (cal_data_dir, preprocessing) for ``--calibration``.

    A folder written by ``vit2bpu calibrate`` contains ``preprocess.json`` and the tensors in
    ``data/``; any other folder is taken as raw tensors, normalised as ``--normalize`` says.
    """
    if folder is None:
        return None, Preprocess(normalize=normalize or "model")
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"calibration folder '{folder}' does not exist")
    if not (root / SETTINGS_FILE).exists():
        return str(root), Preprocess(normalize=normalize or "model")
    preprocess = Preprocess.load(root)
    if normalize and normalize != preprocess.normalize:
        raise UsageError(f"--normalize {normalize} contradicts {root / SETTINGS_FILE} (normalize: "
                         f"{preprocess.normalize})", hint="calibrate again with the setting you want")
    return str(root / DATA_SUBDIR), preprocess


def run(args) -> int:
    model = load_model(args.model)
    calibration_dir, preprocess = calibration_setting(args.calibration, args.normalize)
    text = build_config(model, args.model, args.target, calibration_dir, preprocess,
                        softmax_on_bpu=not args.softmax_on_cpu, input_type_rt=args.input_type_rt,
                        optimize_level=args.optimize_level, working_dir=args.working_dir)
    output = args.output or str(Path(args.model).with_suffix(".yaml"))
    write_text_atomically(output, text)
    print(f"wrote {output} (target {args.target}, norm_type "
          f"{'data_mean_and_scale' if preprocess.normalize == 'hb_mapper' else 'no_preprocess'}); "
          f"run: hb_mapper makertbin --config {output} --model-type onnx")
    return EXIT_OK
