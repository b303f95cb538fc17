"""Study ``inference``: what happens to a trained model between training and deployment.

BatchNorm normalizes with batch statistics in training and with running averages in eval mode. This study trains
one model per norm at per-device batch 32 and one at batch 4 (the small-batch regime), then measures, for each:

* **eval mode** at test batch sizes 1, 2, 4, 8, 16, 32, 64: the deployed behaviour (independent of the test batch
  for every norm, since each sample is normalized with fixed statistics or its own);
* **train mode** (batch statistics) at the same test batch sizes: what a model left in training mode, or a norm
  without running statistics, does at inference; BatchNorm at test batch 1 normalizes each image by itself;
* **after** :func:`normlab.recalibrate_bn` (PreciseBN, Wu & Johnson 2021, arXiv 2105.07576): the running averages
  replaced by the population statistics of the training images, passed in batches of the model's training batch
  size (so every norm sees the activations it saw in training), then eval mode at every test batch size;
* **after** :func:`normlab.fold_bn`: BatchNorm folded into the preceding convolution; eval mode at every test batch
  size, checked against the unfolded eval mode (same errors at every test batch size and max |logit difference|
  <= 1e-3, the tolerance of float32 rounding through the network);
* **latency** per sample at test batch 1 in eval mode (median of repeated calls, no_grad, this process's torch
  threads), before and after folding.

Recalibration and folding apply to the norms they know (BatchNorm, Batch Renorm, ...: whatever their reports
change); for the others the study records "n/a" and reports the latency as is. The lab's models check their input
shape in ``forward``, which torch.fx cannot trace; fold_bn then traces their parts (the feature stack, the stem, the
residual stages), so every batch norm is folded. The summary says how many batch norms were folded.

Training: the protocol of the ``batch-size`` study at the same level (:data:`normlab.lab.studies.batch_size.
PROTOCOLS`: Group Normalization paper's linear learning-rate scaling, same epochs for both batch sizes), with
``save_model=True``; runs live in the study folder's run store, evaluations in ``evaluations/RUN.json``. Re-running
resumes: finished runs are not retrained and finished evaluations are not redone (an evaluation made with other
settings, e.g. another test set size, is redone; the summary reads only the current level's settings).

Levels (``--norms`` selects other specs; ``--seeds N`` trains seeds 0..N-1; the table shows means over seeds):

=======  =================================================================================================
smoke    MNIST-1D (batch-size smoke protocol: 240 training and 60 test samples, 1 epoch); norms bn, gn;
         evaluation on all 60 test samples; recalibration on the 240 training samples; 3 latency repeats.
quick    Fashion-MNIST (batch-size quick protocol: 2000 training images, 3 epochs); norms bn, brn, gn;
         evaluation on the first 512 test images (every test batch size divides it; the budget's limit:
         Batch Renorm's forward is several times slower than BatchNorm's on CPU); recalibration on all 2000
         training images; latency: median of 50 calls. About 75 s (measured with 1 torch thread on a 2-core
         AMD EPYC VM).
full     Fashion-MNIST (batch-size full protocol); norms bn, brn, mabn, gn, gn+ws, frn, evo_b0; evaluation
         on all 10000 test images; recalibration on 20000 training images; latency: median of 200 calls.
=======  =================================================================================================

FrozenBatchNorm is not in the list: it cannot be trained from scratch, and a frozen BatchNorm computes exactly
what ``bn`` does in eval mode, so it would repeat the ``bn`` row.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...surgery._report import SurgeryReport
from ...surgery.fold import fold_bn
from ...surgery.recalibrate import recalibrate_bn
from ..runs import RunStore, env_info
from ..trainer import load_model, sweep
from . import Study, Summary
from .batch_size import PROTOCOLS as TRAINING_PROTOCOLS
from .batch_size import DataSource, check_level, check_norms, check_seeds, format_mean_std, write_json

__all__ = ["STUDY", "TRAIN_BATCH_SIZES", "TEST_BATCH_SIZES", "EVALUATION", "evaluate_model"]

NAME = "inference"

TRAIN_BATCH_SIZES = (32, 4)
TEST_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
FOLD_TOLERANCE = 1e-3  # max |logit difference| between the folded and the unfolded model in eval mode


@dataclass(frozen=True)
class Evaluation:
    """How a level evaluates its trained models."""

    norms: tuple[str, ...]
    test_samples: int | None  # None: the whole test split
    recalibration_samples: int
    latency_repeats: int

    def settings(self) -> dict:
        """What a record was measured with (the norms aside): a record with other settings is redone."""
        return {
            "test_samples": self.test_samples,
            "recalibration_samples": self.recalibration_samples,
            "latency_repeats": self.latency_repeats,
        }


EVALUATION = {
    "smoke": Evaluation(norms=("bn", "gn"), test_samples=None, recalibration_samples=240, latency_repeats=3),
    "quick": Evaluation(norms=("bn", "brn", "gn"), test_samples=512, recalibration_samples=2000, latency_repeats=50),
    "full": Evaluation(
        norms=("bn", "brn", "mabn", "gn", "gn+ws", "frn", "evo_b0"),
        test_samples=None,
        recalibration_samples=20000,
        latency_repeats=200,
    ),
}
"""The evaluation settings of each level (training: the batch-size study's protocol)."""

_VALID_NORMS = ("bn", "brn", "mabn", "gn", "gn+ws", "ln", "in", "frn", "evo_b0", "evo_s0", "online", "none")


# ------------------------------------------------------------------------------------------------- measurement


@torch.no_grad()
def _error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    """Error (%) of ``model`` as it is (train or eval mode) over ``x`` in batches of ``batch_size``, and the logits."""
    logits = torch.cat([model(xb) for xb in x.split(batch_size)])
    return 100.0 * (logits.argmax(1) != y).sum().item() / len(y), logits


def _errors(model: nn.Module, x, y, *, train_mode: bool) -> tuple[dict[str, float], torch.Tensor]:
    """Error at every test batch size; in train mode each batch size starts from a fresh copy of the model (norms
    such as Batch Renorm and Online Norm update their state in train mode). Returns the logits at the largest."""
    errors, logits = {}, None
    for b in TEST_BATCH_SIZES:
        m = copy.deepcopy(model).train(train_mode) if train_mode else model.eval()
        errors[str(b)], logits = _error(m, x, y, b)
    return errors, logits


@torch.no_grad()
def _latency_ms(model: nn.Module, x1: torch.Tensor, repeats: int) -> float:
    """Median wall time (ms) of ``model(x1)`` in eval mode over ``repeats`` calls, after 3 warm-up calls."""
    model.eval()
    for _ in range(3):
        model(x1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x1)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _report_dict(report: SurgeryReport) -> dict:
    return {"changed": [c.name for c in report.changed], "skipped": [[s.name, s.reason] for s in report.skipped]}


def evaluate_model(
    model: nn.Module,
    train_x: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    train_batch: int,
    seed: int,
    recalibration_samples: int,
    latency_repeats: int,
) -> dict:
    """Every measurement of the study on one trained ``model`` (left unchanged); see the module docstring.

    Returns:
        A JSON-able dict: ``error`` (``eval``, ``train_mode``, ``recalibrated``, ``folded``: test batch size ->
        error %, the last two None where the tool changed nothing), ``recalibrate`` and ``fold`` (what the tools
        changed and skipped; ``fold`` also ``max_abs_logit_diff`` and ``equal_to_eval``), ``latency_ms`` (per
        sample at batch 1: ``before``, ``after`` (None when nothing was folded), ``repeats``, ``threads``).
    """
    model = copy.deepcopy(model).eval()
    x, y = test
    eval_errors, eval_logits = _errors(model, x, y, train_mode=False)
    train_errors, _ = _errors(model, x, y, train_mode=True)

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_x), generator=g)[:recalibration_samples]
    batches = list(train_x[order].split(train_batch))
    batches = [b for b in batches if len(b) == train_batch] or batches
    recal, recal_report = recalibrate_bn(copy.deepcopy(model), batches, num_batches=len(batches))
    recal_errors = _errors(recal, x, y, train_mode=False)[0] if recal_report.changed else None

    x1 = x[:1]
    before = _latency_ms(model, x1, latency_repeats)
    folded, fold_report = fold_bn(copy.deepcopy(model))
    fold = {**_report_dict(fold_report), "max_abs_logit_diff": None, "equal_to_eval": None}
    folded_errors, after = None, None
    if fold_report.changed:
        folded_errors, folded_logits = _errors(folded, x, y, train_mode=False)
        diff = (folded_logits - eval_logits).abs().max().item()
        fold["max_abs_logit_diff"] = diff
        fold["equal_to_eval"] = bool(folded_errors == eval_errors and diff <= FOLD_TOLERANCE)
        after = _latency_ms(folded, x1, latency_repeats)
    return {
        "test_samples": len(y),
        "test_batch_sizes": list(TEST_BATCH_SIZES),
        "error": {"eval": eval_errors, "train_mode": train_errors, "recalibrated": recal_errors,
                  "folded": folded_errors},
        "recalibrate": {**_report_dict(recal_report), "batch_size": train_batch, "batches": len(batches)},
        "fold": fold,
        "latency_ms": {"before": before, "after": after, "repeats": latency_repeats,
                       "threads": torch.get_num_threads()},
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------------- run


def _configs(level: str, norms, seeds):
    protocol = TRAINING_PROTOCOLS[check_level(NAME, level)]
    evaluation = EVALUATION[level]
    norms = check_norms(NAME, evaluation.norms if norms is None else norms, protocol.task, _VALID_NORMS)
    seeds = check_seeds(NAME, seeds, 1)
    return [protocol.config(n, b, s) for s in range(seeds) for n in norms for b in TRAIN_BATCH_SIZES]


def run(
    out, *, level: str = "quick", norms=None, seeds=None, quiet=False, echo=print, data_dir=None, jobs: int = 1
) -> None:
    """Train (resuming) and evaluate every model of the study at ``level`` into ``out``.

    Raises:
        ValueError: for an unknown level or norm, seeds < 1, or an ``out`` folder holding something else.
        DataNotFoundError: at ``quick`` / ``full`` when Fashion-MNIST is not on disk.
    """
    configs = _configs(level, norms, seeds)
    evaluation = EVALUATION[level]
    store = RunStore(out, study=NAME)
    write_json(
        store.root / "protocol.json",
        {"study": NAME, "level": level, "runs": [c.name for c in configs], "norms": list(dict.fromkeys(
            c.norm for c in configs))},
    )  # fmt: skip
    data = DataSource(data_dir)
    result = sweep(configs, store, data, quiet=quiet, echo=echo, save_model=True, jobs=jobs)
    folder = store.root / "evaluations"
    folder.mkdir(exist_ok=True)
    done = 0
    for config in configs:
        path = folder / f"{config.name}.json"
        if path.is_file() and json.loads(path.read_text()).get("settings") == evaluation.settings():
            continue
        (x_train, _), (x_test, y_test) = data(config)
        n = evaluation.test_samples or len(y_test)
        started = time.perf_counter()
        measured = evaluate_model(
            load_model(store, config.name),
            x_train,
            (x_test[:n], y_test[:n]),
            train_batch=config.batch_size,
            seed=config.seed,
            recalibration_samples=evaluation.recalibration_samples,
            latency_repeats=evaluation.latency_repeats,
        )
        record = {
            "run": config.name,
            "level": level,
            "norm": config.norm,
            "train_batch": config.batch_size,
            "seed": config.seed,
            "settings": evaluation.settings(),
            **measured,
            "evaluation_s": time.perf_counter() - started,
            "env": env_info("cpu"),
        }
        write_json(path, record)
        done += 1
        if not quiet:
            e = measured["error"]
            recal = "n/a" if e["recalibrated"] is None else f"{e['recalibrated']['64']:.2f}%"
            echo(
                f"evaluated {config.name}: eval {e['eval']['64']:.2f}%, train-mode @1 {e['train_mode']['1']:.2f}%, "
                f"recalibrated {recal}"
            )
    if not quiet:
        echo(
            f"{NAME}: {len(result.trained)} runs trained, {len(result.skipped)} found finished; {done} models "
            f"evaluated, in {store.root}"
        )


# ----------------------------------------------------------------------------------------------------- results


def collect(out) -> tuple[str | None, list[dict]]:
    """The level of the last invocation and its evaluation records, from the files under ``out``."""
    out = Path(out)
    if not (out / "study.json").is_file():
        raise ValueError(f"{NAME}: {str(out)!r} holds no {NAME} results (no study.json); run the study first")
    RunStore(out, study=NAME)  # checks the marker names this study
    level = None
    if (out / "protocol.json").is_file():
        level = json.loads((out / "protocol.json").read_text()).get("level")
    records = [json.loads(p.read_text()) for p in sorted((out / "evaluations").glob("*.json"))]
    if level in EVALUATION:
        settings = EVALUATION[level].settings()
        records = [r for r in records if r.get("level") == level and r.get("settings") == settings]
    order = {n: i for i, n in enumerate(_VALID_NORMS)}
    records.sort(key=lambda r: (order.get(r["norm"], len(order)), r["norm"], -r["train_batch"], r["seed"]))
    return level, records


def _group(records: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["norm"], r["train_batch"]), []).append(r)
    return groups


