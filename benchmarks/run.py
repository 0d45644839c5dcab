#!/usr/bin/env python3
"""Benchmark vit2bpu: conversion cost, scaling, models over 2 GiB, runtime latency, parity cost and a profile.

    python benchmarks/run.py --export-python /path/to/python-with-torch --output /tmp/bench

Every figure is a median over repetitions. Commands that are compared run
interleaved (A, B, A, B, ... with a rotating start), and ratios are taken per
round before the median, which reduces the effect of load from other jobs on a
shared machine. Times and peak memory are those of whole processes (see
measure.py). Models are timm DeiT/ViT exports with random weights from
models/export.py, cached in --model-cache so reruns do not export again.

Each section writes OUTPUT/SECTION.json. results.md, results.json and samples.csv
are then rebuilt from every section file in OUTPUT, so a later run of one section
(for example --sections huge) adds to the earlier results.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from measure import Command, Sample, paired_ratio, run_interleaved, run_measured, samples_to_dicts, summarize
from render import SECTION_ORDER, render_markdown

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPOSITORY = BENCHMARKS_DIR.parent
EXPORT_SCRIPT = REPOSITORY / "models" / "export.py"
LOAD_SAVE_SCRIPT = BENCHMARKS_DIR / "load_save.py"
LATENCY_SCRIPT = BENCHMARKS_DIR / "latency.py"
PROFILE_SCRIPT = BENCHMARKS_DIR / "profile_convert.py"

DEFAULT_SECTIONS = ("conversion", "scaling", "runtime", "parity", "profile")
# --skip also takes these names, which drop one baseline or one model variant inside a section.
SKIPPABLE_PARTS = ("onnxsim", "int8")
CALIBRATION_SAMPLES = 8


class BenchmarkError(Exception):
    """Raised when a step that a section needs fails. The section records the message, and the run goes on."""


@dataclass(frozen=True)
class ModelSpec:
    """A timm export of models/export.py: a preset, optionally with another depth."""

    name: str
    preset: str
    embed_dim: int
    depth: int
    depth_override: bool = False
    external_data: bool = False

    def stem(self, opset: int) -> str:
        return f"{self.name}-op{opset}"


# Embedding width and depth of the presets, as in PRESETS of models/export.py.
MODELS = {spec.name: spec for spec in (
    ModelSpec("deit-tiny", "deit-tiny", 192, 12),
    ModelSpec("deit-small", "deit-small", 384, 12),
    ModelSpec("deit-base", "deit-base", 768, 12),
    ModelSpec("vit-large", "vit-large", 1024, 24),
    ModelSpec("deit-small-depth6", "deit-small", 384, 6, depth_override=True),
    ModelSpec("deit-small-depth24", "deit-small", 384, 24, depth_override=True),
    ModelSpec("vit-huge", "vit-huge", 1280, 32, external_data=True),
)}
SCALING_DEPTH = ("deit-small-depth6", "deit-small", "deit-small-depth24")
SCALING_WIDTH = ("deit-tiny", "deit-small", "deit-base")
HUGE_MODEL = "vit-huge"


# ---------------------------------------------------------------- command line


def comma_list(choices):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(unknown)}. Choose from: {', '.join(choices)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    sections = DEFAULT_SECTIONS + ("huge",)
    small_models = [name for name in MODELS if name != HUGE_MODEL]
    parser = argparse.ArgumentParser(
        description="Benchmark vit2bpu against onnx load+save and onnxsim, and measure onnxruntime latency.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)

    parser.add_argument("--output", type=Path, default=BENCHMARKS_DIR / "results",
                        help="folder for the results (default: benchmarks/results, which git ignores)")
    parser.add_argument("--model-cache", type=Path,
                        help="folder of exported models, reused across runs (default: OUTPUT/models)")

    parser.add_argument("--sections", type=comma_list(sections), default=list(DEFAULT_SECTIONS),
                        help=f"sections to run, comma-separated (default: {','.join(DEFAULT_SECTIONS)}; "
                             "'huge' exports and converts ViT-huge with external data, about 2.5 GB of weights)")
    parser.add_argument("--huge", action="store_true", help="add the 'huge' section to --sections")
    parser.add_argument("--skip", type=comma_list(sections + SKIPPABLE_PARTS), default=[],
                        help="sections to leave out, and 'onnxsim' (the onnxsim baseline) or 'int8' (the quantized "
                             "graph in the runtime section)")

    parser.add_argument("--models", type=comma_list(small_models), default=["deit-tiny", "deit-small", "deit-base",
                                                                             "vit-large"],
                        help="models of the conversion section (default: deit-tiny,deit-small,deit-base,vit-large)")
    parser.add_argument("--runtime-models", type=comma_list(small_models), default=["deit-tiny", "deit-small"],
                        help="models of the runtime section (default: deit-tiny,deit-small)")
    parser.add_argument("--parity-models", type=comma_list(small_models),
                        default=["deit-tiny", "deit-small", "deit-base"],
                        help="models of the parity section (default: deit-tiny,deit-small,deit-base)")
    parser.add_argument("--profile-model", choices=small_models, default="deit-base",
                        help="model of the profile section (default: deit-base)")

    parser.add_argument("--repetitions", type=int, default=5,
                        help="rounds of each interleaved comparison (default 5)")
    parser.add_argument("--huge-repetitions", type=int, default=3, help="rounds of the huge section (default 3)")
    parser.add_argument("--latency-runs", type=int, default=50,
                        help="timed onnxruntime runs per model per round (default 50)")
    parser.add_argument("--latency-warmup", type=int, default=10,
                        help="untimed onnxruntime runs per model per round (default 10)")
    parser.add_argument("--latency-rounds", type=int, default=5, help="interleaved latency rounds (default 5)")

    parser.add_argument("--opset", type=int, default=14, help="opset of the exports (default 14)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter with vit2bpu, onnx, onnxruntime and onnxsim (default: this one)")
    parser.add_argument("--source", type=Path,
                        help="folder that contains the vit2bpu package to measure, such as an extract of "
                             "'git archive HEAD vit2bpu'; it goes first on PYTHONPATH of every command, so a "
                             "checkout that changes during the run does not change the results (default: the "
                             "vit2bpu that --python imports)")
    parser.add_argument("--export-python", default=os.environ.get("VIT2BPU_EXPORT_PYTHON", sys.executable),
                        help="interpreter with torch and timm for models/export.py, needed only for models not "
                             "yet in the cache (default: $VIT2BPU_EXPORT_PYTHON, else this one)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds after which one measured command is killed (default 3600)")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild results.md, results.json and samples.csv from the section files in OUTPUT")
    return parser


@dataclass
class Context:
    """Settings and folders shared by the sections of one run."""

    args: argparse.Namespace
    output: Path
    cache: Path
    scratch: Path
    logs: Path

    @property
    def python(self) -> str:
        return self.args.python

    def progress(self, message: str) -> None:
        print(message, flush=True)


# ---------------------------------------------------------------- models and facts


def model_path(ctx: Context, spec: ModelSpec) -> Path:
    stem = spec.stem(ctx.args.opset)
    if spec.external_data:
        return ctx.cache / stem / f"{stem}.onnx"
    return ctx.cache / f"{stem}.onnx"


def ensure_model(ctx: Context, spec: ModelSpec) -> Path:
    """Return the cached export of ``spec``, exporting it first when the cache does not contain it.

    The export goes to a staging folder that is renamed into place only after it
    succeeds, so an interrupted export is never mistaken for a cached one.
    """
    path = model_path(ctx, spec)
    if path.exists():
        return path
    stem = spec.stem(ctx.args.opset)
    staging = ctx.cache / f".{stem}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    argv = [ctx.args.export_python, str(EXPORT_SCRIPT), "timm-deit", "--preset", spec.preset,
            "--opset", str(ctx.args.opset)]
    if spec.depth_override:
        argv += ["--depth", str(spec.depth)]
    if spec.external_data:
        argv.append("--external-data")
    argv.append(str(staging / f"{stem}.onnx"))
    ctx.progress(f"exporting {spec.name}: {' '.join(argv)}")
    log_path = ctx.cache / f"{stem}.export.log"
    seconds, rss_mib, exit_code, timed_out = run_measured(
        argv, timeout=ctx.args.timeout, log_path=log_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=REPOSITORY)
    if exit_code != 0 or timed_out:
        raise BenchmarkError(f"export of {spec.name} failed (exit code {exit_code}); see {log_path}")
    record = {"command": argv, "seconds": seconds, "max_rss_mib": rss_mib}
    (staging / "export.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if spec.external_data:
        staging.rename(path.parent)
    else:
        (staging / f"{stem}.onnx").rename(path)
        (staging / "export.json").rename(ctx.cache / f"{stem}.export.json")
        shutil.rmtree(staging)
    ctx.progress(f"exported {spec.name} in {seconds:.0f} s, peak {rss_mib:.0f} MiB")
    return path


def export_record(ctx: Context, spec: ModelSpec) -> dict | None:
    stem = spec.stem(ctx.args.opset)
    candidates = [ctx.cache / stem / "export.json"] if spec.external_data else [ctx.cache / f"{stem}.export.json"]
    for candidate in candidates:
        if candidate.exists():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return None


FACTS_SCRIPT = """
import json, os, sys
import onnx
path = sys.argv[1]
model = onnx.load(path, load_external_data=False)
params = 0
for tensor in model.graph.initializer:
    count = 1
    for dim in tensor.dims:
        count *= dim
    params += count
