"""Markdown tables of the benchmark results, built from the section records that run.py writes."""

from __future__ import annotations

SECTION_ORDER = ("conversion", "scaling", "huge", "runtime", "parity", "profile")

# Goals that the tables are checked against.
GOAL_TIME_VS_FLOOR = 2.0
GOAL_MEMORY_VS_FLOOR = 1.5
GOAL_LATENCY_VS_ORIGINAL = 1.1


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def fmt_ratio(ratio: dict | float | None, digits: int = 2) -> str:
    """Format a paired ratio as 'median (min-max)', or a single number as it is."""
    if isinstance(ratio, (int, float)):
        return fmt(ratio, digits)
    if not ratio or ratio.get("median") is None:
        return "n/a"
    return f"{ratio['median']:.{digits}f} ({ratio['min']:.{digits}f}-{ratio['max']:.{digits}f})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def command_lines(record: dict) -> list[str]:
    lines = ["Commands (IN is the cached export, OUT a scratch path, `python` the interpreter given to run.py):", ""]
    lines += [f"- {label}: `{text}`" for label, text in record.get("commands", {}).items()]
    return lines + [""]


def run_line(record: dict) -> str:
    load_before = record.get("load_average_before") or []
    load_after = record.get("load_average_after") or []
    load = (f"1-minute load average {fmt(load_before[0] if load_before else None)} before, "
            f"{fmt(load_after[0] if load_after else None)} after")
    return (f"Measured {record.get('started')} to {record.get('finished')} ({record.get('minutes')} min), "
            f"{record.get('repetitions')} interleaved rounds; {load}.")


def seconds_cell(summary: dict | None) -> str:
    if not summary or summary.get("seconds_median") is None:
        return "failed" if summary else "n/a"
    return f"{summary['seconds_median']:.2f} ({summary['seconds_min']:.2f}-{summary['seconds_max']:.2f})"


def memory_cell(summary: dict | None) -> str:
    if not summary or summary.get("max_rss_mib_median") is None:
        return "failed" if summary else "n/a"
    return f"{summary['max_rss_mib_median']:.0f}"


def machine_lines(sections: dict[str, dict]) -> list[str]:
    newest = max(sections.values(), key=lambda record: record.get("finished") or "")
    machine = newest.get("machine", {})
    versions = machine.get("versions", {})
    lines = ["## Machine", "",
             f"- CPU: {machine.get('cpu_model')}, {machine.get('cpu_count')} logical CPUs "
             f"({machine.get('cpus_usable')} usable by this process)",
             f"- Memory: {machine.get('memory_gib')} GiB",
             f"- OS: {machine.get('platform')}",
             "- Python and packages: " + ", ".join(f"{name} {version}" for name, version in versions.items()
                                                   if name != "vit2bpu_path")]
    export_versions = machine.get("export_versions")
    if export_versions:
        lines.append("- Export interpreter: " + ", ".join(f"{n} {v}" for n, v in export_versions.items()
                                                         if n != "vit2bpu_path"))
    git = machine.get("git", {})
    changed = git.get("changed_outside_benchmarks") or []
    lines.append(f"- Checkout at the start of the run: {git.get('commit')}"
                 + (f", changed outside benchmarks/: {', '.join(changed)}" if changed
                    else ", no changes outside benchmarks/"))
    lines.append(f"- vit2bpu measured: {versions.get('vit2bpu_path')}"
                 + (f" (from --source {machine['source']})" if machine.get("source") else "")
                 + f", SHA-256 of its .py files {machine.get('vit2bpu_sha256')}")
    return lines + [""]


# ---------------------------------------------------------------- sections


