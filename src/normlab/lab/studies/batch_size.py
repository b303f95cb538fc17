"""Study ``batch-size``: test error against the per-device batch size, for BatchNorm and the norms meant to replace it.

The claim under test (Wu & He 2018, "Group Normalization", arXiv 1803.08494, Figure 1 and Table 2; Ioffe 2017,
arXiv 1702.03275; Singh & Krishnan 2020, arXiv 1911.09737): BatchNorm's error grows as the per-device batch
shrinks, because its batch statistics get noisy and stop matching the running statistics used at test time, while
norms whose statistics do not involve the batch (GN, GN+WS, LN, IN, FRN, EvoNorm-S0) or that replace them with
running estimates (Batch Renorm, MABN, Online Norm) change little.

Protocol (the Group Normalization paper's; one run per norm x batch size x seed, written by
:func:`normlab.lab.trainer.sweep`, so a killed study resumes where it stopped):

* every batch size trains for the same number of epochs over the same training set (the number of steps grows as
  the batch shrinks);
* SGD, momentum 0.9, weight decay 1e-4 (the paper's), on every parameter;
* linear learning-rate scaling: ``lr = 0.1 * B / 32`` for per-device batch B (the paper's rule), linear warm-up
  from 0 over the first ``warmup_epochs`` (Goyal et al. 2017, arXiv 1706.02677), then cosine decay to 0 per step;
* each residual block's last norm starts with weight 0 where it has one (Goyal et al. 2017, as in the paper);
* no gradient clipping, no data augmentation; a run whose loss stops being finite is recorded as diverged;
* test error (%) in eval mode after the last epoch, as a deployed model runs.

Levels (``--norms`` selects any subset of :data:`NORMS`, or other factory specs; ``--seeds N`` runs seeds 0..N-1):

=======  =================================================================================================
smoke    MNIST-1D generated locally (``mnist1d``; always available): 300 samples (240 train, 60 test),
         :class:`~normlab.lab.models.CNN1d` with widths (8, 8, 16); 1 epoch, warm-up 0.25 epoch;
         batch sizes (2, 8); norms bn, gn; 1 seed. Seconds; for tests, not for conclusions.
quick    Fashion-MNIST (IDX files on disk; ``DataNotFoundError`` if absent): a class-balanced subset of 20000
         training images (subset seed 0, the same for every run) and all 10000 test images;
         :class:`~normlab.lab.models.SmallCNN` with widths (16, 32, 64, 64) (task ``fashion-cnn``); 2 epochs,
         warm-up 0.5 epoch; batch sizes (2, 8, 32); norms bn, gn, gn+ws, frn, online, none; 1 seed. This is
         normlab's CPU reference protocol (a small 4-layer CNN, 20k images, 2 epochs): enough steps that the
         batch-32 runs train to convergence (an earlier 2,000-image, 3-epoch protocol left them under-trained, so
         every norm looked better at batch 2). About 4-5 minutes with ``jobs=2`` on a 2-core machine (the batch-2
         runs dominate: 20000 steps each). The full norm list at this level:
         ``--norms bn brn mabn gn gn+ws ln in frn evo_s0 online none`` (the batch sizes stay (2, 8, 32)).
full     Fashion-MNIST, all 60000 training and 10000 test images; SmallResNet with widths (16, 32, 64), two
         blocks per stage; 30 epochs, warm-up 2 epochs; batch sizes (2, 4, 8, 16, 32); all eleven norms of
         :data:`NORMS`; 3 seeds (165 runs). The GPU-scale protocol: not run on CPU.
=======  =================================================================================================

``gn`` and ``evo_s0`` take the models' default group count (min(32, C // 2) groups, see
:func:`normlab.lab.models.default_num_groups`), ``frn`` and ``evo_s0`` replace norm + ReLU as in their papers, and
``+ws`` builds the convolutions with weight standardization. Results: one run folder per run (config.json,
env.json, metrics.jsonl) in the study folder, plus ``protocol.json`` (the level of the last invocation, whose runs
the summary tables). The summary table has one row per norm and one column per batch size, cells "mean ± std"
over seeds (std with ddof=1; a single seed shows the mean alone).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ...functional._checks import check_positive_int, unknown_name_error
from ..models import check_norm
from ..runs import RunStore
from ..trainer import TrainConfig, sweep
from . import LEVELS, Study, Summary

__all__ = ["STUDY", "NORMS", "PROTOCOLS", "Protocol", "make_configs", "load_split", "DataSource"]

NAME = "batch-size"

NORMS = ("bn", "brn", "mabn", "gn", "gn+ws", "ln", "in", "frn", "evo_s0", "online", "none")
"""The issue's norms, in the order of the table."""

