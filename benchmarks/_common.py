"""Shared helpers of the benchmark scripts: interleaved timing, medians, peak-RSS measurement, machine notes."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def round_robin(
    arms: dict[str, Callable[[], object]], reps: int, warmup: int = 1, log: Callable[[str], None] | None = None
) -> dict[str, list[float]]:
    """Time each arm ``reps`` times, interleaving the arms in every repetition (so a load drift on the shared machine
    hits all arms alike), after ``warmup`` untimed interleaved rounds. Returns seconds per call, per arm."""
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for rep in range(reps):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if log:
            log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{n}={t[-1]:.3f}s" for n, t in times.items()))
    return times


def max_rss_mb() -> float:
    """High-water mark of this process's resident set (``ru_maxrss``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def status_mb(field_name: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``...) in MiB, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident set now (``VmRSS``), or the high-water mark where /proc is missing."""
    value = status_mb("VmRSS")
    return max_rss_mb() if value is None else value


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter ``VmHWM`` (Linux >= 4.0: write 5 to clear_refs); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_mb("VmHWM") is not None


def peak_rss_mb() -> float:
    """Peak resident set since the last :func:`reset_peak_rss` (``VmHWM``), else ``ru_maxrss``."""
    value = status_mb("VmHWM")
    return max_rss_mb() if value is None else value


FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""glibc settings for child processes whose peak resident set is measured: blocks from 128 KiB on are mapped and
unmapped on their own and freed heap tops are returned at once, instead of glibc's thresholds that grow with the
blocks freed so far. The peak resident set then follows the live allocations: the same arm gives the same number in
every run (with glibc's defaults one arm's peak varied by 25-70 MB between runs of the training-step benchmark, and
by up to 950 MB between runs of the generation benchmark's sparse arms)."""


def run_json_subprocess(args: list[str], timeout: float = 900.0, env: dict[str, str] | None = None) -> dict:
    """Run ``python <args>`` in a fresh process (``env``: extra variables) and parse the last stdout line as JSON."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_note() -> dict:
    """Date, host facts and the load average at the time of the run (the machine is shared)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": _cpu_name(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


DOCS = Path(__file__).resolve().parent.parent / "docs"


def output_dir(requested: Path | None, quick: bool) -> Path:
    """Where results go: ``requested``, else ``docs/`` for a full run and a new temporary folder for ``--quick``
    (a smoke run must never replace the committed full results)."""
    if requested is not None:
        return requested
    if quick:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="ders_bench_quick_"))
    return DOCS


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def serve_arm(arm) -> None:
    """Worker side of :class:`ArmProcess`: announce ``ready``, then answer ``run`` (one timed call) and ``summary``
    (the arm's own-process summary; ends the worker) on stdin, one JSON line each."""
    import json
    import sys

    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(arm.run()), flush=True)
        elif line.strip() == "summary":
            print(json.dumps(arm.summary(own_process=True)), flush=True)
            return


class ArmProcess:
    """One benchmark arm in its own fresh process (``script --gen-worker <spec json>``, served by :func:`serve_arm`),
    so its peak resident memory is its own."""

    def __init__(self, name: str, script: str, spec: dict) -> None:
        import json
        import os
        import subprocess
        import sys

        self.name = name
        cmd = [sys.executable, script, "--gen-worker", json.dumps(spec)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def expect(self, what: str | None = None) -> str:
        line = self.proc.stdout.readline()
        if not line or (what and line.strip() != what):
            self.proc.kill()
            err = self.proc.stderr.read()[-3000:]
            raise RuntimeError(f"arm {self.name!r} failed (got {line!r}):\n{err}")
        return line

    def ask(self, command: str):
        import json

        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.expect())


def git_commit() -> dict:
    """The repository's HEAD (short hash) and whether ``ders_peft/`` or ``benchmarks/`` has uncommitted changes at the
    time of the run (the commit alone would then not say what ran); ``"unknown"`` outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        except OSError:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    head = git("rev-parse", "--short=12", "HEAD")
    dirty = git("status", "--porcelain", "--", "ders_peft", "benchmarks")
    return {"commit": head or "unknown", "dirty": bool(dirty)}


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that produced a result, as recorded in its JSON: ``python benchmarks/<script> <arguments>``."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}", *args])


def provenance_line(result: dict) -> str:
    """One markdown line naming a result's command, date, commit and load average (for the generated pages)."""
    m, c = result["machine"], result["commit"]
    commit = f"`{c['commit']}`" + (" plus uncommitted changes" if c["dirty"] else "")
    return (
        f"Command: `{result['command']}`; date {m['date']}; commit {commit}; {m['cpu_count']} CPU cores "
        f"({m['processor']}), torch {m['torch']}, load average {m['loadavg_1_5_15'][0]:g} / "
        f"{m['loadavg_1_5_15'][1]:g} / {m['loadavg_1_5_15'][2]:g} (1 / 5 / 15 min) at the start."
    )
