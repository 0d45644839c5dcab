"""Measure onnxruntime CPU latency of several models on the same input, interleaved.

    python benchmarks/latency.py --threads 1 --runs 100 --rounds 5 --json OUT.json \
        original=deit.onnx converted=deit_bpu.onnx int8=deit_int8.onnx

Every model gets its own InferenceSession on the CPUExecutionProvider with the
default graph optimization level (ORT_ENABLE_ALL). One round runs each model
``--warmup`` times untimed and then ``--runs`` times timed, model after model, and
records the median of the timed runs. Round r starts with model r mod M. The JSON
contains every round's median per model. Batch size is the model's static batch (1 for
vit2bpu output and the exports of models/export.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import onnxruntime as ort


def make_session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # 0 lets onnxruntime choose: one thread per physical core, as its "Thread management" page documents.
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def make_feeds(session: ort.InferenceSession, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in session.get_inputs():
        if info.type != "tensor(float)":
            raise SystemExit(f"input '{info.name}' has type {info.type}, but this benchmark feeds float32 only")
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in info.shape]
        feeds[info.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def time_runs(session: ort.InferenceSession, feeds: dict, warmup: int, runs: int) -> float:
    """Return the median latency in milliseconds of ``runs`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        session.run(None, feeds)
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        latencies.append((time.perf_counter() - started) * 1e3)
    return statistics.median(latencies)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def parse_model(text: str) -> tuple[str, str]:
    label, separator, path = text.partition("=")
    if not separator or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got '{text}'")
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"model file '{path}' not found")
    return label, path


def main() -> None:
    parser = argparse.ArgumentParser(description="Interleaved onnxruntime CPU latency of several models.")
    parser.add_argument("models", nargs="+", type=parse_model, metavar="LABEL=PATH",
                        help="models to time; the first one is the reference for the output check")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads per session (default 0: onnxruntime's choice)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model per round (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per model per round (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all models (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the standard-normal input (default 0)")
    parser.add_argument("--json", required=True, metavar="FILE", help="where to write the results")
    args = parser.parse_args()

    sessions = {label: make_session(path, args.threads) for label, path in args.models}
    labels = list(sessions)
    feeds = make_feeds(sessions[labels[0]], args.seed)

    # The outputs are compared once, so a latency is never reported for a graph that computes something else.
    reference = sessions[labels[0]].run(None, feeds)[0]
    output_cosine = {label: cosine(reference, sessions[label].run(None, feeds)[0]) for label in labels}

    rounds: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(args.rounds):
        offset = round_index % len(labels)
        for label in labels[offset:] + labels[:offset]:
            rounds[label].append(time_runs(sessions[label], feeds, args.warmup, args.runs))

    result = {
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "onnxruntime": ort.__version__,
        "models": dict(args.models),
        "input_shapes": {name: list(value.shape) for name, value in feeds.items()},
        "output_cosine_vs_first": output_cosine,
        "round_median_ms": rounds,
    }
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
