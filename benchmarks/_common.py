"""Pieces shared by the benchmark scripts: the CPU's name and environment columns, a timer's median, and the CSV
they write."""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

import normlab


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_env(threads: int) -> dict:
    """The environment columns of a CPU benchmark's CSV (CPU, thread count, versions), printed as its first line."""
    env = {
        "device": cpu_name(),
        "threads": threads,
        "torch": torch.__version__,
        "normlab": normlab.__version__,
        "python": platform.python_version(),
    }
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    return env


def median_ms(timer: Timer, min_run_time: float) -> float:
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def write_csv(path: Path, rows: list[dict], env: dict) -> None:
    """One row per measurement, each with the environment's columns appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *env])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **env})
    print(f"\nwrote {path}")
