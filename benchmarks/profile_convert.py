"""Profile one ``vit2bpu.convert`` call with cProfile and list the hot spots.

    python benchmarks/profile_convert.py IN.onnx --stats OUT.prof --json OUT.json

The parity check is off (``parity=False``), as with ``--no-parity``. The JSON lists
the functions with the most self time and, separately, the vit2bpu functions with the
most cumulative time, each with its share of the profiled wall time. cProfile adds
overhead to every Python call, so the shares are more reliable than the seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import vit2bpu


def function_name(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":
        return name  # a built-in, written like "<method 'SerializeToString' ...>"
    for marker in ("/site-packages/", "/vit2bpu/", "/lib/python"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            if marker == "/vit2bpu/":
                filename = "vit2bpu/" + filename
            break
    return f"{filename}:{line}({name})"


def top_entries(stats: pstats.Stats, total: float, *, order_by: str, count: int,
                only_vit2bpu: bool = False) -> list[dict]:
    """Return the ``count`` functions with the largest ``order_by`` ("self_seconds" or "cumulative_seconds")."""
    rows = []
    for key, (_, calls, self_time, cumulative, _) in stats.stats.items():
        if only_vit2bpu and "/vit2bpu/" not in key[0]:
            continue
        rows.append({"function": function_name(key), "calls": calls, "self_seconds": self_time,
                     "cumulative_seconds": cumulative, "self_share": self_time / total,
                     "cumulative_share": cumulative / total})
    rows.sort(key=lambda row: row[order_by], reverse=True)
    return rows[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description="Profile vit2bpu.convert on one model with cProfile.")
    parser.add_argument("input", help="ONNX model to convert")
    parser.add_argument("--stats", required=True, metavar="FILE.prof", help="where to write the pstats file")
    parser.add_argument("--json", required=True, metavar="FILE.json", help="where to write the hot spots")
    parser.add_argument("--top", type=int, default=20, help="number of functions to list per table (default 20)")
    args = parser.parse_args()

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    _, report = vit2bpu.convert(args.input, parity=False)
    profiler.disable()
    total = time.perf_counter() - started
    profiler.dump_stats(args.stats)

    stats = pstats.Stats(profiler)
    result = {
        "input": args.input,
        "profiled_seconds": total,
        "pass_seconds": {p.name: p.seconds for p in report.passes},
        "top_self": top_entries(stats, total, order_by="self_seconds", count=args.top),
        "top_cumulative_vit2bpu": top_entries(stats, total, order_by="cumulative_seconds", count=args.top,
                                              only_vit2bpu=True),
    }
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
