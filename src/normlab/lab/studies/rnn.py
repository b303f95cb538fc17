"""Study ``rnn``: normalized LSTMs on sequence tasks: test accuracy, the gradient norm over training, and accuracy
on sequences longer than those trained on.

The claims under test: batch statistics fit recurrent nets badly. One BatchNorm shared by all time steps
(``bn_shared``) mixes the statistics of the initial transient with those of the steady state, so its running
statistics match no step; per-step statistics (``bn_step``, Cooijmans et al. 2017, "Recurrent Batch
Normalization", arXiv 1603.09025) fix that but need a rule for steps never seen in training; BatchNorm only on the
vertical connections between stacked layers (``vertical_bn``, Laurent et al. 2016, arXiv 1510.01378) leaves the
recurrence unnormalized; LayerNorm (Ba et al. 2016, arXiv 1607.06450) and Online Normalization (Chiley et al. 2019,
arXiv 1905.05894) need no batch. The unnormalized LSTM (``none``) is the baseline.

Model: :class:`normlab.lab.models.SequenceClassifier`, a 2-layer :class:`normlab.NormLSTM` and a linear head on the
last step (``build_model(task, norm)``), with ``max_steps`` = the training length, so that ``bn_step`` reuses the
last trained step's statistics beyond it (Cooijmans et al., Section 4). Training by :func:`normlab.lab.trainer.sweep`
(one run per norm x seed, resumable): SGD, momentum 0.9, weight decay 1e-4, ``lr = 0.1 x B / 32`` with a linear
warm-up then cosine decay, gradients clipped to a global norm of 1 (the LSTM default; the logged norms are before
clipping), test error in eval mode.

Gradient-norm trace: the trainer logs, for every epoch, the mean and the maximum over its steps of the global L2
norm of all gradients before clipping (``grad_norm_mean``, ``grad_norm_max`` in metrics.jsonl, with the step count
``step``), so the trace has one point per epoch (``steps_per_epoch`` steps).

Longer sequences. After training, each model is evaluated (eval mode) on the test set made longer in two ways:

* ``stretch-L``: each sequence resampled to L steps by linear interpolation along time (MNIST-1D signals: 1-D
  linear; Fashion-MNIST images: bilinear along the rows, the 28 columns kept, i.e. a taller image). The same
  content, played more slowly: every step's input stays in distribution, the sequence is longer.
* ``pad-L``: ``L - T`` steps of a blank input prepended (MNIST-1D: 0, the standardized data's mean;
  Fashion-MNIST: the standardized value of a black pixel), the sequence unchanged at the end. The classifier reads
  the last step, so a norm that is stable over time should lose nothing; ``bn_step`` applies its per-step
  statistics to the wrong content.

The results go into ``long_sequences.json`` in each run folder (written atomically after the run finished; a
killed study computes the missing ones on the next invocation), with the accuracy at the training length computed
the same way as a check.

Levels (``--norms`` takes any of :data:`NORMS`; ``--seeds N`` runs seeds 0..N-1):

=======  =================================================================================================
smoke    MNIST-1D (generated; always available), 300 samples (240 train, 60 test) as 40 steps of 1 feature;
         hidden 8; 1 epoch at batch 32; longer tests stretch-60, pad-60; all six norms; 1 seed.
         Seconds; for tests, not for conclusions.
quick    MNIST-1D, 5000 samples: a class-balanced subset of 1280 of the 4000 training samples (subset seed 0),
         all 1000 test samples; 40 steps; hidden 32; 6 epochs at batch 64 (120 steps), warm-up 0.5 epoch;
         longer tests stretch-60, stretch-80, pad-80; all six norms; 1 seed. 45-75 s on 2 CPU cores,
         most of it Online Normalization. Early training: a ranking, not converged accuracies.
full     Fashion-MNIST row by row (IDX files on disk; ``DataNotFoundError`` if absent): 60000 / 10000 images as
         28 steps of 28 features; hidden 128; 20 epochs at batch 64, warm-up 1 epoch; longer tests stretch-42,
         stretch-56, pad-56; all six norms; 3 seeds. The GPU-scale protocol: not run on CPU.
=======  =================================================================================================

At smoke and quick training runs on one torch thread (an LSTM step on a batch of 64 is too small to split; two
threads on a shared 2-core machine were up to 10 times slower in our measurements); env.json records the threads.
Results: one run folder per run (config.json, env.json, metrics.jsonl, model.pt, long_sequences.json) and
``protocol.json`` (the level of the last invocation, whose runs the summary tables). Plots: ``rnn_training.png``
(gradient norm and test accuracy over training) and ``rnn_long_sequences.png``.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..runs import RunStore
from ..trainer import TrainConfig, evaluate, load_model, sweep
from . import Study, Summary, torch_threads
from .batch_size import DataSource, check_level, check_norms, check_seeds, format_mean_std, mean_std, write_json

__all__ = ["STUDY", "NORMS", "PROTOCOLS", "Protocol", "longer_sequences", "load_split", "LONG_FILE"]

NAME = "rnn"

NORMS = ("none", "bn_shared", "vertical_bn", "bn_step", "ln", "online")
"""The issue's norms, in the order of the table."""