def _cell(records: list[dict], mode: str, batch: str) -> str:
    values = [r["error"][mode][batch] for r in records if r["error"][mode] is not None]
    return format_mean_std(values) if values else "n/a"


def _latency_cell(records: list[dict], key: str) -> str:
    values = [r["latency_ms"][key] for r in records if r["latency_ms"][key] is not None]
    return f"{statistics.median(values):.3f}" if values else "n/a"


def _folded_cell(records: list[dict]) -> str:
    flags = [r["fold"]["equal_to_eval"] for r in records if r["fold"]["equal_to_eval"] is not None]
    if not flags:
        return "n/a"
    return "yes" if all(flags) else "no"


def summarize(out) -> Summary:
    """Per norm and training batch: eval error, train-mode error at test batch 1 / 8 / 64, error after
    recalibrate_bn, whether fold_bn equals eval mode, latency per sample at batch 1 before / after folding."""
    level, records = collect(out)
    groups = _group(records)
    rows = []
    for (norm, batch), rs in groups.items():
        rows.append([
            norm, batch, _cell(rs, "eval", "64"), _cell(rs, "train_mode", "1"), _cell(rs, "train_mode", "8"),
            _cell(rs, "train_mode", "64"), _cell(rs, "recalibrated", "64"), _folded_cell(rs),
            _latency_cell(rs, "before"), _latency_cell(rs, "after"),
        ])  # fmt: skip
    notes = [
        f"Test error (%) of models trained at per-device batch 32 and 4 ({level or '?'} level, seeds per row: "
        f"{', '.join(sorted({str(len(rs)) for rs in groups.values()})) or 'none'}; mean ± std over seeds). "
        "'eval': eval mode (running statistics); 'train @b': train mode (batch statistics) at test batch b; "
        "'recal': eval mode after recalibrate_bn on training images; 'fold = eval': fold_bn gives the eval-mode "
        f"errors at every test batch size and logits within {FOLD_TOLERANCE}; latency: ms per sample at batch 1 "
        "(median over calls), n/a where nothing was folded.",
    ]
    for r in records:
        varying = sorted(set(r["error"]["eval"].values()))
        if len(varying) > 1:
            notes.append(f"{r['run']}: eval-mode error varies with the test batch size: {r['error']['eval']}.")
    for (norm, batch), rs in groups.items():
        recal = [r for r in rs if r["error"]["recalibrated"] is not None]
        if batch == min(TRAIN_BATCH_SIZES) and recal:
            before = statistics.fmean(r["error"]["eval"]["64"] for r in recal)
            after = statistics.fmean(r["error"]["recalibrated"]["64"] for r in recal)
            notes.append(
                f"recalibrate_bn on {norm} trained at batch {batch}: eval error {before:.2f}% with the running "
                f"averages from training, {after:.2f}% after recalibration ({after - before:+.2f} points)."
            )
        folded = [r for r in rs if r["fold"]["changed"]]
        if folded:
            r = folded[0]
            total = len(r["fold"]["changed"]) + len(r["fold"]["skipped"])
            notes.append(
                f"fold_bn on {norm} (train batch {batch}): {len(r['fold']['changed'])} of {total} batch norms "
                f"folded; max |logit difference| {max(x['fold']['max_abs_logit_diff'] for x in folded):.2e}."
            )
    if records:
        env = records[0]["env"]
        notes.append(
            f"Machine: {env.get('device_name')} (CPU, torch threads: {records[0]['latency_ms']['threads']}), torch "
            f"{env.get('torch')}; latency is wall time on this machine, not a benchmark."
        )
    return Summary(
        title="Inference: eval vs train mode, recalibration, folding",
        columns=["norm", "train B", "eval", "train @1", "train @8", "train @64", "recal", "fold = eval",
                 "ms/sample", "ms/sample folded"],
        rows=rows,
        notes=notes,
        data={"level": level, "records": [{k: v for k, v in r.items() if k != "env"} for r in records]},
    )  # fmt: skip


