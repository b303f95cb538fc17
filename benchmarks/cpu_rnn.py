"""Forward+backward time of normlab.NormLSTM (every norm option) vs torch.nn.LSTM on CPU, side by side in one run.

    python benchmarks/cpu_rnn.py [--quick] [--out benchmarks/results/cpu_rnn.csv]

Shape: one layer, hidden size 128, input size 128, T = 40 steps, batch 32, batch_first, float32, training mode;
forward plus ``torch.autograd.grad`` w.r.t. the input and every parameter, one thread for both. Each pair is timed
alternately (torch, normlab, torch, normlab, ...), several rounds, and the fastest round of each is reported: on a
noisy, shared machine interference only ever adds time, and alternation exposes both to it alike. Compare the ratio,
not the absolute times. torch.nn.LSTM runs a fused oneDNN (mkldnn) LSTM kernel on CPU; NormLSTM's loop is Python
with one matmul for all input projections before it and one addmm per step. The target is ``norm="none"`` within 3x
of torch. The CSV records the CPU, the thread count and the versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import cpu_env, median_ms, write_csv
from torch import nn
from torch.utils.benchmark import Timer

from normlab.layers.rnn import NORMS, NormLSTM

BATCH, STEPS, INPUT_SIZE, HIDDEN_SIZE = 32, 40, 128, 128
THREADS = 1  # torch.utils.benchmark's default: both sides single-threaded, as recorded in the CSV


def fwd_bwd_timer(module: nn.Module, x: torch.Tensor) -> Timer:
    module.train()
    grad = torch.randn(x.shape[0], x.shape[1], module.hidden_size)
    return Timer(
        "torch.autograd.grad(m(x)[0], [x, *m.parameters()], grad)",
        globals={"m": module, "x": x, "grad": grad, "torch": torch},
        num_threads=THREADS,
    )


def run(quick: bool, norms: tuple[str, ...] = NORMS) -> list[dict]:
    rounds, min_run_time = (3, 0.2) if quick else (7, 0.5)
    x = torch.randn(BATCH, STEPS, INPUT_SIZE, requires_grad=True)
    baseline = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, batch_first=True)
    rows = []
    for norm in norms:
        ours = NormLSTM.from_torch(baseline, norm=norm, max_steps=STEPS)
        timers = (fwd_bwd_timer(baseline, x), fwd_bwd_timer(ours, x))
        samples = ([], [])
        for _ in range(rounds):
            for i, t in enumerate(timers):
                samples[i].append(median_ms(t, min_run_time))
        torch_ms, ours_ms = min(samples[0]), min(samples[1])
        rows.append(
            {
                "norm": norm,
                "shape": f"N{BATCH}xT{STEPS}xI{INPUT_SIZE}xH{HIDDEN_SIZE}",
                "torch_ms": round(torch_ms, 3),
                "normlab_ms": round(ours_ms, 3),
                "ratio": round(ours_ms / torch_ms, 3),
            }
        )
        print(
            f"NormLSTM(norm={norm!r:12s}) torch.nn.LSTM {torch_ms:8.2f} ms  normlab {ours_ms:8.2f} ms  "
            f"ratio {ours_ms / torch_ms:5.2f}",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), help="norm options to time")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_rnn.csv")
    args = parser.parse_args(argv)
    env = cpu_env(threads=THREADS)
    print(
        f"one layer, batch {BATCH}, T = {STEPS}, input size {INPUT_SIZE}, hidden {HIDDEN_SIZE}, float32, "
        "forward + backward (input and parameter gradients), fastest of alternating rounds",
        flush=True,
    )
    rows = run(args.quick, tuple(args.norms))
    print("\n| NormLSTM norm | torch.nn.LSTM ms | NormLSTM ms | NormLSTM / torch |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['norm']} | {r['torch_ms']:.2f} | {r['normlab_ms']:.2f} | {r['ratio']:.2f}x |")
    write_csv(args.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
