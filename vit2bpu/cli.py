"""Command line: ``vit2bpu IN.onnx OUT.onnx [options]`` and the subcommands.

``vit2bpu IN OUT`` (or ``vit2bpu convert IN OUT``) converts; ``check``, ``hb-config``,
``calibrate``, ``quantize``, ``eval`` and ``diff`` each live in their own module,
which provides ``add_arguments(parser)`` and ``run(args) -> int``.

Exit codes (also in README.md):
0 success; 1 internal error; 2 invalid option; 3 invalid input model;
4 unsupported model content; 5 parity failure; 6 output not written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_OK, ParityError, UsageError, Vit2BpuError
from .options import ConvertOptions, parse_shape
from .passes import REWRITE_NAMES
from .targets import LAYERNORM_FORMS, SOFTMAX_FORMS, TARGETS

EXIT_CODES_HELP = """exit codes:
  0  success
  1  internal error (a bug: rerun with --debug and report the traceback)
  2  invalid option or argument
  3  invalid input model: missing, not ONNX, truncated, fails onnx.checker, unknown opset, missing external data
  4  unsupported model content: an op with no opset-11 form, an unknown domain, a dimension that cannot be pinned,
     or --strict with nodes left outside the 4-D convolution form
  5  parity check failed (nothing is written)
  6  output could not be written (no partial file is left)
"""


# subcommand -> (module, one-line description)
COMMANDS = {
    "check": ("vit2bpu.check", "predict which nodes of a model run on the BPU or the CPU of a target, and why"),
    "hb-config": ("vit2bpu.hbconfig", "write a hb_mapper makertbin YAML for a converted model"),
    "calibrate": ("vit2bpu.calibrate", "write hb_mapper calibration tensors from a folder of images"),
    "quantize": ("vit2bpu.quantize", "simulate INT8 (onnxruntime QDQ) and report agreement with FP32"),
    "eval": ("vit2bpu.evaluate", "top-1/top-5 accuracy of a model on an ImageNet-style folder"),
    "diff": ("vit2bpu.diff", "per-block parity between an original and a converted model"),
}

COMMANDS_HELP = "other commands (vit2bpu COMMAND --help):\n" + "\n".join(
    f"  {name:<10} {description}" for name, (_, description) in COMMANDS.items())


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vit2bpu",
        description="Rewrite an exported ViT/DeiT ONNX model into the opset-11, all-4-D convolution form "
                    "(1x1 Convs, channel-axis LayerNorm, 4-D attention) that BPU-style NPUs run fast, "
                    "then check numerical parity with onnxruntime.",
        epilog=COMMANDS_HELP + "\n\n" + EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="input .onnx file (any opset from 9; external data beside it is read)")
    parser.add_argument("output", help="output .onnx file, written atomically at opset 11")
    parser.add_argument("--target", choices=sorted(TARGETS), default="x5",
                        help="chip profile that picks the emitted forms: x3 (RDK X3), x5 (RDK X5, default), j5")
    parser.add_argument("--layernorm", choices=LAYERNORM_FORMS,
                        help="LayerNorm statistics: conv (1x1 Conv with weights 1/C, then Sub), center (a C->C "
                             "centring Conv, no Sub) or reducemean (ReduceMean over channels); default: the target's")
    parser.add_argument("--softmax", choices=SOFTMAX_FORMS, help="keep Softmax as one op, or decompose it "
                                                                 "(default: the target's)")
    parser.add_argument("--no-fold-affine", action="store_true",
                        help="keep LayerNorm gamma/beta as Mul/Add instead of folding them into the next 1x1 Conv")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="static shape for an input (repeatable); a symbolic batch is pinned to 1 otherwise")
    parser.add_argument("--passes", metavar="LIST",
                        help="comma-separated rewrites to run (default: all): " + ",".join(REWRITE_NAMES))
    parser.add_argument("--simplify", action="store_true", help="run onnxsim on the input first (needs onnxsim)")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 4) when any node is left outside the 4-D convolution form")
    parser.add_argument("--no-parity", action="store_true", help="skip the onnxruntime parity check")
    parser.add_argument("--parity-input", metavar="FILE",
                        help="inputs for the parity check: .npy for a single-input model, .npz keyed by input name")
    parser.add_argument("--min-cosine", type=float, metavar="X",
                        help="minimum cosine similarity per output (default 0.99999 for fp32, 0.999 for fp16)")
    parser.add_argument("--no-top1", action="store_true", help="do not fail when the top-1 class differs")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random parity inputs (default 0)")
    parser.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    parser.add_argument("--external-data", action="store_true",
                        help="write the weights to OUT.onnx.data (automatic for models over 2 GiB)")
    parser.add_argument("--force", action="store_true", help="allow the output path to be the input file")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log per-pass totals (-v) and every skipped match (-vv)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"vit2bpu {__version__}")
    return parser


def _options(args) -> ConvertOptions:
    shapes = dict(parse_shape(text) for text in args.input_shape)
    passes = None
    if args.passes is not None:
        passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    return ConvertOptions(target=args.target, layernorm=args.layernorm, softmax=args.softmax,
                          fold_norm_affine=not args.no_fold_affine, input_shapes=shapes, passes=passes,
                          simplify=args.simplify, strict=args.strict, parity=not args.no_parity,
                          parity_inputs=args.parity_input, parity_seed=args.seed, min_cosine=args.min_cosine,
                          check_top1=not args.no_top1)


def _write_report(path: str, report) -> None:
    from .model_io import write_text_atomically

    write_text_atomically(path, json.dumps(report.to_dict(), indent=2) + "\n")


def _convert(args) -> int:
    from .api import convert, save

    options = _options(args)
    report = None
    try:
        model, report = convert(args.input, options)
    except ParityError as exc:
        partial = getattr(exc, "report", None)
        if args.report and partial is not None:
            _write_report(args.report, partial)
        raise
    written = save(model, args.output, external_data=args.external_data, input_path=args.input, force=args.force,
                   keep_weights=False)
    report.output = args.output
    if args.report:
        _write_report(args.report, report)
    if not args.quiet:
        print(f"vit2bpu {__version__}: {args.input} -> {', '.join(written)}")
        for line in report.summary_lines():
            print(line)
    return EXIT_OK


def build_command_parser(name: str):
    """Return (parser, module) for a subcommand."""
    import importlib

    module_name, description = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"vit2bpu {name}", description=description, epilog=EXIT_CODES_HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v, -vv)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks and debug logs")
    return parser, module


def _configure_logging(args) -> None:
    level = logging.DEBUG if args.debug or args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] in COMMANDS:
            parser, module = build_command_parser(argv[0])
            args = parser.parse_args(argv[1:])
            _configure_logging(args)
            return module.run(args)
        if argv and argv[0] == "convert":
            argv = argv[1:]
        args = build_parser().parse_args(argv)
        _configure_logging(args)
        if Path(args.output).suffix.lower() != ".onnx" and not args.force:
            raise UsageError(f"output '{args.output}' does not end in .onnx", hint="pass --force to write it anyway")
        return _convert(args)
    except Vit2BpuError as exc:
        if debug:
            raise
        print(f"vit2bpu: error: {exc.format()}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader of our output went away (vit2bpu check ... | head); stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("vit2bpu: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else is a bug: one line unless --debug
        if debug:
            raise
        print(f"vit2bpu: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug and report the "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL
