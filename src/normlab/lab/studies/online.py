"""Study ``online``: prequential (test-then-train) accuracy over a stream of small, variable batches with a
distribution shift half-way.

The claim under test (Chiley et al. 2019, "Online Normalization for Training Neural Networks", arXiv 1905.05894;
Ioffe 2017, "Batch Renormalization", arXiv 1702.03275): BatchNorm needs a batch to compute statistics, so it cannot
learn from one sample at a time, and what it learns depends on the batch; normalizers that keep running estimates
(Online Normalization) or per-sample statistics (LayerNorm, GroupNorm) learn from any batch, 1 included.

The stream (:func:`normlab.lab.data.synthetic_stream`): 10 Gaussian classes in 32 dimensions (class means of norm 3
in seeded random directions, unit noise), each step's batch size drawn uniformly from 1..16, and from step
``floor(0.5 * num_batches)`` on a covariate shift ``x -> x + 2 d`` with one fixed ``d ~ N(0, I)`` (every feature
moves by about two noise standard deviations; the classes keep their structure). Stream and initialisation are
seeded with the run's seed.

The model: :class:`normlab.lab.models.MLP` (``build_model("stream-mlp", norm)``), linear-norm-ReLU layers, trained
by plain SGD (momentum 0.9, no weight decay, constant learning rate 0.02) on the mean cross-entropy of each batch.

Test-then-train, precisely. At every step t, with the batch ``(x_t, y_t)`` of ``B_t`` samples:

1. **test**: the model predicts ``x_t`` in **eval mode**, without gradient, changing nothing: BatchNorm and Batch
   Renorm normalize with their running statistics, Online Normalization with its stream state as it stands
   (without advancing it), LayerNorm, GroupNorm and the unnormalized net are the same in both modes. Each sample
   scores 1 if its arg-max class is its label. Eval mode is how a deployed model predicts: a sample's prediction
   must not depend on the other samples that happen to arrive with it (train-mode BatchNorm would be transductive,
   and undefined for a batch of one);
2. **train**: one SGD step on the batch in **train mode**: batch statistics for BatchNorm / Batch Renorm (which
   also update their running statistics, momentum 0.1), the stream state advanced sample by sample for Online
   Normalization (its control process runs in the backward pass).

Batches of one: a norm whose layers refuse one sample in training (BatchNorm and Batch Renorm: one value per
channel has no variance; found by trying a batch of one on a copy of the model before the stream starts, so any
other such spec, e.g. ``mabn``, is handled the same way) **skips the train step** of every step with ``B_t = 1``:
those samples are still predicted and scored, but nothing is learnt from them (no parameter update, no
running-statistics update). This is the only way BatchNorm can run on this stream; the number of skipped steps and
samples is recorded and shown (about 1 step in 16). Every other norm trains on every step.

Reported (from the per-step records): accuracy (%) over the samples of the steps before the shift, from the shift
on, in the first 10 % of the stream after the shift (the recovery window), and overall; the mean ± std over seeds
(std with ddof=1; one seed shows the mean alone). Plot ``online.png``: running accuracy over the stream, in a
trailing window of ``num_batches / 40`` steps and cumulative, mean over seeds, the shift marked.

Levels (``--norms`` takes any factory spec the MLP takes; ``--seeds N`` runs seeds 0..N-1):

=======  =================================================================================================
smoke    60 steps, MLP hidden (32,); the six norms; 1 seed. Seconds; for tests, not for conclusions.
quick    3000 steps (about 25 000 samples), MLP hidden (128, 128); norms bn, brn, online, ln, gn:8, none;
         1 seed. Under half a minute on 2 CPU cores.
full     20 000 steps, MLP hidden (256, 256); the same six norms; 5 seeds. CPU as well: batches of 1..16
         samples gain nothing from a GPU.
=======  =================================================================================================

``gn:8`` is GroupNorm with 8 groups (16 features each at width 128). Plain ``"gn"`` in the MLP takes the models'
default of ``min(32, C // 2)`` groups, i.e. pairs of features, and a GroupNorm over two values maps them to -1 and
+1: it keeps only the sign of their difference and learns nothing useful (chance accuracy in our runs), so the
study uses ``gn:8``. At smoke and quick the stream runs on one torch thread: batches of 1..16 samples are too small
to split, and two threads on a shared 2-core machine were up to 100 times slower (spin-waiting) in our
measurements; env.json records the threads.

Results: one run folder per (norm, seed) in the study folder (config.json, env.json, metrics.jsonl with one row
per step: ``step``, ``batch_size``, ``correct``, ``loss`` (the test loss before training on the batch),
``updated``, ``time_s``), written atomically, so a killed study resumes with the unfinished runs; and
``protocol.json`` (the level of the last invocation, whose runs the summary tables).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...functional._checks import check_positive_int
from ..data import shift_index, synthetic_stream
from ..models import build_model
from ..runs import RunStore, env_info, run_name
from ..trainer import make_progress, map_in_workers
from . import Study, Summary, torch_threads
from .batch_size import check_level, check_norms, check_seeds, format_mean_std, write_json

__all__ = ["STUDY", "NORMS", "PROTOCOLS", "Protocol", "run_stream", "stream_accuracy", "torch_threads"]

NAME = "online"
TASK = "stream-mlp"

NORMS = ("bn", "brn", "online", "ln", "gn:8", "none")
"""The issue's norms, in the order of the table (``gn:8``: see the module docstring)."""


@dataclass(frozen=True)
class Protocol:
    """The stream, model and optimizer of one level (see the module docstring)."""

    num_batches: int
    hidden: tuple[int, ...]
    norms: tuple[str, ...]
    seeds: int
    num_classes: int = 10
    dim: int = 32
    batch_sizes: tuple[int, int] = (1, 16)
    shift_at: float = 0.5
    shift_scale: float = 2.0
    shift_gain: float = 1.0
    separation: float = 3.0
    lr: float = 0.02
    momentum: float = 0.9
    recovery: float = 0.1  # the window after the shift reported on its own, as a fraction of the stream
    threads: int | None = 1  # torch intra-op threads while streaming (None: as the caller set them)

    @property
    def shift_step(self) -> int:
        return shift_index(self.num_batches, self.shift_at)

    @property
    def recovery_steps(self) -> int:
        return max(1, math.ceil(self.recovery * self.num_batches))

    def config(self, norm: str, seed: int, level: str) -> dict:
        """config.json of the run of ``norm`` with ``seed``: everything that determines its result."""
        return {
            "study": NAME,
            "level": level,
            "protocol": "test-then-train",
            "norm": norm,
            "seed": seed,
            "stream": {
                "num_classes": self.num_classes,
                "dim": self.dim,
                "num_batches": self.num_batches,
                "batch_sizes": list(self.batch_sizes),
                "shift_at": self.shift_at,
                "shift_step": self.shift_step,
                "shift_scale": self.shift_scale,
                "shift_gain": self.shift_gain,
                "separation": self.separation,
            },
            "model": {
                "task": TASK,
                "in_features": self.dim,
                "hidden": list(self.hidden),
                "num_classes": self.num_classes,
            },
            "optimizer": {"name": "sgd", "lr": self.lr, "momentum": self.momentum, "weight_decay": 0.0},
            "recovery_steps": self.recovery_steps,
        }


PROTOCOLS = {
    "smoke": Protocol(num_batches=60, hidden=(32,), norms=NORMS, seeds=1),
    "quick": Protocol(num_batches=3000, hidden=(128, 128), norms=NORMS, seeds=1),
    "full": Protocol(num_batches=20000, hidden=(256, 256), norms=NORMS, seeds=5, threads=None),
}
"""The protocol of each level."""


# ------------------------------------------------------------------------------------------------------ stream


def _trains_on_one_sample(model: torch.nn.Module, in_features: int) -> bool:
    """Whether ``model`` accepts a training forward on one sample (BatchNorm-like layers refuse it); tried on a copy,
    so the model's state is untouched."""
    probe = copy.deepcopy(model).train()
    try:
        with torch.no_grad():
            probe(torch.zeros(1, in_features))
    except ValueError:
        return False
    return True