# What the acceptance check compares: BatchNorm's loss at batch 2, and the alternatives' stability.
_ALTERNATIVES = ("gn", "gn+ws", "frn", "online")


@dataclass(frozen=True)
class Protocol:
    """The training protocol of one level (see the module docstring)."""

    task: str
    data: dict
    model: dict
    epochs: int
    warmup_epochs: float
    batch_sizes: tuple[int, ...]
    norms: tuple[str, ...]
    seeds: int
    base_lr: float = 0.1
    base_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_every: int | None = None  # None: only after the last epoch

    def config(self, norm: str, batch_size: int, seed: int) -> TrainConfig:
        """The run of ``norm`` at per-device ``batch_size`` with ``seed``."""
        return TrainConfig(
            self.task,
            norm,
            batch_size=batch_size,
            seed=seed,
            epochs=self.epochs,
            base_lr=self.base_lr,
            base_batch=self.base_batch,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            schedule="cosine",
            eval_every=self.eval_every or self.epochs,
            model=dict(self.model),
            data=dict(self.data),
        )


PROTOCOLS = {
    "smoke": Protocol(
        task="mnist1d",
        data={"dataset": "mnist1d", "num_samples": 300, "seed": 0},
        model={"widths": (8, 8, 16)},
        epochs=1,
        warmup_epochs=0.25,
        batch_sizes=(2, 8),
        norms=("bn", "gn"),
        seeds=1,
    ),
    "quick": Protocol(
        task="fashion-cnn",
        data={"dataset": "fashion", "train_size": 20000, "test_size": None, "subset_seed": 0},
        model={"widths": (16, 32, 64, 64)},
        epochs=2,
        warmup_epochs=0.5,
        batch_sizes=(2, 8, 32),
        norms=("bn", "gn", "gn+ws", "frn", "online", "none"),
        seeds=1,
    ),
    "full": Protocol(
        task="fashion",
        data={"dataset": "fashion", "train_size": None, "test_size": None, "subset_seed": 0},
        model={"widths": (16, 32, 64), "blocks": (2, 2, 2), "zero_init_residual": True},
        epochs=30,
        warmup_epochs=2.0,
        batch_sizes=(2, 4, 8, 16, 32),
        norms=NORMS,
        seeds=3,
        eval_every=1,
    ),
}
"""The protocol of each level."""


# ----------------------------------------------------------------------------------------------------- options


def check_level(owner: str, level) -> str:
    if level not in LEVELS:
        raise ValueError(f"{owner}: {unknown_name_error('level', str(level), LEVELS)} (got {level!r})")
    return level


def check_norms(owner: str, norms, task: str, valid) -> tuple[str, ...]:
    """``norms`` as a tuple without duplicates; each must be a spec that ``task``'s model takes.

    An unknown one raises ValueError naming it and listing the study's norms (any other factory spec the model
    takes is accepted too: ``gn:8``, ``ghost_bn:4``, ...).
    """
    if isinstance(norms, str) or not isinstance(norms, (list, tuple)) or not norms:
        raise ValueError(f"{owner}: norms={norms!r} must be a non-empty list of norm specs, e.g. {list(valid)[:3]}")
    checked: list[str] = []
    for norm in norms:
        if not isinstance(norm, str):
            raise ValueError(f"{owner}: norm {norm!r} must be a string spec, e.g. 'bn' or 'gn+ws'")
        try:
            check_norm(task, norm)
        except ValueError:
            hint = unknown_name_error("norm", norm, valid)
            raise ValueError(
                f"{owner}: {hint}. Other normlab factory specs the {task} model takes are accepted too "
                "(see normlab.list_norms(); add '+ws' for weight-standardized convolutions)"
            ) from None
        if norm not in checked:
            checked.append(norm)
    return tuple(checked)


