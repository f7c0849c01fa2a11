"""Running the scripts as users run them, for the benchmarks (tests/benchmark.py and the modes it
dispatches to): a script's epochs, epoch-line times and peak memory, best-of timing, the CPU."""

import csv
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_seconds(fn, repeats=5):
    fn()  # trace, compile, warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_script(script, data_dir, out, *args):
    """Run `python script` as a user would: {"seconds": history.csv's seconds column, "stamps":
    when each epoch line appeared and "wall": when it ended, in seconds from its start, "peak":
    its peak RSS in bytes}."""
    cmd = [sys.executable, os.path.join(ROOT, script), "--out", out, *args]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stamps, peak = [], 0
    for line in proc.stdout:
        if line.startswith("epoch "):
            stamps.append(time.perf_counter() - start)
        peak = max(peak, peak_rss(proc.pid))
    if proc.wait():
        sys.exit(f"benchmark: {' '.join(cmd)} failed")
    with open(os.path.join(out, "history.csv")) as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    return {"seconds": seconds, "stamps": stamps, "wall": time.perf_counter() - start, "peak": peak}


def epoch_and_peak(run):
    """A script run's figures for the speed table: (median training s after the first two
    epochs, peak RSS bytes)."""
    return statistics.median(run["seconds"][2:]), run["peak"]


def peak_rss(pid):
    """The process's peak resident memory so far in bytes (VmHWM, Linux), 0 where unknown. Read
    while it runs: a child's rusage would also count the pages of this process it forked from."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def available(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"