def run_stream(config: dict, log=None, advance=None) -> list[dict]:
    """Run one test-then-train pass over the stream that ``config`` (a :meth:`Protocol.config`) describes.

    Args:
        config: the run's config.
        log: called as ``log(**row)`` with each step's row (e.g. :meth:`normlab.lab.runs.Run.log`).
        advance: called once per step (a progress bar).

    Returns:
        The rows, one per step: ``step``, ``batch_size``, ``correct`` (samples predicted right before training on
        them), ``loss`` (their mean cross-entropy, eval mode), ``updated`` (whether the train step ran),
        ``time_s`` (since the start).
    """
    stream, opt = config["stream"], config["optimizer"]
    model_kwargs = {k: v for k, v in config["model"].items() if k != "task"}
    started = time.perf_counter()
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        model = build_model(config["model"]["task"], config["norm"], **model_kwargs)
    trains_on_one = _trains_on_one_sample(model, model_kwargs["in_features"])
    optimizer = torch.optim.SGD(
        model.parameters(), lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"]
    )
    batches = synthetic_stream(
        num_classes=stream["num_classes"],
        dim=stream["dim"],
        num_batches=stream["num_batches"],
        batch_sizes=tuple(stream["batch_sizes"]),
        shift_at=stream["shift_at"],
        shift_scale=stream["shift_scale"],
        shift_gain=stream["shift_gain"],
        separation=stream["separation"],
        seed=config["seed"],
    )
    for step, (x, y) in enumerate(batches):
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            correct = int((logits.argmax(1) == y).sum())
        updated = trains_on_one or len(y) > 1
        if updated:
            model.train()
            train_loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            train_loss.backward()
            optimizer.step()
        row = {
            "step": step,
            "batch_size": len(y),
            "correct": correct,
            "loss": float(loss),
            "updated": updated,
            "time_s": time.perf_counter() - started,
        }
        rows.append(row)
        if log is not None:
            log(**row)
        if advance is not None:
            advance()
    return rows


def stream_accuracy(rows: list[dict], shift_step: int, recovery_steps: int) -> dict:
    """Accuracy (%) of the per-step rows before the shift, from it on, in the recovery window and overall, plus the
    skipped train steps and samples, the steps with a non-finite loss, and the run time.

    Example:
        >>> from normlab.lab.studies.online import stream_accuracy
        >>> rows = [{"step": 0, "batch_size": 2, "correct": 2, "loss": 0.1, "updated": True},
        ...         {"step": 1, "batch_size": 1, "correct": 0, "loss": 2.0, "updated": False},
        ...         {"step": 2, "batch_size": 1, "correct": 1, "loss": 0.5, "updated": True}]
        >>> r = stream_accuracy(rows, shift_step=1, recovery_steps=1)
        >>> r["before"], r["after"], r["recovery"], round(r["overall"], 1), r["skipped_steps"]
        (100.0, 50.0, 0.0, 75.0, 1)
    """

    def accuracy(selected: list[dict]) -> float | None:
        samples = sum(r["batch_size"] for r in selected)
        return 100.0 * sum(r["correct"] for r in selected) / samples if samples else None

    after = [r for r in rows if r["step"] >= shift_step]
    return {
        "before": accuracy([r for r in rows if r["step"] < shift_step]),
        "after": accuracy(after),
        "recovery": accuracy([r for r in after if r["step"] < shift_step + recovery_steps]),
        "overall": accuracy(rows),
        "steps": len(rows),
        "samples": sum(r["batch_size"] for r in rows),
        "skipped_steps": sum(1 for r in rows if not r["updated"]),
        "skipped_samples": sum(r["batch_size"] for r in rows if not r["updated"]),
        "nonfinite_steps": sum(1 for r in rows if not math.isfinite(r["loss"])),
        "run_s": rows[-1].get("time_s", 0.0) if rows else 0.0,
    }


# --------------------------------------------------------------------------------------------------------- run


def _plan(level: str, norms, seeds) -> tuple[Protocol, list[dict]]:
    protocol = PROTOCOLS[check_level(NAME, level)]
    norms = check_norms(NAME, protocol.norms if norms is None else norms, TASK, NORMS)
    seeds = check_seeds(NAME, seeds, protocol.seeds)
    # seed-major, so an interrupted study leaves complete seeds behind
    return protocol, [protocol.config(norm, seed, level) for seed in range(seeds) for norm in norms]


def _name(config: dict) -> str:
    return run_name(f"{NAME}-{config['norm']}-s{config['seed']}", config)