def plot(out) -> list[Path]:
    """``inference.png``: error vs test batch size (log2 axis), one panel per training batch, a colour per norm,
    solid = eval mode, dashed = train mode, dotted = after recalibrate_bn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, records = collect(out)
    groups = _group(records)
    if not groups:
        return []
    batches = sorted({b for _, b in groups}, reverse=True)
    norms = list(dict.fromkeys(n for n, _ in groups))
    colors = {n: f"C{i}" for i, n in enumerate(norms)}
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False, sharey=True)
    styles = (("eval", "-", "eval"), ("train_mode", "--", "train mode"), ("recalibrated", ":", "recalibrated"))
    for ax, batch in zip(axes[0], batches):
        for norm in norms:
            rs = groups.get((norm, batch), [])
            for mode, style, label in styles:
                rs_mode = [r for r in rs if r["error"][mode] is not None]
                if not rs_mode:
                    continue
                ys = [statistics.fmean(r["error"][mode][str(b)] for r in rs_mode) for b in TEST_BATCH_SIZES]
                ax.plot(TEST_BATCH_SIZES, ys, style, marker="o", ms=3, color=colors[norm], label=f"{norm} {label}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(TEST_BATCH_SIZES)
        ax.set_xticklabels([str(b) for b in TEST_BATCH_SIZES])
        ax.set_xlabel("test batch size")
        ax.set_title(f"trained at batch {batch}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test error (%)")
    fig.tight_layout()
    path = Path(out) / "inference.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


STUDY = Study(
    NAME, run, summarize, plot, "eval vs train mode at test batch 1..64, recalibrate_bn, fold_bn and latency, per norm"
)