def check_seeds(owner: str, seeds, default: int) -> int:
    return default if seeds is None else check_positive_int(owner, "seeds", seeds)


# -------------------------------------------------------------------------------------------------------- data


def load_split(data: dict, data_dir=None):
    """``((x_train, y_train), (x_test, y_test))`` for a protocol's data options, in the task model's layout."""
    from ..data import as_signal, load_fashion_mnist, load_mnist1d

    if data["dataset"] == "mnist1d":
        d = load_mnist1d(seed=data["seed"], num_samples=data["num_samples"])
        return (as_signal(d.x_train), d.y_train), (as_signal(d.x_test), d.y_test)
    if data["dataset"] == "fashion":
        seed = data["subset_seed"]
        train = load_fashion_mnist("train", data_dir, limit=data["train_size"], seed=seed)
        test = load_fashion_mnist("test", data_dir, limit=data["test_size"], seed=seed)
        return train, test
    raise ValueError(f"load_split: unknown dataset {data['dataset']!r} (expected 'mnist1d' or 'fashion')")


class DataSource:
    """``data(config)`` for :func:`normlab.lab.trainer.sweep`: loads each distinct ``config.data`` once, with
    ``load(data, data_dir)`` (default: this study's :func:`load_split`; a module-level function, so that the source
    pickles into ``jobs`` workers)."""

    def __init__(self, data_dir=None, load: Callable[[dict, object], tuple] | None = None) -> None:
        self.data_dir = data_dir
        self.load = load_split if load is None else load
        self._cache: dict[str, tuple] = {}

    def __call__(self, config: TrainConfig):
        return self.split(config.data)

    def split(self, data: dict):
        key = json.dumps(data, sort_keys=True)
        if key not in self._cache:
            self._cache[key] = self.load(data, self.data_dir)
        return self._cache[key]


# --------------------------------------------------------------------------------------------------------- run


def make_configs(level: str, norms=None, seeds=None) -> list[TrainConfig]:
    """The runs of the study at ``level``: seed-major (every norm and batch size of seed 0 first), so an
    interrupted sweep leaves complete seeds behind."""
    owner = NAME
    protocol = PROTOCOLS[check_level(owner, level)]
    norms = check_norms(owner, protocol.norms if norms is None else norms, protocol.task, NORMS)
    seeds = check_seeds(owner, seeds, protocol.seeds)
    return [
        protocol.config(norm, batch_size, seed)
        for seed in range(seeds)
        for norm in norms
        for batch_size in protocol.batch_sizes
    ]


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(
    out, *, level: str = "quick", norms=None, seeds=None, quiet=False, echo=print, data_dir=None, jobs: int = 1
) -> None:
    """Train every run of the study at ``level`` not yet finished in ``out`` (see the module docstring).

    Under ``torchrun`` (a process group initialized, e.g. by :func:`normlab.lab.trainer.init_distributed`) every
    rank calls this; each run is then data-parallel over the ranks with the protocol's batch size per rank, and
    rank 0 writes the files.

    Raises:
        ValueError: for an unknown level or norm, seeds < 1, or an ``out`` folder holding something else.
        DataNotFoundError: at ``quick`` / ``full`` when Fashion-MNIST is not on disk.
    """
    configs = make_configs(level, norms, seeds)
    protocol = PROTOCOLS[level]
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if rank == 0:
        store = RunStore(out, study=NAME)
        write_json(
            store.root / "protocol.json",
            {
                "study": NAME,
                "level": level,
                "norms": list(dict.fromkeys(c.norm for c in configs)),
                "batch_sizes": list(protocol.batch_sizes),
                "seeds": sorted({c.seed for c in configs}),
                "runs": [c.name for c in configs],
                "world_size": dist.get_world_size() if distributed else 1,
            },
        )
    if distributed:
        dist.barrier()  # the store exists before the other ranks open it
    store = RunStore(out, study=NAME)
    result = sweep(configs, store, DataSource(data_dir), quiet=quiet or rank > 0, echo=echo, jobs=jobs)
    if not quiet and rank == 0:
        echo(f"{NAME}: {len(result.trained)} runs trained, {len(result.skipped)} found finished, in {store.root}")