initializers = {t.name for t in model.graph.initializer}
inputs = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
          for vi in model.graph.input if vi.name not in initializers}
folder = os.path.dirname(path)
files = [path] + sorted({os.path.join(folder, e.value) for t in model.graph.initializer
                         for e in t.external_data if e.key == "location"})
print(json.dumps({"parameters": params, "nodes": len(model.graph.node), "inputs": inputs,
                  "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                  "file_bytes": sum(os.path.getsize(f) for f in files)}))
"""


def model_facts(ctx: Context, path: Path) -> dict:
    """Return the parameter count, node count, input shapes, opset and size on disk, read without the weights."""
    completed = subprocess.run([ctx.python, "-c", FACTS_SCRIPT, str(path)], capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no error output"])[-1]
        raise BenchmarkError(f"failed to read {path}: {last_line}")
    return json.loads(completed.stdout)


def warm_page_cache(path: Path) -> None:
    """Read the model files once, so the first measured command does not also pay for the disk."""
    for candidate in (path, path.with_name(path.name + ".data")):
        if candidate.exists():
            with open(candidate, "rb") as handle:
                while handle.read(64 * 2**20):
                    pass


def display(argv: list[str], ctx: Context, replacements: dict[str, str]) -> str:
    """Write ``argv`` for the report: 'python' for the interpreters and short names for long paths."""
    words = []
    for word in argv:
        if word in (ctx.args.python, ctx.args.export_python):
            word = "python"
        for long, short in replacements.items():
            word = word.replace(long, short)
        words.append(word)
    return shlex.join(words)


def relative_to_repository(path: Path) -> str:
    return str(path.relative_to(REPOSITORY)) if path.is_relative_to(REPOSITORY) else str(path)


# ---------------------------------------------------------------- machine facts


VERSIONS_SCRIPT = """
import importlib, json, sys
versions = {"python": sys.version.split()[0]}
for name in ("vit2bpu", "onnx", "onnxruntime", "onnxsim", "onnx_graphsurgeon", "numpy", "google.protobuf",
             "torch", "timm"):
    try:
        versions[name] = str(importlib.import_module(name).__version__)
    except Exception:
        pass
try:
    import vit2bpu
    versions["vit2bpu_path"] = vit2bpu.__file__.rsplit("/", 1)[0]
except Exception:
    pass
print(json.dumps(versions))
"""


def interpreter_versions(python: str) -> dict:
    completed = subprocess.run([python, "-c", VERSIONS_SCRIPT], capture_output=True, text=True, check=False)
    return json.loads(completed.stdout) if completed.returncode == 0 else {"error": completed.stderr.strip()[-300:]}


def read_proc_field(path: str, key: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def git_state() -> dict:
    def git(*words: str) -> str:
        completed = subprocess.run(["git", "-C", str(REPOSITORY), *words], capture_output=True, text=True,
                                   check=False)
        return completed.stdout.rstrip("\n")

    # Porcelain lines are "XY PATH", and X is a space for a change that is not staged.
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(),
            "changed_outside_benchmarks": [p for p in changed if not p.startswith("benchmarks/")]}


def source_digest(folder: str | None) -> str | None:
    """Return the SHA-256 of the names and contents of a package's .py files, to identify the code measured."""
    if not folder or not Path(folder).is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def machine_facts(ctx: Context) -> dict:
    memory_kib = read_proc_field("/proc/meminfo", "MemTotal")
    facts = {
        "cpu_model": read_proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(int(memory_kib.split()[0]) / 2**20, 1) if memory_kib else None,
        "platform": platform.platform(),
        "versions": interpreter_versions(ctx.python),
        "git": git_state(),
        "source": str(ctx.args.source) if ctx.args.source else None,
    }
    facts["vit2bpu_sha256"] = source_digest(facts["versions"].get("vit2bpu_path"))
    if ctx.args.export_python != ctx.python:
        facts["export_versions"] = interpreter_versions(ctx.args.export_python)
    return facts


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------- sections


def convert_argv(ctx: Context, input_model: Path, target: Path, *extra: str) -> list[str]:
    return [ctx.python, "-m", "vit2bpu", str(input_model), str(target), *extra]


def section_conversion(ctx: Context) -> dict:
    """Measure time and peak memory of the conversion against onnx load+save and onnxsim, per model."""
    # Start-up and imports alone, so the ratios can also be given without them.
    startup_runs = [Command("vit2bpu start-up", [ctx.python, "-m", "vit2bpu", "--version"]),
                    Command("onnx import", [ctx.python, "-c", "import onnx"])]
    ctx.progress(f"conversion: start-up, {ctx.args.repetitions} rounds")
    startup = run_interleaved(startup_runs, ctx.args.repetitions, timeout=ctx.args.timeout,
                              log_dir=ctx.logs / "conversion" / "startup", progress=ctx.progress)
    startup_seconds = {label: summarize(runs_)["seconds_median"] for label, runs_ in startup.items()}
    rows, samples, commands = [], {"(start-up)": samples_to_dicts(startup)}, {}

    for name in ctx.args.models:
        spec = MODELS[name]
        input_model = ensure_model(ctx, spec)
        facts = model_facts(ctx, input_model)
        folder = ctx.scratch / "conversion" / name
        folder.mkdir(parents=True, exist_ok=True)
        runs = [
            Command("vit2bpu", convert_argv(ctx, input_model, folder / "vit2bpu.onnx", "--no-parity", "-q"),
                    [folder / "vit2bpu.onnx"]),
            Command("load+save", [ctx.python, str(LOAD_SAVE_SCRIPT), str(input_model), str(folder / "floor.onnx")],
                    [folder / "floor.onnx"]),
        ]
        if "onnxsim" not in ctx.args.skip:
            simplified = folder / "onnxsim.onnx"
            runs.append(Command("onnxsim", [ctx.python, "-m", "onnxsim", str(input_model), str(simplified)],
                                [simplified]))
        replacements = {str(input_model): "IN", str(folder) + "/": "", str(BENCHMARKS_DIR) + "/": "benchmarks/"}
        commands = {c.label: display(c.argv, ctx, replacements) for c in runs}
        ctx.progress(f"conversion: {name}, {ctx.args.repetitions} rounds of {', '.join(commands)}")
        warm_page_cache(input_model)
        measured = run_interleaved(runs, ctx.args.repetitions, timeout=ctx.args.timeout,
                                   log_dir=ctx.logs / "conversion" / name, progress=ctx.progress)
        samples[name] = samples_to_dicts(measured)
        row = {"model": name, "parameters": facts["parameters"], "file_bytes": facts["file_bytes"],
               "nodes": facts["nodes"], "export": export_record(ctx, spec),
               "summary": {label: summarize(runs_) for label, runs_ in measured.items()}, "ratios": {}}
        for baseline in [c.label for c in runs[1:]]:
            row["ratios"][f"vit2bpu/{baseline}"] = {
                "seconds": paired_ratio(measured["vit2bpu"], measured[baseline], "seconds"),
                "max_rss_mib": paired_ratio(measured["vit2bpu"], measured[baseline], "max_rss_mib"),
            }
        row["time_ratio_after_startup"] = ratio_after_startup(row["summary"], startup_seconds)
        rows.append(row)

    commands.update({label: display(c.argv, ctx, {}) for label, c in zip(startup, startup_runs)})
    return {"commands": commands, "rows": rows, "samples": samples, "startup_seconds": startup_seconds}


def ratio_after_startup(summary: dict, startup_seconds: dict) -> float | None:
    """Return (vit2bpu - its start-up) / (load+save - onnx import), from the medians."""
    converted = summary["vit2bpu"]["seconds_median"]
    floor = summary["load+save"]["seconds_median"]
    own, onnx_import = startup_seconds.get("vit2bpu start-up"), startup_seconds.get("onnx import")
    if None in (converted, floor, own, onnx_import) or floor <= onnx_import:
        return None
    return (converted - own) / (floor - onnx_import)


def report_seconds(report_path: Path):
    """Return a callable that reads the in-process seconds from a vit2bpu --report file."""
    def inspect() -> dict:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        return {"seconds": report.get("seconds", {}),
                "pass_seconds": {p["name"]: p["seconds"] for p in report.get("passes", [])}}
    return inspect


def section_scaling(ctx: Context) -> dict:
    """Measure conversion time against depth at DeiT-small width and against width at depth 12."""
    names = list(dict.fromkeys(SCALING_DEPTH + SCALING_WIDTH))
    folder = ctx.scratch / "scaling"
    folder.mkdir(parents=True, exist_ok=True)
    runs = [Command("startup", [ctx.python, "-m", "vit2bpu", "--version"])]
    facts = {}
    for name in names:
        input_model = ensure_model(ctx, MODELS[name])
        facts[name] = model_facts(ctx, input_model)
        warm_page_cache(input_model)
        target, report = folder / f"{name}.onnx", folder / f"{name}.report.json"
        runs.append(Command(name, convert_argv(ctx, input_model, target, "--no-parity", "-q", "--report", str(report)),
                            [target, report], inspect=report_seconds(report)))

    ctx.progress(f"scaling: {ctx.args.repetitions} rounds of {', '.join(c.label for c in runs)}")
    measured = run_interleaved(runs, ctx.args.repetitions, timeout=ctx.args.timeout, log_dir=ctx.logs / "scaling",
                               progress=ctx.progress)
    startup = summarize(measured["startup"])["seconds_median"]
    rows = [scaling_row(MODELS[name], measured[name], facts[name]) for name in names]

    by_name = {row["model"]: row for row in rows}
    analysis = {
        "startup_seconds": startup,
        "depth": scaling_fit([by_name[n] for n in SCALING_DEPTH], "depth", startup),
        "width": scaling_fit([by_name[n] for n in SCALING_WIDTH], "parameters", startup),
    }
    commands = {"startup": "python -m vit2bpu --version",
                "convert": "python -m vit2bpu IN OUT --no-parity -q --report OUT.json"}

    samples = {label: {"startup" if label == "startup" else "vit2bpu": runs_}
               for label, runs_ in samples_to_dicts(measured).items()}
    return {"commands": commands, "rows": rows, "analysis": analysis, "samples": samples}


def scaling_row(spec: ModelSpec, runs: list[Sample], facts: dict) -> dict:
    """Summarize the runs of one model, with the medians of the in-process and per-pass seconds."""
    good = [s for s in runs if s.ok]
    in_process = [s.details["seconds"].get("convert") for s in good if s.details.get("seconds")]
    pass_seconds: dict[str, list[float]] = {}
    for sample in good:
        for pass_name, seconds in sample.details.get("pass_seconds", {}).items():
            pass_seconds.setdefault(pass_name, []).append(seconds)
    rounds = {s.repetition: {"whole_process": s.seconds, "in_process": s.details.get("seconds", {}).get("convert")}
              for s in good}
    return {"model": spec.name, "depth": spec.depth, "embed_dim": spec.embed_dim,
            "parameters": facts["parameters"], "nodes": facts["nodes"], "summary": summarize(runs), "rounds": rounds,
            "convert_seconds_median": statistics.median(in_process) if in_process else None,
            "pass_seconds_median": {name: statistics.median(values) for name, values in pass_seconds.items()}}


# The marginal cost of the last step may differ from the first by this factor and still count as linear.
# The factor is this script's choice, not a standard.
LINEAR_TOLERANCE = 1.25


def marginal_costs(xs: list[float], ys: list[float]) -> list[float]:
    return [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]


def linearity_verdict(step_ratio: float | None) -> str:
    if step_ratio is None:
        return "undetermined: the first step did not take longer"
    if step_ratio > LINEAR_TOLERANCE:
        return "faster than linear"
    if step_ratio < 1 / LINEAR_TOLERANCE:
        return "slower than linear"
    return "linear"


def scaling_fit(rows: list[dict], x_field: str, startup: float | None) -> dict:
    """Fit time = a + b * x by least squares and compare the marginal cost of the last step with the first.

    ``x`` is the depth or the parameter count. The time is the whole-process median,
    and also the in-process ``convert`` seconds of the --report file, which leave out
    interpreter start-up and writing the output. The step ratio is computed in each
    round, from runs made seconds apart, and its median decides the verdict.
    """
    result = {"x": x_field, "points": [], "fits": {}}
    xs = [float(row[x_field]) for row in rows]
    for time_field in ("whole_process", "in_process"):
        ys = [row["summary"]["seconds_median"] if time_field == "whole_process" else row["convert_seconds_median"]
              for row in rows]
        if len(rows) < 3 or any(y is None for y in ys):
            result["fits"][time_field] = {"error": "fewer than 3 measured points"}
            continue
        slope, intercept = statistics.linear_regression(xs, ys)
        mean = statistics.fmean(ys)
        residual = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
        total = sum((y - mean) ** 2 for y in ys)

        round_ratios = []
        for repetition in sorted(set.intersection(*(set(row["rounds"]) for row in rows))):
            round_ys = [row["rounds"][repetition][time_field] for row in rows]
            if any(y is None for y in round_ys):
                continue
            steps = marginal_costs(xs, round_ys)
            if steps[0] > 0:
                round_ratios.append(steps[-1] / steps[0])
        step_ratio = statistics.median(round_ratios) if round_ratios else None
        result["fits"][time_field] = {
            "slope_seconds_per_x": slope, "intercept_seconds": intercept,
            "r_squared": 1 - residual / total if total > 0 else None,
            "marginal_seconds_per_x": marginal_costs(xs, ys),
            "last_to_first_step_ratio": {"median": step_ratio, "min": min(round_ratios, default=None),
                                         "max": max(round_ratios, default=None), "rounds": len(round_ratios)},
            "verdict": linearity_verdict(step_ratio),
        }

    for row in rows:
        whole = row["summary"]["seconds_median"]
        point = {"model": row["model"], "x": row[x_field], "whole_process_seconds": whole,
                 "in_process_seconds": row["convert_seconds_median"]}
        if whole is not None and startup is not None:
            point["seconds_after_startup_per_x"] = (whole - startup) / row[x_field]
        if row["convert_seconds_median"] is not None:
            point["in_process_seconds_per_x"] = row["convert_seconds_median"] / row[x_field]
        result["points"].append(point)
    return result


def section_huge(ctx: Context) -> dict:
    """Measure ViT-huge with external data: conversion against load+save, both writing external data."""
    spec = MODELS[HUGE_MODEL]
    input_model = ensure_model(ctx, spec)
    facts = model_facts(ctx, input_model)
    folder = ctx.scratch / "huge"
    folder.mkdir(parents=True, exist_ok=True)
    runs = [
        Command("vit2bpu", convert_argv(ctx, input_model, folder / "vit2bpu.onnx", "--external-data", "--no-parity",
                                        "-q"), [folder / "vit2bpu.onnx"]),
        Command("load+save", [ctx.python, str(LOAD_SAVE_SCRIPT), str(input_model), str(folder / "floor.onnx"),
                              "--external-data"], [folder / "floor.onnx"]),
    ]
    replacements = {str(input_model): "IN", str(folder) + "/": "", str(BENCHMARKS_DIR) + "/": "benchmarks/"}
    commands = {c.label: display(c.argv, ctx, replacements) for c in runs}
    ctx.progress(f"huge: {ctx.args.huge_repetitions} rounds of {', '.join(commands)}")
    warm_page_cache(input_model)
    measured = run_interleaved(runs, ctx.args.huge_repetitions, timeout=ctx.args.timeout, log_dir=ctx.logs / "huge",
                               progress=ctx.progress)
    row = {"model": spec.name, "parameters": facts["parameters"], "file_bytes": facts["file_bytes"],
           "nodes": facts["nodes"], "export": export_record(ctx, spec),
           "summary": {label: summarize(runs_) for label, runs_ in measured.items()},
           "ratios": {"vit2bpu/load+save": {
               "seconds": paired_ratio(measured["vit2bpu"], measured["load+save"], "seconds"),
               "max_rss_mib": paired_ratio(measured["vit2bpu"], measured["load+save"], "max_rss_mib")}}}
    return {"commands": commands, "rows": [row], "samples": {spec.name: samples_to_dicts(measured)}}


def write_calibration(folder: Path, shape: list[int], count: int) -> Path:
    """Write ``count`` standard-normal float32 samples as headerless .bin files and return their folder."""
    data = folder / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        rng.standard_normal(shape).astype(np.float32).tofile(data / f"{index:04d}.bin")
    return data


def run_step(ctx: Context, argv: list[str], log_path: Path, description: str) -> dict:
    """Run one unrepeated preparation command and return its time, memory and any error."""
    seconds, rss_mib, exit_code, timed_out = run_measured(argv, timeout=ctx.args.timeout, log_path=log_path)
    step = {"seconds": seconds, "max_rss_mib": rss_mib, "exit_code": exit_code}
    if exit_code != 0 or timed_out:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        step["error"] = f"{description} failed (exit code {exit_code}): {' | '.join(tail)}"
        ctx.progress(f"  {step['error']}")
    return step


def section_runtime(ctx: Context) -> dict:
    """Measure onnxruntime CPU latency of the original, converted and INT8 QDQ graphs, one and default threads."""
    rows = []
    for name in ctx.args.runtime_models:
        input_model = ensure_model(ctx, MODELS[name])
        folder = ctx.scratch / "runtime" / name
        folder.mkdir(parents=True, exist_ok=True)
        logs = ctx.logs / "runtime" / name
        converted, int8 = folder / "converted.onnx", folder / "int8.onnx"
        row = {"model": name, "steps": {}, "latency": {}}
        ctx.progress(f"runtime: {name}: converting and quantizing")
        row["steps"]["convert"] = run_step(ctx, convert_argv(ctx, input_model, converted, "-q"), logs / "convert.log",
                                           "conversion")
        if "error" in row["steps"]["convert"]:
            rows.append(row)
            continue
        models = [f"original={input_model}", f"converted={converted}"]
        if "int8" not in ctx.args.skip:
            shape = next(iter(model_facts(ctx, converted)["inputs"].values()))
            calibration = write_calibration(folder / "calibration", shape, CALIBRATION_SAMPLES)
            quantize_report = folder / "quantize.json"
            argv = [ctx.python, "-m", "vit2bpu", "quantize", str(converted), str(int8), "--calibration",
                    str(calibration), "--report", str(quantize_report), "-q"]
            row["steps"]["quantize"] = run_step(ctx, argv, logs / "quantize.log", "vit2bpu quantize")
            if "error" not in row["steps"]["quantize"]:
                models.append(f"int8={int8}")
                report = json.loads(quantize_report.read_text(encoding="utf-8"))
                row["quantize"] = {"qdq_nodes": report.get("qdq_nodes"), "outputs": report.get("outputs"),
                                   "calibration_samples": report.get("calibration_samples")}
        for threads in (1, 0):
            result_path = folder / f"latency-threads{threads}.json"
            argv = [ctx.python, str(LATENCY_SCRIPT), "--threads", str(threads), "--runs", str(ctx.args.latency_runs),
                    "--warmup", str(ctx.args.latency_warmup), "--rounds", str(ctx.args.latency_rounds),
                    "--json", str(result_path), *models]
            ctx.progress(f"runtime: {name}: latency with threads={threads or 'default'}")
            step = run_step(ctx, argv, logs / f"latency-threads{threads}.log", "latency measurement")
            if "error" in step:
                row["latency"][str(threads)] = {"error": step["error"]}
                continue
            row["latency"][str(threads)] = latency_summary(json.loads(result_path.read_text(encoding="utf-8")))
        rows.append(row)
    commands = {
        "convert": "python -m vit2bpu IN converted.onnx -q",
        "quantize": f"python -m vit2bpu quantize converted.onnx int8.onnx --calibration CAL/data "
                    f"--report quantize.json -q  (CAL/data: {CALIBRATION_SAMPLES} standard-normal float32 .bin files)",
        "latency": f"python benchmarks/latency.py --threads T --runs {ctx.args.latency_runs} "
                   f"--warmup {ctx.args.latency_warmup} --rounds {ctx.args.latency_rounds} --json OUT.json "
                   "original=IN converted=converted.onnx int8=int8.onnx",
    }
    return {"commands": commands, "rows": rows}


def latency_summary(result: dict) -> dict:
    """Return the median latency per model over the rounds, and the per-round ratios to the original."""
    rounds = result["round_median_ms"]
    summary = {"median_ms": {label: statistics.median(values) for label, values in rounds.items()},
               "ratio_to_original": {}, "output_cosine_vs_original": result["output_cosine_vs_first"],
               "round_median_ms": rounds}
    for label, values in rounds.items():
        if label == "original":
            continue
        ratios = [a / b for a, b in zip(values, rounds["original"])]
        summary["ratio_to_original"][label] = {"median": statistics.median(ratios), "min": min(ratios),
                                               "max": max(ratios)}
    return summary


def section_parity(ctx: Context) -> dict:
    """Measure the share of the command that the onnxruntime parity check takes."""
    rows, samples = [], {}
    for name in ctx.args.parity_models:
        input_model = ensure_model(ctx, MODELS[name])
        folder = ctx.scratch / "parity" / name
        folder.mkdir(parents=True, exist_ok=True)
        runs = []
        for label, extra in (("with parity", ()), ("no parity", ("--no-parity",))):
            slug = label.replace(" ", "-")
            target, report = folder / f"{slug}.onnx", folder / f"{slug}.report.json"
            runs.append(Command(label, convert_argv(ctx, input_model, target, *extra, "-q", "--report", str(report)),
                                [target, report], inspect=report_seconds(report)))
        ctx.progress(f"parity: {name}, {ctx.args.repetitions} rounds")
        warm_page_cache(input_model)
        measured = run_interleaved(runs, ctx.args.repetitions, timeout=ctx.args.timeout,
                                   log_dir=ctx.logs / "parity" / name, progress=ctx.progress)
        samples[name] = samples_to_dicts(measured)
        with_parity, without = measured["with parity"], measured["no parity"]
        by_round = {s.repetition: s for s in without if s.ok}
        shares = [(s.seconds - by_round[s.repetition].seconds) / s.seconds
                  for s in with_parity if s.ok and s.repetition in by_round]
        in_process = [s.details["seconds"]["parity"] for s in with_parity
                      if s.ok and "parity" in s.details.get("seconds", {})]
        rows.append({"model": name, "summary": {label: summarize(runs_) for label, runs_ in measured.items()},
                     "share_of_command": {"median": statistics.median(shares) if shares else None,
                                          "min": min(shares) if shares else None,
                                          "max": max(shares) if shares else None},
                     "in_process_parity_seconds_median": statistics.median(in_process) if in_process else None,
                     "ratio": paired_ratio(with_parity, without, "seconds"),
                     "memory_ratio": paired_ratio(with_parity, without, "max_rss_mib")})
    commands = {"with parity": "python -m vit2bpu IN OUT -q --report OUT.json",
                "no parity": "python -m vit2bpu IN OUT --no-parity -q --report OUT.json"}
    return {"commands": commands, "rows": rows, "samples": samples}


def section_profile(ctx: Context) -> dict:
    """Profile one vit2bpu.convert call with cProfile."""
    name = ctx.args.profile_model
    input_model = ensure_model(ctx, MODELS[name])
    folder = ctx.output / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    stats, result = folder / f"{name}.prof", folder / f"{name}.json"
    argv = [ctx.python, str(PROFILE_SCRIPT), str(input_model), "--stats", str(stats), "--json", str(result)]
    ctx.progress(f"profile: {name}")
    warm_page_cache(input_model)
    step = run_step(ctx, argv, ctx.logs / "profile.log", "profiling")
    if "error" in step:
        raise BenchmarkError(step["error"])
    return {"commands": {"profile": f"python benchmarks/profile_convert.py IN --stats {relative_to_repository(stats)} "
                                    f"--json {relative_to_repository(result)}"},
            "model": name, "step": step, "profile": json.loads(result.read_text(encoding="utf-8"))}


SECTIONS = {"conversion": section_conversion, "scaling": section_scaling, "huge": section_huge,
            "runtime": section_runtime, "parity": section_parity, "profile": section_profile}


# ---------------------------------------------------------------- results files


def run_section(ctx: Context, name: str, machine: dict) -> None:
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    record = {"section": name, "started": started.isoformat(timespec="seconds"), "machine": machine,
              "repetitions": ctx.args.huge_repetitions if name == "huge" else ctx.args.repetitions,
              "load_average_before": load_before}
    try:
        record.update(SECTIONS[name](ctx))
    except BenchmarkError as exc:
        record["error"] = str(exc)
        ctx.progress(f"{name}: {exc}")
    except Exception as exc:  # a bug in this script: keep the other sections' results
        record["error"] = f"{exc.__class__.__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        ctx.progress(f"{name}: internal error\n{record['traceback']}")
    finished = datetime.datetime.now().astimezone()
    record["finished"] = finished.isoformat(timespec="seconds")
    record["minutes"] = round((finished - started).total_seconds() / 60, 1)
    record["load_average_after"] = load_average()
    (ctx.output / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def load_sections(output: Path) -> dict[str, dict]:
    sections = {}
    for name in SECTION_ORDER:
        path = output / f"{name}.json"
        if path.exists():
            sections[name] = json.loads(path.read_text(encoding="utf-8"))
    return sections


def write_samples_csv(sections: dict[str, dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["section", "model", "command", "repetition", "seconds", "max_rss_mib", "exit_code",
                         "error"])
        for section, record in sections.items():
            for model, by_label in record.get("samples", {}).items():
                for label, runs in by_label.items():
                    for sample in runs:
                        writer.writerow([section, model, label, sample["repetition"], f"{sample['seconds']:.4f}",
                                         f"{sample['max_rss_mib']:.1f}", sample["exit_code"], sample["error"]])


def write_results(output: Path) -> None:
    sections = load_sections(output)
    (output / "results.json").write_text(json.dumps(sections, indent=2) + "\n", encoding="utf-8")
    write_samples_csv(sections, output / "samples.csv")
    (output / "results.md").write_text(render_markdown(sections), encoding="utf-8")


def main() -> int:
    args = build_parser().parse_args()
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    if args.source is not None:
        if not (args.source / "vit2bpu" / "__init__.py").is_file():
            print(f"run.py: error: --source '{args.source}' does not contain vit2bpu/__init__.py", file=sys.stderr)
            return 2
        args.source = args.source.resolve()
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.source), os.environ.get("PYTHONPATH")]))

    for option in ("python", "export_python"):
        interpreter = getattr(args, option)
        if os.sep in interpreter:  # a relative path would break once the run changes folder
            setattr(args, option, str(Path(interpreter).absolute()))

    if args.render_only:
        write_results(output)
        print(f"wrote {output / 'results.md'}")
        return 0
    for option in ("repetitions", "huge_repetitions", "latency_runs", "latency_rounds"):
        if getattr(args, option) < 1:
            print(f"run.py: error: --{option.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2

    sections = list(args.sections) + (["huge"] if args.huge and "huge" not in args.sections else [])
    sections = [name for name in SECTION_ORDER if name in sections and name not in args.skip]
    ctx = Context(args=args, output=output, cache=(args.model_cache or output / "models").resolve(),
                  scratch=output / "scratch", logs=output / "logs")
    ctx.cache.mkdir(parents=True, exist_ok=True)
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    # 'python -m' and 'python -c' put the working folder first on sys.path, so started from the repository
    # root they would import ./vit2bpu ahead of --source. Every command therefore runs from the scratch folder.
    os.chdir(ctx.scratch)

    machine = machine_facts(ctx)
    ctx.progress(f"sections: {', '.join(sections)}; results in {output}")
    for name in sections:
        run_section(ctx, name, machine)
        try:
            write_results(output)
        except Exception:  # a rendering bug must not stop the measuring, and the section file is already written
            print(f"run.py: could not write results.md, results.json or samples.csv:\n{traceback.format_exc()}"
                  "The section files are complete, so 'run.py --render-only' can write them after a fix.",
                  file=sys.stderr, flush=True)

    os.chdir(output)
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    print(f"wrote {output / 'results.md'}, results.json and samples.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