LONG_FILE = "long_sequences.json"
"""The longer-sequence evaluation of a run, in its folder."""

_KINDS = ("stretch", "pad")


@dataclass(frozen=True)
class Protocol:
    """The training protocol and the longer-sequence tests of one level (see the module docstring)."""

    task: str
    data: dict
    train_steps: int  # sequence length in training
    hidden_size: int
    epochs: int
    warmup_epochs: float
    batch_size: int
    long_tests: tuple[tuple[str, int], ...]
    norms: tuple[str, ...]
    seeds: int
    base_lr: float = 0.1
    base_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad_norm: float = 1.0
    threads: int | None = 1  # torch intra-op threads while training (None: as the caller set them)

    def config(self, norm: str, seed: int) -> TrainConfig:
        """The run of ``norm`` with ``seed``."""
        return TrainConfig(
            self.task,
            norm,
            batch_size=self.batch_size,
            seed=seed,
            epochs=self.epochs,
            base_lr=self.base_lr,
            base_batch=self.base_batch,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            schedule="cosine",
            clip_grad_norm=self.clip_grad_norm,
            eval_every=1,
            model={"hidden_size": self.hidden_size, "max_steps": self.train_steps},
            data=dict(self.data),
        )


PROTOCOLS = {
    "smoke": Protocol(
        task="mnist1d-seq",
        data={"dataset": "mnist1d", "num_samples": 300, "seed": 0, "train_size": None},
        train_steps=40,
        hidden_size=8,
        epochs=1,
        warmup_epochs=0.25,
        batch_size=32,
        long_tests=(("stretch", 60), ("pad", 60)),
        norms=NORMS,
        seeds=1,
    ),
    "quick": Protocol(
        task="mnist1d-seq",
        data={"dataset": "mnist1d", "num_samples": 5000, "seed": 0, "train_size": 1280},
        train_steps=40,
        hidden_size=32,
        epochs=6,
        warmup_epochs=0.5,
        batch_size=64,
        long_tests=(("stretch", 60), ("stretch", 80), ("pad", 80)),
        norms=NORMS,
        seeds=1,
    ),
    "full": Protocol(
        task="fashion-seq",
        data={"dataset": "fashion", "train_size": None, "test_size": None},
        train_steps=28,
        hidden_size=128,
        epochs=20,
        warmup_epochs=1.0,
        batch_size=64,
        long_tests=(("stretch", 42), ("stretch", 56), ("pad", 56)),
        norms=NORMS,
        seeds=3,
        threads=None,
    ),
}
"""The protocol of each level."""


# -------------------------------------------------------------------------------------------------------- data