# ----------------------------------------------------------------------------------------------------- results


def _finished(out) -> tuple[RunStore, str | None, list[tuple[dict, list[dict], dict]]]:
    """The store, the level summarized, and (config, metrics, env) of its finished runs at that level."""
    if not (Path(out) / "study.json").is_file():
        raise ValueError(f"{NAME}: {str(out)!r} holds no {NAME} results (no study.json); run the study first")
    store = RunStore(out, study=NAME)
    runs = [(*store.load(name), store.load_env(name)) for name in store.done_runs()]
    level, world = None, 1
    path = store.root / "protocol.json"
    if path.is_file():
        written = json.loads(path.read_text())
        level, world = written.get("level"), written.get("world_size", 1)
    if level in PROTOCOLS:
        protocol = PROTOCOLS[level]
        fixed = protocol.config("none", 1, 0).to_dict()
        wanted = {k: v for k, v in fixed.items() if k not in ("norm", "batch_size", "seed", "world_size")}
        wanted["world_size"] = world  # the per-device batch means something else at another world size
        runs = [r for r in runs if all(r[0].get(k) == v for k, v in wanted.items())]
    return store, level, runs


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def collect(out) -> dict:
    """The study's results from its files: ``{"level", "errors": {norm: {batch: [error per seed]}}, "seeds":
    {norm: {batch: [seed, ...]}}, "diverged": [run names], "env": one run's env.json, "train_s": total}``."""
    _, level, runs = _finished(out)
    errors: dict[str, dict[int, list[float]]] = {}
    seeds: dict[str, dict[int, list[int]]] = {}
    diverged, train_s = [], 0.0
    for config, metrics, _env in sorted(runs, key=lambda r: (r[0]["seed"], r[0]["batch_size"])):
        last = next((row for row in reversed(metrics) if "test_error" in row), None)
        if last is None:
            continue
        norm, batch = config["norm"], config["batch_size"]
        errors.setdefault(norm, {}).setdefault(batch, []).append(last["test_error"])
        seeds.setdefault(norm, {}).setdefault(batch, []).append(config["seed"])
        train_s += sum(row.get("time_s", 0.0) for row in metrics)
        if any(row.get("diverged") for row in metrics):
            diverged.append(f"{norm} b{batch} s{config['seed']}")
    order = [n for n in NORMS if n in errors] + sorted(n for n in errors if n not in NORMS)
    return {
        "level": level,
        "errors": {n: dict(sorted(errors[n].items())) for n in order},
        "seeds": {n: dict(sorted(seeds[n].items())) for n in order},
        "diverged": diverged,
        "env": runs[0][2] if runs else {},
        "train_s": train_s,
    }


def _acceptance_notes(errors: dict) -> list[str]:
    notes = []

    def change(norm: str) -> tuple[float, int] | None:
        by_batch = errors.get(norm, {})
        if 2 not in by_batch or 32 not in by_batch:
            return None
        # paired by seed where both finished
        return statistics.fmean(by_batch[2]) - statistics.fmean(by_batch[32]), min(len(by_batch[2]), len(by_batch[32]))

    bn = change("bn")
    if bn is not None:
        verdict = "met" if bn[0] >= 2.0 else "not met"
        notes.append(
            f"BatchNorm: test error at batch 2 minus batch 32 = {bn[0]:+.2f} points (mean over seeds). The "
            f"literature's effect (at least 2 points worse at batch 2): {verdict}."
        )
    for norm in _ALTERNATIVES:
        c = change(norm)
        if c is not None:
            verdict = "within" if abs(c[0]) < 1.0 else "outside"
            notes.append(f"{norm}: batch 2 minus batch 32 = {c[0]:+.2f} points ({verdict} the 1-point band).")
    if 32 in errors.get("bn", {}):
        bn32 = statistics.fmean(errors["bn"][32])
        at2 = {n: statistics.fmean(b[2]) for n, b in errors.items() if n != "bn" and 2 in b}
        if at2:
            best = min(at2, key=at2.get)
            notes.append(
                f"Best alternative at batch 2: {best} at {at2[best]:.2f}% vs BatchNorm at batch 32 {bn32:.2f}% "
                f"({at2[best] - bn32:+.2f} points; stretch goal, at most 0.5 points worse: "
                f"{'met' if at2[best] - bn32 <= 0.5 else 'not met'})."
            )
    return notes


