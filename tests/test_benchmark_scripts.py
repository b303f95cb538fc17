"""The GPU tuning script's smoke mode: it runs (CPU, Triton's interpreter), checks every candidate against torch and
writes its CSV; and the CUDA-only modes refuse cleanly without a GPU."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_tune.py"

pytest.importorskip("triton")


def _run(*args, interpret=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_gpu_tune_smoke_checks_and_writes_every_candidate(tmp_path):
    out = tmp_path / "tune.csv"
    result = _run("--smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["op"] for r in rows} == {"gn", "in", "bn"}
    # two candidates per module, two passes each, over the four smoke cases
    assert len(rows) == 4 * 2 * 2
    for r in rows:
        assert float(r["rel_err_y"]) < 2e-2 and float(r["rel_err_dx"]) < 2e-2, r  # bf16 against torch
        assert float(r["normlab_ms"]) > 0 and float(r["eager_ms"]) > 0
    assert "per case (fwd+bwd" in result.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_tune_without_cuda_refuses():
    result = _run("--out", "unused.csv", interpret=False)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_gpu_all_runs_its_steps_and_writes_the_summary_without_a_gpu(tmp_path):
    """The one-call GPU script's mechanics, where CUDA is absent: every selected step runs under its limit, a failing
    step does not stop the others, the summary names each step with its status, and the exit status is 1."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "STEPS": "kernels resnet", "RESNET_COMPILE": "none", "T_WARM": "120"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_all.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "normlab GPU run" in summary and "python" in summary
    steps = [line.split()[0] for line in summary.splitlines() if line.startswith(("phase0", "bench-", "tune"))]
    assert steps == ["phase0-tests", "bench-kernels", "bench-resnet50"]
    assert "FAILED (exit 2)" in summary  # the benchmarks refuse without CUDA, and the run goes on
    log = (out / "run.log").read_text()
    assert "timing needs a CUDA GPU" in log and "--graph" in log
    assert sorted(p.name for p in out.iterdir()) == ["run.log", "summary.txt", "warm.log"]


def test_host_cost_measures_every_op_with_its_launches(tmp_path):
    """benchmarks/host_cost.py: every op in both passes, with the launches its stubbed kernels counted (the Triton
    path ran, not a fallback) and torch's time where torch has the module."""
    out = tmp_path / "host.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_cost.py"), "--quick", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["pass"] for r in rows} == {"fwd+bwd", "no-grad fwd"}
    assert len(rows) == 2 * len({r["op"] for r in rows}) >= 16
    for r in rows:
        assert int(r["launches"]) >= 1 and float(r["normlab_host_us"]) > 0, r
        assert (r["torch_us"] == "") == r["op"].startswith(("LayerNorm2d", "RMSNorm2d", "Filter", "EvoNorm")), r
    by_op = {(r["op"], r["pass"]): int(r["launches"]) for r in rows}
    assert by_op[("GroupNorm(32)", "fwd+bwd")] > by_op[("GroupNorm(32)", "no-grad fwd")]
