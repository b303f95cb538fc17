"""Forward+backward time of normlab layers vs their torch.nn counterparts on CPU, side by side in one run.

    python benchmarks/cpu_layers.py [--quick] [--out benchmarks/results/cpu_layers.csv]

Shapes: N=8, C in (64, 128, 256), 32x32 and 8x8 (ResNet-like), float32, NCHW, training mode. Each pair is timed
alternately (torch, normlab, torch, normlab, ...), several rounds, and the fastest round of each is reported: on a
noisy, shared machine interference only ever adds time, and alternation exposes both to it alike. Compare the
ratio, not the absolute times. Composite layers without a torch
counterpart (FRN, EvoNorm, Batch Renorm, Ghost BN) are reported against torch BatchNorm2d as the baseline.
The CSV records the CPU, the thread count and the versions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from _common import cpu_env, median_ms, write_csv
from torch import nn
from torch.utils.benchmark import Timer

import normlab


def pairs(c: int) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, torch baseline, normlab layer)."""
    return [
        ("BatchNorm2d", nn.BatchNorm2d(c), normlab.BatchNorm2d(c)),
        ("GroupNorm(32)", nn.GroupNorm(32, c), normlab.GroupNorm(c, num_groups=32)),
        ("LayerNorm(C,H,W) [torch: GroupNorm(1)]", nn.GroupNorm(1, c), normlab.LayerNorm(c)),
        ("InstanceNorm2d(affine)", nn.InstanceNorm2d(c, affine=True), normlab.InstanceNorm2d(c)),
        ("LayerNorm2d [torch: permute+LayerNorm]", _PermutedLayerNorm(c), normlab.LayerNorm2d(c)),
        ("RMSNorm2d [torch: permute+RMSNorm]", _PermutedRMSNorm(c), normlab.RMSNorm2d(c)),
        ("FilterResponseNorm2d+TLU [vs torch BN]", nn.BatchNorm2d(c), normlab.FilterResponseNorm2d(c)),
        ("EvoNorm2dB0 [vs torch BN]", nn.BatchNorm2d(c), normlab.EvoNorm2dB0(c)),
        ("EvoNorm2dS0 [vs torch BN]", nn.BatchNorm2d(c), normlab.EvoNorm2dS0(c)),
        ("BatchRenorm2d [vs torch BN]", nn.BatchNorm2d(c), normlab.BatchRenorm2d(c)),
        ("GhostBatchNorm2d(4) [vs torch BN]", nn.BatchNorm2d(c), normlab.GhostBatchNorm2d(c, virtual_batch_size=4)),
    ]


class _PermutedLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _PermutedRMSNorm(nn.RMSNorm):
    def __init__(self, c):
        super().__init__(c, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def fwd_bwd_timer(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Timer:
    module.train()
    return Timer(
        "torch.autograd.grad(m(x), [x, *m.parameters()], grad)",
        globals={"m": module, "x": x, "grad": grad, "torch": torch},
    )


def run(quick: bool) -> list[dict]:
    shapes = [(8, c, hw, hw) for c in (64, 128, 256) for hw in (32, 8)]
    if quick:
        shapes = [(8, 64, 32, 32), (8, 256, 8, 8)]
    rounds, min_run_time = (3, 0.05) if quick else (7, 0.15)
    rows = []
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        for name, baseline, ours in pairs(shape[1]):
            timers = (fwd_bwd_timer(baseline, x, grad), fwd_bwd_timer(ours, x, grad))
            samples = ([], [])
            for _ in range(rounds):
                for i, t in enumerate(timers):
                    samples[i].append(median_ms(t, min_run_time))
            torch_ms, ours_ms = min(samples[0]), min(samples[1])
            rows.append(
                {
                    "layer": name,
                    "shape": "x".join(map(str, shape)),
                    "torch_ms": round(torch_ms, 4),
                    "normlab_ms": round(ours_ms, 4),
                    "ratio": round(ours_ms / torch_ms, 3),
                }
            )
            print(
                f"{name:42s} {rows[-1]['shape']:>12s} torch {torch_ms:8.3f} ms  normlab {ours_ms:8.3f} ms  "
                f"ratio {ours_ms / torch_ms:5.2f}",
                flush=True,
            )
    return rows


def summarize(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(layer, geometric-mean ratio, worst ratio) over shapes."""
    out = []
    for name in dict.fromkeys(r["layer"] for r in rows):
        ratios = [r["ratio"] for r in rows if r["layer"] == name]
        out.append((name, statistics.geometric_mean(ratios), max(ratios)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer rounds (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_layers.csv")
    args = parser.parse_args(argv)
    env = cpu_env(threads=1)  # torch.utils.benchmark.Timer's default: both sides run single-threaded
    rows = run(args.quick)
    print("\n| layer | normlab / torch (geo-mean over shapes) | worst shape |\n|---|---|---|")
    for name, geo, worst in summarize(rows):
        print(f"| {name} | {geo:.2f}x | {worst:.2f}x |")
    write_csv(args.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