def load_split(data: dict, data_dir=None):
    """``((x_train, y_train), (x_test, y_test))`` for a protocol's data options, in the task model's layout:
    MNIST-1D as (N, 1, 40) signals, Fashion-MNIST as (N, 1, 28, 28) images."""
    from ..data import as_signal, class_balanced_indices, load_fashion_mnist, load_mnist1d

    if data["dataset"] == "mnist1d":
        d = load_mnist1d(seed=data["seed"], num_samples=data["num_samples"])
        x_train, y_train = d.x_train, d.y_train
        if data["train_size"] is not None:
            keep = torch.from_numpy(class_balanced_indices(y_train, data["train_size"], seed=0))
            x_train, y_train = x_train[keep], y_train[keep]
        return (as_signal(x_train), y_train), (as_signal(d.x_test), d.y_test)
    if data["dataset"] == "fashion":
        train = load_fashion_mnist("train", data_dir, limit=data["train_size"])
        test = load_fashion_mnist("test", data_dir, limit=data["test_size"])
        return train, test
    raise ValueError(f"load_split: unknown dataset {data['dataset']!r} (expected 'mnist1d' or 'fashion')")


def blank_value(dataset: str) -> float:
    """The input value of "nothing" in a dataset's standardized inputs: the padding of ``pad-L`` tests."""
    from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    return -FASHION_MNIST_MEAN / FASHION_MNIST_STD if dataset == "fashion" else 0.0