def summarize(out) -> Summary:
    """Rows = norms, columns = batch sizes, cells "mean ± std" of the test error (%) over seeds."""
    res = collect(out)
    errors = res["errors"]
    batches = sorted({b for by_batch in errors.values() for b in by_batch})
    rows = [[norm] + [format_mean_std(errors[norm].get(b, [])) for b in batches] for norm in errors]
    seed_counts = sorted({len(s) for by_batch in res["seeds"].values() for s in by_batch.values()})
    env = res["env"]
    level = res["level"] or "?"
    notes = [
        f"Test error (%) in eval mode after training, {level} level; per-device batch size in the columns; mean ± "
        f"std over seeds (seeds per cell: {', '.join(map(str, seed_counts)) or 'none'}).",
    ]
    if level in PROTOCOLS:
        p = PROTOCOLS[level]
        notes.append(
            f"Protocol: {p.task} ({_describe_data(p.data)}), model {p.model}, {p.epochs} epochs at every batch size, "
            f"SGD momentum {p.momentum}, weight decay {p.weight_decay}, lr = {p.base_lr} x B / {p.base_batch} with "
            f"{p.warmup_epochs}-epoch linear warm-up then cosine decay (Wu & He 2018)."
        )
    world = env.get("world_size", 1) if env else 1
    if world > 1:
        notes.append(
            f"Data-parallel over {world} processes ({env.get('backend')}): the batch size is per process, the lr "
            f"scales with the global batch (B x {world}); BatchNorm's statistics are each process's own."
        )
    if env:
        notes.append(
            f"Machine: {env.get('device_name')} ({env.get('device')}, torch threads: {env.get('torch_threads')}), "
            f"torch {env.get('torch')}; total training time {res['train_s'] / 60:.1f} min."
        )
    if res["diverged"]:
        notes.append(f"Diverged runs (their final error is included as measured): {', '.join(res['diverged'])}.")
    notes += _acceptance_notes(errors)
    return Summary(
        title="Test error vs per-device batch size",
        columns=["norm"] + [f"B={b}" for b in batches],
        rows=rows,
        notes=notes,
        data={k: res[k] for k in ("level", "errors", "seeds", "diverged", "train_s")},
    )


def _describe_data(data: dict) -> str:
    if data["dataset"] == "mnist1d":
        return f"MNIST-1D, {data['num_samples']} samples"
    train = "all" if data["train_size"] is None else data["train_size"]
    test = "all" if data["test_size"] is None else data["test_size"]
    return f"Fashion-MNIST, {train} train / {test} test images"


def plot(out) -> list[Path]:
    """``batch_size.png``: test error vs batch size (log2 axis), one line per norm, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = collect(out)
    errors = res["errors"]
    if not errors:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = sorted({b for by_batch in errors.values() for b in by_batch})
    for norm, by_batch in errors.items():
        xs = sorted(by_batch)
        stats = [mean_std(by_batch[b]) for b in xs]
        ax.errorbar(
            xs, [m for m, _ in stats], yerr=[s or 0.0 for _, s in stats], marker="o", capsize=3, label=norm,
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("per-device batch size")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Test error vs batch size ({res['level'] or '?'} level)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(out) / "batch_size.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


STUDY = Study(
    NAME, run, summarize, plot, "test error vs per-device batch size (2..32) for BatchNorm and its alternatives"
)