def conversion_lines(record: dict) -> list[str]:
    lines = ["## 1. Conversion against onnx load+save and onnxsim", "", run_line(record), ""]
    lines += command_lines(record)

    header = ["model", "params (M)", "file (MB)", "vit2bpu s", "load+save s", "onnxsim s",
              "vit2bpu / load+save", "same without start-up", "vit2bpu / onnxsim"]
    rows, memory_rows, goals = [], [], []
    for row in record.get("rows", []):
        summary, ratios = row["summary"], row["ratios"]
        floor, onnxsim = ratios.get("vit2bpu/load+save", {}), ratios.get("vit2bpu/onnxsim", {})
        rows.append([row["model"], fmt(row["parameters"] / 1e6, 1), fmt(row["file_bytes"] / 1e6, 0),
                     seconds_cell(summary.get("vit2bpu")), seconds_cell(summary.get("load+save")),
                     seconds_cell(summary.get("onnxsim")), fmt_ratio(floor.get("seconds")),
                     fmt(row.get("time_ratio_after_startup")), fmt_ratio(onnxsim.get("seconds"))])
        memory_rows.append([row["model"], memory_cell(summary.get("vit2bpu")), memory_cell(summary.get("load+save")),
                            memory_cell(summary.get("onnxsim")), fmt_ratio(floor.get("max_rss_mib")),
                            fmt_ratio(onnxsim.get("max_rss_mib"))])
        goals.append(conversion_goal_line(row["model"], floor, onnxsim))

    startup = record.get("startup_seconds", {})
    lines += ["Wall time, seconds: median (min-max). Ratios are per-round medians (min-max). 'same without "
              f"start-up' subtracts the median start-up of each command from the medians: "
              f"{fmt(startup.get('vit2bpu start-up'))} s for vit2bpu (`python -m vit2bpu --version`) and "
              f"{fmt(startup.get('onnx import'))} s for load+save (`python -c 'import onnx'`).", ""]
    lines += table(header, rows) + [""]
    lines += ["Peak resident memory, MiB (median):", ""]
    lines += table(["model", "vit2bpu", "load+save", "onnxsim", "vit2bpu / load+save", "vit2bpu / onnxsim"],
                   memory_rows) + [""]
    lines += [f"Goals: time at most {GOAL_TIME_VS_FLOOR}x load+save, peak memory at most {GOAL_MEMORY_VS_FLOOR}x "
              "load+save, both below onnxsim.", ""] + goals + [""]

    errors = [f"- {row['model']} {label}: {', '.join(s['errors'])}" for row in record.get("rows", [])
              for label, s in row["summary"].items() if s.get("errors")]
    if errors:
        lines += ["Failed runs:", ""] + errors + [""]
    return lines