def run(
    out, *, level: str = "quick", norms=None, seeds=None, quiet=False, echo=print, data_dir=None, jobs: int = 1
) -> None:
    """Stream every (norm, seed) of the study at ``level`` not yet finished in ``out`` (see the module docstring).

    ``data_dir`` is unused (the stream is generated).

    Raises:
        ValueError: for an unknown level or norm, a norm the MLP refuses (``"in"``), seeds < 1, or an ``out``
            folder holding something else.
    """
    protocol, configs = _plan(level, norms, seeds)
    check_positive_int(NAME, "jobs", jobs)
    for config in configs:  # refuse a norm the model rejects before anything runs
        build_model(TASK, config["norm"], **{k: v for k, v in config["model"].items() if k != "task"})
    store = RunStore(out, study=NAME)
    store.clean_stale()
    write_json(
        store.root / "protocol.json",
        {
            "study": NAME,
            "level": level,
            "norms": list(dict.fromkeys(c["norm"] for c in configs)),
            "seeds": sorted({c["seed"] for c in configs}),
            "runs": [_name(c) for c in configs],
        },
    )
    reporter = make_progress("auto", quiet=quiet, echo=echo)
    todo = [c for c in configs if not store.is_done(_name(c))]
    reporter.start_sweep(len(configs))
    try:
        for config in configs:
            if config not in todo:
                reporter.end_run(_name(config), "skipped", None)

        def done(result: tuple[str, float]) -> None:
            reporter.end_run(result[0], "trained", {"run_s": result[1]})

        if jobs > 1:
            map_in_workers(functools.partial(_stream_into, str(store.root), None), todo, jobs, done)
        else:
            with torch_threads(protocol.threads):
                for config in todo:
                    reporter.start_run(_name(config), protocol.num_batches)
                    done(_stream_into(store.root, reporter.advance, config))
    finally:
        reporter.close()
    trained, skipped = len(todo), len(configs) - len(todo)
    if not quiet:
        echo(f"{NAME}: {trained} runs streamed, {skipped} found finished, in {store.root}")


def _stream_into(root, advance, config: dict) -> tuple[str, float]:
    """Stream ``config`` into the study's store at ``root``; returns the run's name and seconds."""
    name = _name(config)
    with RunStore(root, study=NAME).run(name, config, env_info("cpu", study=NAME)) as record:
        rows = run_stream(config, log=record.log, advance=advance)
    return name, rows[-1]["time_s"]


# ----------------------------------------------------------------------------------------------------- results


def _finished(out) -> tuple[str | None, list[tuple[dict, list[dict], dict]]]:
    """The level summarized (of the last invocation) and (config, metrics, env) of its finished runs."""
    if not (Path(out) / "study.json").is_file():
        raise ValueError(f"{NAME}: {str(out)!r} holds no {NAME} results (no study.json); run the study first")
    store = RunStore(out, study=NAME)
    path = store.root / "protocol.json"
    level = json.loads(path.read_text()).get("level") if path.is_file() else None
    runs = []
    for name in store.done_runs():
        config, metrics = store.load(name)
        # only runs made with the level's current protocol (a folder may hold runs of other levels or versions)
        if level in PROTOCOLS and config == PROTOCOLS[level].config(config.get("norm"), config.get("seed"), level):
            runs.append((config, metrics, store.load_env(name)))
    return level, runs


def collect(out) -> dict:
    """The study's results from its files: ``{"level", "shift_step", "num_batches", "recovery_steps", "runs":
    {norm: {seed: stream_accuracy(...)}}, "curves": {norm: {seed: (batch sizes, correct)}}, "env": one run's
    env.json}``."""
    level, runs = _finished(out)
    results: dict[str, dict[int, dict]] = {}
    curves: dict[str, dict[int, tuple[list[int], list[int]]]] = {}
    protocol = PROTOCOLS.get(level)
    for config, metrics, _env in sorted(runs, key=lambda r: r[0]["seed"]):
        stream = config["stream"]
        norm, seed = config["norm"], config["seed"]
        results.setdefault(norm, {})[seed] = stream_accuracy(metrics, stream["shift_step"], config["recovery_steps"])
        curves.setdefault(norm, {})[seed] = ([r["batch_size"] for r in metrics], [r["correct"] for r in metrics])
    order = [n for n in NORMS if n in results] + sorted(n for n in results if n not in NORMS)
    return {
        "level": level,
        "shift_step": protocol.shift_step if protocol else None,
        "num_batches": protocol.num_batches if protocol else None,
        "recovery_steps": protocol.recovery_steps if protocol else None,
        "runs": {n: results[n] for n in order},
        "curves": {n: curves[n] for n in order},
        "env": runs[0][2] if runs else {},
    }


_COLUMNS = (("before", "before shift"), ("after", "after shift"), ("recovery", "recovery"), ("overall", "overall"))


