"""Whole-process measurement: wall time and peak resident memory of a command, run interleaved.

Each command runs as a child process and is reaped with ``os.wait4``, which returns
the child's own resource usage, so ``ru_maxrss`` is that process's peak resident set
size (KiB on Linux, bytes on macOS). Wall time is ``time.perf_counter`` from just
before the fork to the return of ``wait4``, so it includes interpreter start-up and
imports, which a user running the command also waits for.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence


@dataclass
class Sample:
    """One run of one command."""

    label: str
    repetition: int
    seconds: float
    max_rss_mib: float
    exit_code: int
    timed_out: bool = False
    error: str = ""
    # Whatever Command.inspect read after the run, such as the seconds of a --report file.
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass
class Command:
    """A command to measure and the files it writes, which are removed before and after each run.

    ``inspect``, when set, is called after each successful run, before the files are
    removed, and its result is stored in ``Sample.details``.
    """

    label: str
    argv: list[str]
    outputs: list[Path] = field(default_factory=list)
    env: dict[str, str] | None = None
    inspect: Callable[[], dict] | None = None


def run_measured(argv: Sequence[str], *, timeout: float, log_path: Path, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> tuple[float, float, int, bool]:
    """Run ``argv`` and return (wall seconds, peak RSS in MiB, exit code, timed out).

    stdout and stderr go to ``log_path``. A process still running after ``timeout``
    seconds is killed, and its exit code is then the negative signal number.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        started = time.perf_counter()
        process = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        killed = threading.Event()

        def kill_on_timeout() -> None:
            killed.set()
            process.kill()

        timer = threading.Timer(timeout, kill_on_timeout)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
    exit_code = os.waitstatus_to_exitcode(status)
    # Popen must not try to reap the process again.
    process.returncode = exit_code
    rss_bytes = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return seconds, rss_bytes / 2**20, exit_code, killed.is_set()


def last_lines(path: Path, count: int = 3) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-count:])


def remove_files(paths: Sequence[Path]) -> None:
    for path in paths:
        for candidate in (path, path.with_name(path.name + ".data")):
            if candidate.exists():
                candidate.unlink()


def run_interleaved(commands: Sequence[Command], repetitions: int, *, timeout: float, log_dir: Path,
                    progress: Callable[[str], None] = print) -> dict[str, list[Sample]]:
    """Run every command once per round for ``repetitions`` rounds and return the samples by label.

    Round r starts at command r mod len(commands) (A, B, C, then B, C, A, ...), so no
    command always runs first after a pause or right after the same neighbour. The
    files a command writes are removed after each run, so every run writes to an
    empty path and the disk does not fill up with copies.
    """
    samples: dict[str, list[Sample]] = {c.label: [] for c in commands}
    for repetition in range(repetitions):
        offset = repetition % len(commands)
        for command in list(commands[offset:]) + list(commands[:offset]):
            remove_files(command.outputs)
            log_path = log_dir / f"{command.label}.{repetition}.log"
            env = None if command.env is None else {**os.environ, **command.env}
            seconds, rss_mib, exit_code, timed_out = run_measured(command.argv, timeout=timeout, log_path=log_path,
                                                                  env=env)
            sample = Sample(command.label, repetition, seconds, rss_mib, exit_code, timed_out)
            if not sample.ok:
                reason = f"timed out after {timeout:.0f} s" if timed_out else f"exit code {exit_code}"
                sample.error = f"{reason}: {last_lines(log_path)}"
            elif command.inspect is not None:
                try:
                    sample.details = command.inspect()
                except (OSError, ValueError, KeyError) as exc:
                    sample.details = {"error": f"could not read the details: {exc}"}
            samples[command.label].append(sample)
            remove_files(command.outputs)
            status = "ok" if sample.ok else f"FAILED ({sample.error})"
            progress(f"  [{repetition + 1}/{repetitions}] {command.label}: {seconds:.2f} s, "
                     f"{rss_mib:.0f} MiB, {status}")
    return samples


def median_of(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(samples: Sequence[Sample]) -> dict:
    """Median, minimum and maximum time and peak memory over the successful samples."""
    good = [s for s in samples if s.ok]
    seconds = [s.seconds for s in good]
    rss = [s.max_rss_mib for s in good]
    return {
        "runs": len(samples),
        "failed": len(samples) - len(good),
        "errors": sorted({s.error for s in samples if not s.ok}),
        "seconds_median": median_of(seconds),
        "seconds_min": min(seconds) if seconds else None,
        "seconds_max": max(seconds) if seconds else None,
        "max_rss_mib_median": median_of(rss),
        "max_rss_mib_min": min(rss) if rss else None,
        "max_rss_mib_max": max(rss) if rss else None,
    }


def paired_ratio(numerator: Sequence[Sample], denominator: Sequence[Sample], metric: str) -> dict:
    """Median and range over the rounds of numerator/denominator, paired by repetition.

    Pairing by round reduces the effect of load from other jobs on a shared machine,
    because both runs of a pair ran within seconds of each other.
    """
    by_round = {s.repetition: s for s in denominator if s.ok}
    ratios = [getattr(s, metric) / getattr(by_round[s.repetition], metric)
              for s in numerator if s.ok and s.repetition in by_round]
    return {"median": median_of(ratios), "min": min(ratios) if ratios else None,
            "max": max(ratios) if ratios else None, "pairs": len(ratios)}


def samples_to_dicts(samples: dict[str, list[Sample]]) -> dict[str, list[dict]]:
    return {label: [asdict(s) for s in runs] for label, runs in samples.items()}
