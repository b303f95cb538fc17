"""``normlab demo``: BatchNorm vs GroupNorm at per-device batch sizes 32 and 2, in about a minute on 2 CPU cores.

A tiny CNN learns generated 16x16 images (class templates under random shifts, contrast, brightness and noise),
trained for the same number of epochs at each batch size with the learning rate scaled linearly with the batch
(the Group Normalization paper's protocol, with warm-up and cosine decay). Test error is measured in eval mode, as
a deployed model runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..factory import get_norm_layer

__all__ = ["DemoConfig", "make_images", "TinyCNN", "train_and_test", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    norms: tuple[str, ...] = ("bn", "gn:8")
    batch_sizes: tuple[int, ...] = (32, 2)
    train_size: int = 2000
    test_size: int = 2000
    epochs: int = 8
    base_lr: float = 0.1  # at batch 32; scaled linearly with the batch size
    clip_grad_norm: float = 2.0  # keeps the first steps at the largest learning rate from diverging
    seed: int = 0


def make_images(n: int, *, seed: int, num_classes: int = 10, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated classification data: (n, 1, size, size) images and (n,) labels, reproducible from ``seed``.

    Each class is a fixed low-frequency template (a sum of random 2-D sinusoids, the same for every seed); a sample
    is its template rolled by up to 3 pixels, multiplied by a random contrast, shifted by a random brightness and
    buried in Gaussian noise, so that the per-sample scale varies the way real images do.
    """
    templates = _templates(num_classes, size)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=g)
    x = templates[labels]
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(a), int(b)), dims=(-2, -1)) for img, (a, b) in zip(x, shifts)])
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.3, 2.0, generator=g)
    brightness = torch.empty(n, 1, 1, 1).normal_(0.0, 1.5, generator=g)
    noise = torch.randn(x.shape, generator=g)
    return x * contrast + brightness + noise, labels


def _templates(num_classes: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.zeros(num_classes, 1, size, size)
    for k in range(num_classes):
        for _ in range(3):
            fy, fx = torch.randint(1, 4, (2,), generator=g).tolist()
            phase = float(torch.rand(1, generator=g)) * 2 * math.pi
            out[k, 0] += torch.sin(2 * math.pi * (fy * yy + fx * xx) + phase)
    return out / out.flatten(1).std(1).view(-1, 1, 1, 1)


class TinyCNN(nn.Module):
    """Three conv-norm-ReLU blocks (16, 32, 64 channels; 16x16 -> 4x4), then a head of a 4x4 convolution (a linear
    layer on the flattened features), a norm, ReLU and a 1x1 convolution. The head's norm sees one value per sample
    and channel, as in classifier and projection heads, which is where small batches hurt BatchNorm most."""

    def __init__(self, norm: str, num_classes: int = 10) -> None:
        super().__init__()
        norm_layer = get_norm_layer(norm)
        widths = [1, 16, 32, 64]
        blocks = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            blocks += [
                nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                norm_layer(cout),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(widths[-1], 64, 4, bias=False),
            norm_layer(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten(1)


def _warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (Goyal et al. 2017's recipe for
    large learning rates, which linear scaling gives the larger batches)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_and_test(norm: str, batch_size: int, cfg: DemoConfig, data) -> float:
    """Train TinyCNN with ``norm`` at ``batch_size``; return its test error (%) in eval mode."""
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(cfg.seed)
    model = TinyCNN(norm)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.base_lr * batch_size / 32, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // batch_size
    sched = _warmup_cosine(opt, warmup=steps_per_epoch, total=cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(xb).argmax(1) != yb).sum()) for xb, yb in zip(x_test.split(500), y_test.split(500)))
    return 100.0 * wrong / len(x_test)


def run_demo(cfg: DemoConfig = DemoConfig(), echo=print) -> dict[tuple[str, int], float]:
    """Run every (norm, batch size) pair of ``cfg``, print a table and return {(norm, batch): test error %}."""
    data = (make_images(cfg.train_size, seed=cfg.seed + 1), make_images(cfg.test_size, seed=cfg.seed + 2))
    echo(
        f"normlab demo: TinyCNN on generated 16x16 images ({cfg.train_size} train / {cfg.test_size} test), "
        f"{cfg.epochs} epochs, lr {cfg.base_lr} x batch/32, test error in eval mode"
    )
    results = {}
    for norm in cfg.norms:
        for bs in cfg.batch_sizes:
            start = time.perf_counter()
            results[norm, bs] = train_and_test(norm, bs, cfg, data)
            seconds = time.perf_counter() - start
            echo(f"  {norm:>6} batch {bs:>3}: test error {results[norm, bs]:5.1f}%  ({seconds:.0f} s)")
    header = "norm".ljust(8) + "".join(f"batch {bs}".rjust(10) for bs in cfg.batch_sizes)
    echo("\n" + header)
    for norm in cfg.norms:
        echo(norm.ljust(8) + "".join(f"{results[norm, bs]:9.1f}%" for bs in cfg.batch_sizes))
    echo(
        "\nBatchNorm normalizes with the statistics of the batch: at batch 2 they are those of two samples (in the "
        "head, two values per channel), so\ntraining sees a function that the running averages used in eval do not "
        "reproduce. GroupNorm's statistics are per sample: the batch size\ndoes not change them."
    )
    return results


def run_lab_demo(out=None, *, level: str = "quick", quiet: bool = False, echo=print, data_dir=None, jobs: int = 1):
    """Run every study of the lab at ``level`` into ``out`` (default ``runs/<timestamp>``) and write its report.

    Each study gets its own sub-folder, so an interrupted demo resumes where it stopped when given the same
    ``out``. ``jobs`` training processes run at once (the speed study always runs alone). Returns the path of
    report.md.
    """
    from pathlib import Path

    from .report import write_report
    from .studies import get_study, list_studies

    out = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    for name in list_studies():
        start = time.perf_counter()
        echo(f"\n== study {name} ({level}) ==")
        get_study(name).run(out / name, level=level, quiet=quiet, echo=echo, data_dir=data_dir, jobs=jobs)
        echo(f"== {name}: {time.perf_counter() - start:.0f} s")
    return write_report(out, echo=echo)
