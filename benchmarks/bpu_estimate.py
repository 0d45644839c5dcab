"""Estimate BPU placement and latency of original and converted models with the RDK toolchain.

Runs a wrapper around D-Robotics' hb_mapper/hmct/hbdk (any command that takes
``MODEL.onnx MARCH [options]`` and prints JSON with ``bpu_latency_us``,
``subgraphs``, ``cpu_op_types`` and ``bpu_nodes``/``cpu_nodes``) on each model in
both Softmax modes, and prints a Markdown table:

- ``default``: Softmax stays on the CPU, as hb_mapper does without run_on_bpu;
- ``run_fast``: ``--optimization run_fast``, which moves Softmax to the BPU.

Example (one DeiT-tiny block, the original timm export against two conversions):

    python benchmarks/bpu_estimate.py --bpu-check /path/to/bpu_check.sh \\
        block_op11.onnx --convert "" --convert "--softmax decompose" --march bayes-e

Latencies are hbdk-perf's static estimates of the BPU part only; CPU ops,
quantize/dequantize at subgraph borders and runtime overhead are not in them.
A whole DeiT-tiny at -O3 takes 30-55 minutes on 2 cores: use one- or two-block
models for latency and ``--hbdk-params ''`` (-O0) for placement of whole models.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_check(bpu_check: str, model: Path, march: str, mode: str, hbdk_params: str | None) -> dict:
    command = ["bash", bpu_check, str(model), march]
    if mode == "run_fast":
        command += ["--optimization", "run_fast"]
    if hbdk_params is not None:
        command += ["--hbdk-params", hbdk_params]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"ok": False, "error": f"exit {done.returncode}: {last}"}
    result["seconds"] = round(seconds, 1)
    result["command"] = " ".join(shlex.quote(part) for part in command)
    return result


def convert(model: Path, options: str, folder: Path) -> Path:
    name = "vit2bpu" + ("_" + "_".join(part.strip("-").replace("=", "") for part in options.split()) if options else "")
    output = folder / f"{model.stem}_{name}.onnx"
    command = [sys.executable, "-m", "vit2bpu", str(model), str(output), "-q", *shlex.split(options)]
    subprocess.run(command, check=True)
    return output


def table(rows: list[dict]) -> str:
    lines = ["| model | mode | BPU latency (us) | subgraphs | BPU nodes | CPU nodes by op type | compiled |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["result"]
        cpu = ", ".join(f"{op} {n}" for op, n in sorted((r.get("cpu_op_types") or {}).items())) or "none"
        latency = r.get("bpu_latency_us")
        lines.append(f"| {row['model']} | {row['mode']} | {latency if latency is not None else '-'} | "
                     f"{r.get('subgraphs', '-')} | {r.get('bpu_nodes', '-')} | {cpu} | "
                     f"{'yes' if r.get('compile_ok') else r.get('error') or 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="original ONNX models (opset 10-11)")
    parser.add_argument("--bpu-check", default=os.environ.get("BPU_CHECK"),
                        help="the toolchain wrapper script (default: $BPU_CHECK)")
    parser.add_argument("--convert", action="append", default=[], metavar="OPTIONS",
                        help="vit2bpu options for one conversion of each model ('' for the defaults); repeatable")
    parser.add_argument("--march", default="bayes-e", help="bayes-e (RDK X5, default), bayes (J5), bernoulli2 (X3)")
    parser.add_argument("--modes", default="default,run_fast", help="comma-separated: default, run_fast")
    parser.add_argument("--hbdk-params", help="hbdk-cc options passed through ('' = -O0 placement only)")
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args(argv)
    if not args.bpu_check:
        parser.error("give the toolchain wrapper with --bpu-check or $BPU_CHECK")

    rows = []
    with tempfile.TemporaryDirectory(prefix="vit2bpu-bpu-") as work:
        for model in args.models:
            candidates = [model] + [convert(model, options, Path(work)) for options in args.convert]
            for candidate in candidates:
                for mode in args.modes.split(","):
                    result = run_check(args.bpu_check, candidate, args.march, mode, args.hbdk_params)
                    rows.append({"model": candidate.name, "mode": mode, "result": result})
                    print(f"{candidate.name} {mode}: {result.get('bpu_latency_us')} us "
                          f"({result['seconds']} s)", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