def summarize(out) -> Summary:
    """One row per norm: prequential accuracy (%) before / after the shift, in the recovery window, overall
    (mean ± std over seeds), and the train steps skipped (batches of one for BatchNorm-like norms)."""
    res = collect(out)
    rows = []
    for norm, by_seed in res["runs"].items():
        cells = [format_mean_std([r[key] for r in by_seed.values() if r[key] is not None]) for key, _ in _COLUMNS]
        skipped = statistics.fmean(r["skipped_steps"] for r in by_seed.values())
        steps = statistics.fmean(r["steps"] for r in by_seed.values())
        rows.append([norm, len(by_seed), *cells, f"{skipped:.0f} of {steps:.0f}"])
    level = res["level"] or "?"
    notes = [
        f"Prequential accuracy (%) at the {level} level: every batch is predicted in eval mode before the model "
        "trains on it (test-then-train); mean ± std over seeds."
    ]
    protocol = PROTOCOLS.get(res["level"])
    if protocol is not None:
        notes.append(
            f"Stream: {protocol.num_batches} steps, batch sizes {protocol.batch_sizes[0]}..{protocol.batch_sizes[1]}"
            f" (uniform), {protocol.num_classes} Gaussian classes in {protocol.dim} dimensions (separation "
            f"{protocol.separation}); covariate shift x -> {protocol.shift_gain} x + {protocol.shift_scale} d from "
            f"step {protocol.shift_step}. 'recovery' is the first {protocol.recovery_steps} steps from the shift on. "
            f"MLP hidden {list(protocol.hidden)}, SGD lr {protocol.lr}, momentum {protocol.momentum}."
        )
    notes.append(
        "Norms that cannot train on one sample (BatchNorm, Batch Renorm) skip the train step of every batch of one: "
        "those samples are predicted and scored, but not learnt from ('train steps skipped')."
    )
    nonfinite = [f"{n} s{s}" for n, by in res["runs"].items() for s, r in by.items() if r["nonfinite_steps"]]
    if nonfinite:
        notes.append(f"Runs with non-finite test losses (diverged; kept as measured): {', '.join(nonfinite)}.")
    env = res["env"]
    if env:
        total = sum(r["run_s"] for by in res["runs"].values() for r in by.values())
        notes.append(
            f"Machine: {env.get('device_name')} (torch threads: {env.get('torch_threads')}), torch "
            f"{env.get('torch')}; total streaming time {total:.1f} s."
        )
    return Summary(
        title="Online learning: prequential accuracy over a stream with a distribution shift",
        columns=["norm", "seeds", *(label for _, label in _COLUMNS), "train steps skipped"],
        rows=rows,
        notes=notes,
        data={k: res[k] for k in ("level", "shift_step", "num_batches", "recovery_steps", "runs")},
    )


def _running(sizes: list[int], correct: list[int], window: int) -> tuple[list[float], list[float]]:
    """Accuracy (%) in a trailing window of ``window`` steps, and cumulative, at every step."""
    import numpy as np

    n = np.concatenate([[0], np.cumsum(sizes, dtype=np.float64)])
    c = np.concatenate([[0], np.cumsum(correct, dtype=np.float64)])
    end = np.arange(1, len(sizes) + 1)
    start = np.maximum(0, end - window)
    windowed = 100.0 * (c[end] - c[start]) / (n[end] - n[start])
    cumulative = 100.0 * c[1:] / n[1:]
    return windowed.tolist(), cumulative.tolist()


def plot(out) -> list[Path]:
    """``online.png``: running accuracy over the stream (trailing window and cumulative), mean over seeds, one line
    per norm, the shift marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res = collect(out)
    if not res["curves"]:
        return []
    window = max(1, res["num_batches"] // 40)
    fig, (ax_w, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for norm, by_seed in res["curves"].items():
        curves = [_running(sizes, correct, window) for sizes, correct in by_seed.values()]
        length = min(len(w) for w, _ in curves)
        steps = np.arange(length)
        ax_w.plot(steps, np.mean([w[:length] for w, _ in curves], axis=0), label=norm, linewidth=1.2)
        ax_c.plot(steps, np.mean([c[:length] for _, c in curves], axis=0), label=norm, linewidth=1.2)
    for ax, title in ((ax_w, f"accuracy over the last {window} steps"), (ax_c, "cumulative accuracy")):
        ax.axvline(res["shift_step"], color="k", linestyle="--", linewidth=1)
        ax.text(res["shift_step"], 2, " shift", fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
    ax_w.set_ylabel("prequential accuracy (%)")
    ax_c.legend(fontsize=8, loc="lower right")
    seeds = sorted({len(by) for by in res["curves"].values()})
    fig.suptitle(f"Online learning, test-then-train ({res['level']} level, seeds per norm: {seeds})")
    fig.tight_layout()
    path = Path(out) / "online.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


STUDY = Study(
    NAME, run, summarize, plot, "prequential accuracy over a variable-batch stream with a mid-stream shift, per norm"
)