def longer_sequences(x: torch.Tensor, kind: str, length: int, *, pad_value: float = 0.0) -> torch.Tensor:
    """``x`` made ``length`` steps long: (N, C, T) signals along T, (N, C, H, W) images along H (rows are steps).

    ``"stretch"`` resamples linearly along time (images: bilinearly, the width kept; ``align_corners=True``, so the
    first and last steps are kept exactly); ``"pad"`` prepends ``length - T`` steps of ``pad_value``.

    Raises:
        ValueError: for an unknown kind, ``length`` shorter than the sequences, or input of another rank.

    Example:
        >>> import torch
        >>> from normlab.lab.studies.rnn import longer_sequences
        >>> longer_sequences(torch.tensor([[[0.0, 2.0]]]), "stretch", 3).tolist()
        [[[0.0, 1.0, 2.0]]]
        >>> longer_sequences(torch.tensor([[[0.0, 2.0]]]), "pad", 4, pad_value=-1.0).tolist()
        [[[-1.0, -1.0, 0.0, 2.0]]]
    """
    if kind not in _KINDS:
        raise ValueError(f"longer_sequences: kind={kind!r} must be one of {list(_KINDS)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"longer_sequences: x of shape {tuple(x.shape)} must be (N, C, T) or (N, C, H, W)")
    steps = x.shape[2]
    if isinstance(length, bool) or not isinstance(length, int) or length < steps:
        raise ValueError(f"longer_sequences: length={length!r} must be an int >= the {steps} steps of x")
    if kind == "pad":
        padding = (length - steps, 0) if x.dim() == 3 else (0, 0, length - steps, 0)
        return F.pad(x, padding, value=pad_value)
    if x.dim() == 3:
        return F.interpolate(x, size=length, mode="linear", align_corners=True)
    return F.interpolate(x, size=(length, x.shape[3]), mode="bilinear", align_corners=True)


def _tests(protocol: Protocol) -> list[tuple[str, int]]:
    """The evaluations of a run: the training length (``"train"``), then the longer tests."""
    return [("train", protocol.train_steps), *protocol.long_tests]


def _evaluate_long(model, protocol: Protocol, x_test, y_test) -> dict:
    pad_value = blank_value(protocol.data["dataset"])
    results = {}
    for kind, length in _tests(protocol):
        x = x_test if kind == "train" else longer_sequences(x_test, kind, length, pad_value=pad_value)
        measured = evaluate(model, x, y_test, batch_size=500)
        key = f"{kind}-{length}"
        results[key] = {"kind": kind, "steps": length, "accuracy": 100.0 - measured["error"], "loss": measured["loss"]}
    return {"train_steps": protocol.train_steps, "pad_value": pad_value, "tests": results}


def _write_long(store: RunStore, name: str, protocol: Protocol, data: DataSource, config: TrainConfig) -> None:
    _, (x_test, y_test) = data(config)
    result = _evaluate_long(load_model(store, name), protocol, x_test, y_test)
    path = store.path(name) / LONG_FILE
    tmp = path.with_name(f".{LONG_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------- run


def make_configs(level: str, norms=None, seeds=None) -> list[TrainConfig]:
    """The runs of the study at ``level``, seed-major (so an interrupted sweep leaves complete seeds behind)."""
    protocol = PROTOCOLS[check_level(NAME, level)]
    norms = check_norms(NAME, protocol.norms if norms is None else norms, protocol.task, NORMS)
    seeds = check_seeds(NAME, seeds, protocol.seeds)
    return [protocol.config(norm, seed) for seed in range(seeds) for norm in norms]


def run(
    out, *, level: str = "quick", norms=None, seeds=None, quiet=False, echo=print, data_dir=None, jobs: int = 1
) -> None:
    """Train every run of the study at ``level`` not yet finished in ``out``, then evaluate each finished run on the
    longer sequences unless its ``long_sequences.json`` exists (see the module docstring).

    Raises:
        ValueError: for an unknown level or norm, seeds < 1, or an ``out`` folder holding something else.
        DataNotFoundError: at ``full`` when Fashion-MNIST is not on disk.
    """
    configs = make_configs(level, norms, seeds)
    protocol = PROTOCOLS[level]
    store = RunStore(out, study=NAME)
    write_json(
        store.root / "protocol.json",
        {
            "study": NAME,
            "level": level,
            "norms": list(dict.fromkeys(c.norm for c in configs)),
            "seeds": sorted({c.seed for c in configs}),
            "runs": [c.name for c in configs],
        },
    )
    data = DataSource(data_dir, load=load_split)
    evaluated = 0
    with torch_threads(protocol.threads):
        result = sweep(configs, store, data, quiet=quiet, echo=echo, save_model=True, jobs=jobs)
        for config in configs:
            if not (store.path(config.name) / LONG_FILE).is_file():
                _write_long(store, config.name, protocol, data, config)
                evaluated += 1
    if not quiet:
        echo(
            f"{NAME}: {len(result.trained)} runs trained, {len(result.skipped)} found finished, {evaluated} evaluated "
            f"on longer sequences, in {store.root}"
        )


# ----------------------------------------------------------------------------------------------------- results


def _finished(out) -> tuple[str | None, list[tuple[dict, list[dict], dict, dict | None]]]:
    """The level summarized (of the last invocation) and (config, metrics, env, long-sequence results or None) of
    its finished runs."""
    if not (Path(out) / "study.json").is_file():
        raise ValueError(f"{NAME}: {str(out)!r} holds no {NAME} results (no study.json); run the study first")
    store = RunStore(out, study=NAME)
    path = store.root / "protocol.json"
    level = json.loads(path.read_text()).get("level") if path.is_file() else None
    runs = []
    for name in store.done_runs():
        config, metrics = store.load(name)
        # only runs made with the level's current protocol (a folder may hold runs of other levels or versions)
        if level not in PROTOCOLS or config.get("norm") is None or config.get("seed") is None:
            continue
        if config != PROTOCOLS[level].config(config["norm"], config["seed"]).resolved(1).to_dict():
            continue
        long_path = store.path(name) / LONG_FILE
        long = json.loads(long_path.read_text()) if long_path.is_file() else None
        runs.append((config, metrics, store.load_env(name), long))
    return level, runs


def collect(out) -> dict:
    """The study's results from its files: ``{"level", "runs": {norm: {seed: {"test_accuracy", "trace": [{"step",
    "epoch", "grad_norm_mean", "grad_norm_max", "test_accuracy"}], "long": {test: accuracy}, "diverged",
    "train_s"}}}, "tests": [test names], "env"}``."""
    level, runs = _finished(out)
    results: dict[str, dict[int, dict]] = {}
    tests: list[str] = []
    for config, metrics, _env, long in sorted(runs, key=lambda r: r[0]["seed"]):
        last = next((row for row in reversed(metrics) if "test_error" in row), None)
        trace = [
            {
                "epoch": row["epoch"],
                "step": row["step"],
                "grad_norm_mean": row["grad_norm_mean"],
                "grad_norm_max": row["grad_norm_max"],
                "test_accuracy": 100.0 - row["test_error"] if "test_error" in row else None,
            }
            for row in metrics
        ]
        accuracies = {key: t["accuracy"] for key, t in (long or {}).get("tests", {}).items()}
        tests += [key for key in accuracies if key not in tests]
        results.setdefault(config["norm"], {})[config["seed"]] = {
            "test_accuracy": 100.0 - last["test_error"] if last else None,
            "trace": trace,
            "long": accuracies,
            "diverged": any(row.get("diverged") for row in metrics),
            "train_s": sum(row.get("time_s", 0.0) for row in metrics),
        }
    order = [n for n in NORMS if n in results] + sorted(n for n in results if n not in NORMS)
    protocol = PROTOCOLS.get(level)
    planned = [f"{kind}-{length}" for kind, length in _tests(protocol)] if protocol else []
    return {
        "level": level,
        "runs": {n: results[n] for n in order},
        "tests": [t for t in planned if t in tests] + sorted(t for t in tests if t not in planned),
        "env": runs[0][2] if runs else {},
    }


def summarize(out) -> Summary:
    """One row per norm: test accuracy (%), accuracy on each longer-sequence test, and the gradient norm in the
    first and last epoch and its largest value over training (mean ± std over seeds)."""
    res = collect(out)
    long_tests = [t for t in res["tests"] if not t.startswith("train-")]
    rows = []
    for norm, by_seed in res["runs"].items():
        runs = list(by_seed.values())
        acc = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
        long_cells = [format_mean_std([r["long"][t] for r in runs if t in r["long"]]) for t in long_tests]
        first = [r["trace"][0]["grad_norm_mean"] for r in runs if r["trace"]]
        last = [r["trace"][-1]["grad_norm_mean"] for r in runs if r["trace"]]
        peak = [max(t["grad_norm_max"] for t in r["trace"]) for r in runs if r["trace"]]
        rows.append(
            [norm, len(runs), format_mean_std(acc), *long_cells, _fmt_norms(first), _fmt_norms(last), _fmt_norms(peak)]
        )
    level = res["level"] or "?"
    notes = [
        f"LSTM test accuracy (%) in eval mode at the {level} level, on the training length and on longer test "
        "sequences (stretch-L: resampled to L steps; pad-L: blank steps prepended up to L); mean ± std over seeds.",
        "Gradient norm: global L2 norm of all gradients before clipping (clipped to 1 for the update), mean over "
        "the first and the last epoch's steps, and the largest single step ('grad max').",
    ]
    protocol = PROTOCOLS.get(res["level"])
    if protocol is not None:
        data = protocol.data
        source = (
            f"MNIST-1D ({data['num_samples']} samples, training on "
            f"{'all' if data['train_size'] is None else data['train_size']})"
            if data["dataset"] == "mnist1d"
            else "Fashion-MNIST row by row"
        )
        notes.append(
            f"Protocol: {protocol.task} on {source}, {protocol.train_steps} steps; 2-layer LSTM, hidden "
            f"{protocol.hidden_size}; {protocol.epochs} epochs at batch {protocol.batch_size}, SGD momentum "
            f"{protocol.momentum}, lr {protocol.base_lr} x B / {protocol.base_batch}, {protocol.warmup_epochs}-epoch "
            f"warm-up then cosine, weight decay {protocol.weight_decay}, clipping at {protocol.clip_grad_norm}."
        )
    diverged = [f"{n} s{s}" for n, by in res["runs"].items() for s, r in by.items() if r["diverged"]]
    if diverged:
        notes.append(f"Diverged runs (kept as measured): {', '.join(diverged)}.")
    missing = [f"{n} s{s}" for n, by in res["runs"].items() for s, r in by.items() if not r["long"]]
    if missing:
        notes.append(f"Not yet evaluated on longer sequences (run the study again): {', '.join(missing)}.")
    env = res["env"]
    if env:
        total = sum(r["train_s"] for by in res["runs"].values() for r in by.values())
        notes.append(
            f"Machine: {env.get('device_name')} ({env.get('device')}, torch threads: {env.get('torch_threads')}), "
            f"torch {env.get('torch')}; total training time {total:.1f} s."
        )
    return Summary(
        title="Normalized LSTMs: accuracy, gradient norms and longer sequences",
        columns=["norm", "seeds", "test acc", *long_tests, "grad first", "grad last", "grad max"],
        rows=rows,
        notes=notes,
        data={k: res[k] for k in ("level", "runs", "tests")},
    )


def _fmt_norms(values: list[float]) -> str:
    """Gradient norms span decades: 3 significant digits, mean ± std over seeds."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.3g}" if std is None else f"{mean:.3g} ± {std:.2g}"


def plot(out) -> list[Path]:
    """``rnn_training.png`` (gradient norm per epoch, mean and max, log scale; test accuracy per epoch) and
    ``rnn_long_sequences.png`` (accuracy per test length and kind), means over seeds, one line per norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = collect(out)
    if not res["runs"]:
        return []
    paths = []
    fig, (ax_g, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (norm, by_seed) in enumerate(res["runs"].items()):
        color = f"C{i}"
        traces = [r["trace"] for r in by_seed.values() if r["trace"]]
        length = min(len(t) for t in traces)
        steps = [traces[0][k]["step"] for k in range(length)]
        mean = [statistics.fmean(t[k]["grad_norm_mean"] for t in traces) for k in range(length)]
        peak = [statistics.fmean(t[k]["grad_norm_max"] for t in traces) for k in range(length)]
        ax_g.plot(steps, mean, marker="o", color=color, label=norm)
        ax_g.plot(steps, peak, linestyle=":", color=color)
        acc = [[t[k]["test_accuracy"] for t in traces if t[k]["test_accuracy"] is not None] for k in range(length)]
        ax_a.plot([s for s, a in zip(steps, acc) if a], [statistics.fmean(a) for a in acc if a], marker="o",
                  color=color, label=norm)  # fmt: skip
    ax_g.set_yscale("log")
    ax_g.set_xlabel("training step (end of epoch)")
    ax_g.set_ylabel("global gradient norm (before clipping)")
    ax_g.set_title("gradient norm per epoch: mean (solid), max (dotted)")
    ax_a.set_xlabel("training step (end of epoch)")
    ax_a.set_ylabel("test accuracy (%)")
    ax_a.set_title("test accuracy (eval mode)")
    for ax in (ax_g, ax_a):
        ax.grid(True, alpha=0.3)
    ax_a.legend(fontsize=8)
    fig.suptitle(f"Normalized LSTMs, training ({res['level']} level)")
    fig.tight_layout()
    paths.append(Path(out) / "rnn_training.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if res["tests"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        positions = range(len(res["tests"]))
        width = 0.8 / len(res["runs"])
        for i, (norm, by_seed) in enumerate(res["runs"].items()):
            values = []
            for test in res["tests"]:
                accs = [r["long"][test] for r in by_seed.values() if test in r["long"]]
                values.append(statistics.fmean(accs) if accs else 0.0)
            ax.bar([p + (i - (len(res["runs"]) - 1) / 2) * width for p in positions], values, width, label=norm)
        ax.set_xticks(list(positions))
        ax.set_xticklabels(res["tests"])
        ax.set_xlabel("test sequences (train-T: the training length)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Accuracy on longer sequences ({res['level']} level)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        paths.append(Path(out) / "rnn_long_sequences.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


STUDY = Study(
    NAME, run, summarize, plot, "normalized LSTMs: test accuracy, gradient-norm trace and accuracy on longer sequences"
)
