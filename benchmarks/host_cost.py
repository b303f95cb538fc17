"""Host cost of one call through normlab's Triton path, kernels stubbed out, vs torch's module: on CPU, no GPU.

    python benchmarks/host_cost.py [--quick] [--out benchmarks/results/host_cost.csv]

On a GPU at small and medium shapes an eager normlab call waits for the host (the README's GPU section: its Python
launch path costs 2-4x torch's C++ one), so the host cost per call is what the eager targets turn on. This script
measures it without a GPU: it imports the kernels under Triton's interpreter (so that they accept CPU tensors) and
replaces every ``@triton.jit`` kernel in ``normlab.kernels`` with a launch that does nothing but count itself. What is
left is normlab's own Python per call (checks, dispatch, launch configuration, allocations, autograd), which a GPU
host pays on top of Triton's launcher (about 17 us per launch on the measured H100 machine, whose Python ran about 8x
slower than a desktop's). The torch column runs torch's module at a tiny shape, where its CPU compute is small next to
its own dispatch cost: a yardstick, not an equal comparison (torch's time includes some compute, normlab's none).

Each case is timed as forward+backward (``y.backward(g)`` of a fresh output) in training, and as a no-grad forward
(eval or ``torch.no_grad()``). Rounds alternate normlab and torch, and the fastest round of each is reported: on a
noisy machine interference only adds time. The CSV also records the kernel launches each call makes.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels then accept CPU tensors

import torch  # noqa: E402
from _common import cpu_env, write_csv  # noqa: E402
from torch import nn  # noqa: E402

import normlab  # noqa: E402
from normlab import kernels  # noqa: E402

SHAPE = (2, 64, 4, 4)
"""Small enough that torch's CPU compute is a minor part of its time."""


class _Launches:
    """Stands in for every Triton kernel: ``kernel[grid](*args, **kwargs)`` only counts the launch."""

    def __init__(self) -> None:
        self.count = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.count += 1


def stub_kernels() -> _Launches:
    """Replace every ``@triton.jit`` kernel (``*_kernel``) of normlab's kernel modules with one counting stand-in."""
    from normlab.kernels import batch_norm, channel_norm, frn, group_norm

    launches = _Launches()
    for module in (batch_norm, channel_norm, frn, group_norm):
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "fn"):
                setattr(module, name, launches)
    return launches


def cases(c: int) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(name, normlab module, torch module or None)."""
    return [
        ("GroupNorm(32)", normlab.GroupNorm(c, num_groups=32), nn.GroupNorm(32, c)),
        ("InstanceNorm2d(affine)", normlab.InstanceNorm2d(c, affine=True), nn.InstanceNorm2d(c, affine=True)),
        ("BatchNorm2d", normlab.BatchNorm2d(c), nn.BatchNorm2d(c)),
        ("BatchNorm2d(nan_guard=False)", normlab.BatchNorm2d(c, nan_guard=False), nn.BatchNorm2d(c)),
        ("LayerNorm2d", normlab.LayerNorm2d(c), None),
        ("RMSNorm2d", normlab.RMSNorm2d(c), None),
        ("FilterResponseNorm2d+TLU", normlab.FilterResponseNorm2d(c), None),
        ("EvoNorm2dS0", normlab.EvoNorm2dS0(c), None),
    ]


def _best_us(fn, rounds: int, calls: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return times


def measure(quick: bool) -> list[dict]:
    launches = stub_kernels()
    rounds, calls = (3, 200) if quick else (7, 2000)
    x = torch.randn(SHAPE, requires_grad=True)
    g = torch.randn(SHAPE)
    rows = []
    for name, ours, theirs in cases(SHAPE[1]):
        for mode in ("fwd+bwd", "no-grad fwd"):

            def call(module, mode=mode):
                if mode == "fwd+bwd":
                    module(x).backward(g)
                else:
                    with torch.no_grad():
                        module(x)

            ours.train(mode == "fwd+bwd")
            if theirs is not None:
                theirs.train(mode == "fwd+bwd")
            with kernels.use_backend("triton"):
                for _ in range(20):  # warm-up: caches, the first-call paths
                    call(ours)
                before = launches.count
                call(ours)
                per_call = launches.count - before
                samples = ([], [])
                for _ in range(rounds):
                    samples[0].extend(_best_us(functools.partial(call, ours), 1, calls))
                    if theirs is not None:
                        with kernels.use_backend("native"):
                            samples[1].extend(_best_us(functools.partial(call, theirs), 1, calls))
            ours_us = min(samples[0])
            torch_us = min(samples[1]) if samples[1] else None
            rows.append(
                {
                    "op": name,
                    "pass": mode,
                    "shape": "x".join(map(str, SHAPE)),
                    "launches": per_call,
                    "normlab_host_us": round(ours_us, 2),
                    "torch_us": None if torch_us is None else round(torch_us, 2),
                    "ratio": None if torch_us is None else round(ours_us / torch_us, 2),
                }
            )
            r = rows[-1]
            print(
                f"{name:30s} {mode:12s} launches {per_call:2d}  normlab {ours_us:7.1f} us  "
                + (f"torch {torch_us:7.1f} us  ratio {r['ratio']:.2f}" if torch_us is not None else "torch -"),
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host_cost.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = cpu_env(threads=1)
    rows = measure(args.quick)
    write_csv(args.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