def met(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= limit else "missed"


def conversion_goal_line(model: str, floor: dict, onnxsim: dict) -> str:
    time_ratio = (floor.get("seconds") or {}).get("median")
    memory_ratio = (floor.get("max_rss_mib") or {}).get("median")
    sim_time = (onnxsim.get("seconds") or {}).get("median")
    sim_memory = (onnxsim.get("max_rss_mib") or {}).get("median")
    parts = [f"time vs load+save {fmt(time_ratio)}x: {met(time_ratio, GOAL_TIME_VS_FLOOR)}",
             f"memory vs load+save {fmt(memory_ratio)}x: {met(memory_ratio, GOAL_MEMORY_VS_FLOOR)}"]
    if sim_time is not None:
        parts.append(f"vs onnxsim {fmt(sim_time)}x time, {fmt(sim_memory)}x memory: "
                     f"{'ahead' if sim_time < 1 and sim_memory < 1 else 'not ahead on both'}")
    return f"- {model}: " + "; ".join(parts)


def scaling_lines(record: dict) -> list[str]:
    lines = ["## 2. Scaling with depth and width", "", run_line(record), ""]
    lines += command_lines(record)
    analysis = record.get("analysis", {})
    startup = analysis.get("startup_seconds")
    lines += [f"Start-up alone (`python -m vit2bpu --version`, which imports vit2bpu, onnx and "
              f"onnx-graphsurgeon): {fmt(startup)} s. 'in-process' is the `convert` seconds of the --report file: "
              "loading, the passes and building the output, without start-up and writing.", ""]
    rows_by_model = {row["model"]: row for row in record.get("rows", [])}
    for key, title, unit, scale in (("depth", "Depth at DeiT-small width (384)", "block", 1),
                                    ("width", "Width at depth 12", "M params", 1e6)):
        fit = analysis.get(key)
        if not fit:
            continue
        header = ["model", "width", "depth", "params (M)", "nodes", "whole process s", "in-process s",
                  f"(whole - start-up) s per {unit}", f"in-process s per {unit}"]
        body = []
        for point in fit["points"]:
            row = rows_by_model[point["model"]]
            per_whole = point.get("seconds_after_startup_per_x")
            per_inside = point.get("in_process_seconds_per_x")
            body.append([row["model"], str(row["embed_dim"]), str(row["depth"]), fmt(row["parameters"] / 1e6, 1),
                         str(row["nodes"]), seconds_cell(row["summary"]), fmt(row["convert_seconds_median"]),
                         fmt(None if per_whole is None else per_whole * scale, 3),
                         fmt(None if per_inside is None else per_inside * scale, 3)])
        lines += [f"{title}:", ""] + table(header, body) + [""]
        for time_field, label in (("whole_process", "whole process"), ("in_process", "in-process")):
            result = fit["fits"].get(time_field, {})
            if "error" in result:
                lines.append(f"- {label}: {result['error']}")
                continue
            steps = ", ".join(fmt(s * scale, 3) for s in result["marginal_seconds_per_x"])
            lines.append(f"- {label}: least-squares slope {fmt(result['slope_seconds_per_x'] * scale, 3)} s per "
                         f"{unit}, intercept {fmt(result['intercept_seconds'])} s, R^2 "
                         f"{fmt(result['r_squared'], 4)}. Marginal cost of the two steps {steps} s per {unit}; "
                         f"last/first per round {fmt_ratio(result['last_to_first_step_ratio'])}: "
                         f"{result['verdict']}")
        lines.append("")
    lines += ["'linear' means that the median per-round ratio of the last step's marginal cost to the first "
              "step's is within a factor 1.25 of 1. The factor is this script's choice, not a standard.", ""]
    lines += pass_table(record.get("rows", []))
    return lines


def pass_table(rows: list[dict]) -> list[str]:
    names = []
    for row in rows:
        for name in row.get("pass_seconds_median", {}):
            if name not in names:
                names.append(name)
    if not names:
        return []
    header = ["pass"] + [row["model"] for row in rows]
    body = [[name] + [fmt(row.get("pass_seconds_median", {}).get(name), 3) for row in rows] for name in names]
    body.append(["sum of passes"] + [fmt(sum(row.get("pass_seconds_median", {}).values()), 2) for row in rows])
    return ["Seconds per pass (median, from the --report files of the runs above):", ""] + table(header, body) + [""]


def huge_lines(record: dict) -> list[str]:
    lines = ["## 3. Over 2 GB: ViT-huge with external data", "", run_line(record), ""]
    lines += command_lines(record)
    for row in record.get("rows", []):
        summary, ratios = row["summary"], row["ratios"]["vit2bpu/load+save"]
        export = row.get("export") or {}
        lines += [f"{row['model']}: {fmt(row['parameters'] / 1e6, 0)} M parameters, {fmt(row['file_bytes'] / 1e9)} "
                  f"GB on disk, {row['nodes']} nodes. Export: {fmt(export.get('seconds'), 0)} s, peak "
                  f"{fmt(export.get('max_rss_mib'), 0)} MiB.", ""]
        lines += table(["command", "wall s", "peak MiB"],
                       [[label, seconds_cell(s), memory_cell(s)] for label, s in summary.items()]) + [""]
        lines += [f"vit2bpu / load+save: time {fmt_ratio(ratios['seconds'])}, memory "
                  f"{fmt_ratio(ratios['max_rss_mib'])}.", ""]
        errors = [f"- {label}: {', '.join(s['errors'])}" for label, s in summary.items() if s.get("errors")]
        if errors:
            lines += ["Failed runs:", ""] + errors + [""]
    return lines


def runtime_lines(record: dict) -> list[str]:
    lines = ["## 4. onnxruntime CPU latency", "",
             f"Measured {record.get('started')} to {record.get('finished')}. Batch 1, CPUExecutionProvider, "
             "ORT_ENABLE_ALL; each figure is the median over rounds of the median of the timed runs in a round.", ""]
    lines += command_lines(record)
    body, notes, goals = [], [], []
    for row in record.get("rows", []):
        for result in row.get("steps", {}).values():
            if "error" in result:
                notes.append(f"- {row['model']}: {result['error']}")
        for threads, result in row.get("latency", {}).items():
            label = "1" if threads == "1" else "default"
            if "error" in result:
                notes.append(f"- {row['model']}, threads {label}: {result['error']}")
                continue
            median, ratio = result["median_ms"], result["ratio_to_original"]
            cosine = result["output_cosine_vs_original"]
            body.append([row["model"], label, fmt(median.get("original")), fmt(median.get("converted")),
                         fmt(median.get("int8")), fmt_ratio(ratio.get("converted")), fmt_ratio(ratio.get("int8")),
                         fmt(cosine.get("converted"), 6), fmt(cosine.get("int8"), 4)])
            goals.append(latency_goal_line(row["model"], label, (ratio.get("converted") or {}).get("median")))
    lines += table(["model", "threads", "original ms", "converted ms", "int8 ms", "converted / original",
                    "int8 / original", "cosine converted", "cosine int8"], body) + [""]
    lines += [f"Goal: converted within {GOAL_LATENCY_VS_ORIGINAL}x of the original.", ""] + goals
    lines.append("")
    for row in record.get("rows", []):
        quantize = row.get("quantize")
        if quantize:
            outputs = ", ".join(f"'{o['name']}' cosine {fmt(o.get('cosine'), 4)}, top-1 agreement "
                                f"{fmt((o.get('top1_agreement') or 0) * 100, 0)}%" for o in quantize["outputs"])
            lines.append(f"- {row['model']} INT8 QDQ: {quantize['qdq_nodes']} QuantizeLinear/DequantizeLinear nodes, "
                         f"calibrated on {quantize['calibration_samples']} random samples; agreement with FP32 on "
                         f"those samples: {outputs}")
    if notes:
        lines += ["", "Failures:", ""] + notes
    return lines + [""]


def latency_goal_line(model: str, threads: str, ratio: float | None) -> str:
    verdict = met(ratio, GOAL_LATENCY_VS_ORIGINAL)
    if ratio is not None and ratio > GOAL_LATENCY_VS_ORIGINAL:
        verdict += f", {(ratio - 1) * 100:.0f}% slower than the original"
    return f"- {model}, threads {threads}: converted / original {fmt(ratio)}: {verdict}"


def parity_lines(record: dict) -> list[str]:
    lines = ["## 5. Cost of the parity check", "", run_line(record), ""]
    lines += command_lines(record)
    body = []
    for row in record.get("rows", []):
        share = row["share_of_command"]
        share_text = "n/a" if share["median"] is None else (
            f"{share['median'] * 100:.0f}% ({share['min'] * 100:.0f}-{share['max'] * 100:.0f}%)")
        body.append([row["model"], seconds_cell(row["summary"].get("with parity")),
                     seconds_cell(row["summary"].get("no parity")), share_text,
                     fmt(row.get("in_process_parity_seconds_median")), fmt_ratio(row.get("memory_ratio"))])
    lines += table(["model", "with parity s", "--no-parity s", "parity share of the command",
                    "parity s (in-process)", "peak memory with / without"], body)
    return lines + ["", "The share is (with - without) / with, per round; the in-process figure is the report's "
                        "`parity` seconds.", ""]


def profile_lines(record: dict) -> list[str]:
    profile = record.get("profile", {})
    lines = ["## Profile of one conversion", "",
             f"cProfile of `vit2bpu.convert(IN, parity=False)` on {record.get('model')}, measured "
             f"{record.get('started')}: {fmt(profile.get('profiled_seconds'))} s under the profiler, which slows "
             "Python calls, so the shares count more than the seconds.", ""]
    lines += command_lines(record)
    total = profile.get("profiled_seconds") or 0
    body = [[f"`{e['function']}`", str(e["calls"]), fmt(e["self_seconds"]), f"{e['self_share'] * 100:.1f}%"]
            for e in profile.get("top_self", [])[:15]]
    lines += ["Functions with the most self time:", ""]
    lines += table(["function", "calls", "self s", "share"], body) + [""]
    body = [[f"`{e['function']}`", str(e["calls"]), fmt(e["cumulative_seconds"]),
             f"{e['cumulative_share'] * 100:.1f}%"] for e in profile.get("top_cumulative_vit2bpu", [])[:15]]
    lines += ["vit2bpu functions with the most cumulative time (nested calls are counted in each caller):", ""]
    lines += table(["function", "calls", "cumulative s", "share"], body) + [""]
    passes = profile.get("pass_seconds", {})
    if passes and total:
        lines += ["Passes under the profiler: " + ", ".join(
            f"{name} {seconds:.2f} s ({seconds / total * 100:.0f}%)"
            for name, seconds in sorted(passes.items(), key=lambda item: -item[1])), ""]
    return lines


RENDERERS = {"conversion": conversion_lines, "scaling": scaling_lines, "huge": huge_lines,
             "runtime": runtime_lines, "parity": parity_lines, "profile": profile_lines}


def render_markdown(sections: dict[str, dict]) -> str:
    """Return the Markdown page for the section records, in SECTION_ORDER."""
    lines = ["# vit2bpu benchmark results", "",
             "Written by `benchmarks/run.py`. Times are whole-process wall times and peak resident set sizes "
             "(ru_maxrss of the child process), medians over interleaved rounds. Ratios are medians of per-round "
             "ratios, which reduce the effect of load from other jobs on a shared machine.", ""]
    if not sections:
        return "\n".join(lines + ["No section results found.", ""])
    lines += machine_lines(sections)
    for name in SECTION_ORDER:
        record = sections.get(name)
        if record is None:
            continue
        if "error" in record:
            lines += [f"## {name}", "", f"Failed: {record['error']}", ""]
            continue
        lines += RENDERERS[name](record)
    return "\n".join(lines) + "\n"
