"""The lab's trainer: one seeded, deterministic training run per :class:`TrainConfig`, written to a run store.

Protocol (the Group Normalization paper's, Wu & He 2018, arXiv 1803.08494, after Goyal et al. 2017, arXiv
1706.02677): SGD with momentum and weight decay; the learning rate scales linearly with the batch,
``lr = base_lr * batch_size * world_size / base_batch``, with a linear warm-up and then cosine decay to 0 (or a
constant rate) per step; test error in eval mode, as a deployed model runs.

Distributed: under ``torchrun`` (call :func:`init_distributed` first: gloo on CPU, NCCL on GPU) the model is wrapped
in DistributedDataParallel and ``batch_size`` is the per-rank batch, so a BatchNorm sees ``batch_size`` samples as in
the paper's per-GPU protocol; each rank trains on a disjoint shard of every epoch's permutation and evaluates a
disjoint shard of the test set (the counts are all-reduced). Only rank 0 writes the run folder. The global batch
``batch_size * world_size`` sets the learning rate; rank r's k-th batch holds exactly the samples of the k-th batch
a single process would take at the global batch, so norms with per-sample statistics train the same either way.

Determinism: the model's initialisation uses ``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng` (the
caller's random state is left alone), shuffling uses its own generator seeded with ``seed``, and
``torch.use_deterministic_algorithms(True, warn_only=True)`` is on during the run (restored afterwards). On CPU with
the same thread count, the same config gives the same metrics, bit for bit, except the wall-clock ``time_s``.

Each epoch logs one row to metrics.jsonl::

    {"epoch", "step", "lr", "train_loss", "train_error", "grad_norm_mean", "grad_norm_max",
     "test_loss", "test_error", "time_s"}

errors in percent; ``lr`` is the rate of the epoch's last step; ``grad_norm_*`` are the global L2 norms of the
gradients (before clipping) over the epoch's steps; test metrics appear on evaluated epochs (every ``eval_every``-th
and the last). A run whose training loss stops being finite logs ``"diverged": true`` in that epoch's row and stops.

Example:
    >>> import tempfile, torch
    >>> from normlab.lab.runs import RunStore
    >>> from normlab.lab.trainer import TrainConfig, sweep
    >>> g = torch.Generator().manual_seed(0)
    >>> data = ((torch.randn(64, 8, generator=g), torch.randint(3, (64,), generator=g)),
    ...         (torch.randn(32, 8, generator=g), torch.randint(3, (32,), generator=g)))
    >>> model = {"in_features": 8, "hidden": (16,), "num_classes": 3}
    >>> configs = [TrainConfig("stream-mlp", norm, batch_size=8, epochs=2, model=model) for norm in ("bn", "ln")]
    >>> store = RunStore(tempfile.mkdtemp(), study="example")
    >>> summary = sweep(configs, store, data, quiet=True)
    >>> len(summary.trained), len(sweep(configs, store, data, quiet=True).skipped)
    (2, 2)
    >>> sorted(store.load(configs[0].name)[1][-1])[:4]
    ['epoch', 'grad_norm_max', 'grad_norm_mean', 'lr']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..functional._checks import check_nonnegative_float, check_positive_float, check_positive_int, unknown_name_error
from .models import TASKS, build_model, check_norm
from .runs import RunStore, env_info, run_name

__all__ = [
    "TrainConfig",
    "RunResult",
    "SweepSummary",
    "DistInfo",
    "scaled_lr",
    "warmup_cosine",
    "shard_batches",
    "evaluate",
    "train_run",
    "sweep",
    "load_model",
    "init_distributed",
    "torchrun_world_size",
    "make_progress",
]

Split = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_SCHEDULES = ("cosine", "constant")


def scaled_lr(base_lr: float, batch_size: int, base_batch: int, world_size: int = 1) -> float:
    """The linear scaling rule: ``base_lr * batch_size * world_size / base_batch`` (global batch / base batch).

    Example:
        >>> from normlab.lab.trainer import scaled_lr
        >>> scaled_lr(0.1, 2, 32), scaled_lr(0.1, 32, 32), scaled_lr(0.1, 16, 32, world_size=2)
        (0.00625, 0.1, 0.1)
    """
    return base_lr * batch_size * world_size / base_batch


@dataclass(frozen=True)
class TrainConfig:
    """One training run; its fields (as :meth:`to_dict`) are the run's identity and name its folder.

    Args:
        task: a :data:`normlab.lab.models.TASKS` name; picks the model (:func:`normlab.lab.models.build_model`).
        norm: the norm spec the model takes (``"bn"``, ``"gn+ws"``, ``"bn_step"``, ...).
        batch_size: the per-rank training batch, >= 1.
        seed: initialisation and shuffling seed.
        epochs: passes over the training set.
        base_lr: learning rate at the global batch ``base_batch``.
        base_batch: the global batch at which ``base_lr`` applies.
        momentum: SGD momentum.
        weight_decay: L2 weight decay (all parameters).
        warmup_epochs: linear warm-up length, in epochs (0 for none).
        schedule: ``"cosine"`` (decay to 0 after warm-up) or ``"constant"``.
        clip_grad_norm: clip the global gradient norm to this (None: no clipping).
        eval_every: evaluate on the test set every this many epochs (and after the last).
        eval_batch_size: test batch (per rank).
        model: keyword arguments for the model's constructor (e.g. ``{"widths": (8, 16, 32)}``).
        data: options of the data source (sizes, subsets, ...): recorded with the run and hashed into its name;
            a data callable passed to :func:`train_run` reads them from the config.
        world_size: processes the run uses; None takes the launch's (1 without torchrun). Stored resolved, so runs
            at different world sizes are different runs.

    Raises:
        ValueError: on an unknown task or schedule, batch_size < 1, or any other out-of-range value. (The norm is
            checked by :func:`sweep` and :func:`train_run`, against the task's model.)
    """

    task: str
    norm: str
    batch_size: int
    seed: int = 0
    epochs: int = 5
    base_lr: float = 0.1
    base_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    clip_grad_norm: float | None = None
    eval_every: int = 1
    eval_batch_size: int = 500
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    world_size: int | None = None

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        if self.task not in TASKS:
            raise ValueError(f"{owner}: {unknown_name_error('task', str(self.task), TASKS)} (got {self.task!r})")
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"{owner}: {unknown_name_error('schedule', str(self.schedule), _SCHEDULES)} (got {self.schedule!r})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{owner}: seed={self.seed!r} must be an integer")
        for name in ("batch_size", "epochs", "base_batch", "eval_every", "eval_batch_size"):
            check_positive_int(owner, name, getattr(self, name))
        if self.world_size is not None:
            check_positive_int(owner, "world_size", self.world_size)
        check_positive_float(owner, "base_lr", self.base_lr)
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            check_nonnegative_float(owner, name, getattr(self, name))
        if self.clip_grad_norm is not None:
            check_positive_float(owner, "clip_grad_norm", self.clip_grad_norm)
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{owner}: {name}={getattr(self, name)!r} must be a dict")

    def to_dict(self) -> dict:
        """The config as JSON-able values (tuples as lists), ``world_size`` resolved to 1 when None."""
        d = dataclasses.asdict(self)
        d["world_size"] = self.world_size or 1
        return _lists(d)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config of a config.json (unknown keys are refused)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    @property
    def name(self) -> str:
        """The run's folder name: ``task-norm-bBATCH-sSEED[-wWORLD]-HASH``."""
        world = self.world_size or 1
        prefix = f"{self.task}-{self.norm}-b{self.batch_size}-s{self.seed}" + (f"-w{world}" if world > 1 else "")
        return run_name(prefix, self.to_dict())

    @property
    def lr(self) -> float:
        """The peak learning rate: :func:`scaled_lr` at the global batch."""
        return scaled_lr(self.base_lr, self.batch_size, self.base_batch, self.world_size or 1)

    def resolved(self, world_size: int) -> TrainConfig:
        """This config at the launch's ``world_size``; refuses a config made for another world size."""
        if self.world_size is not None and self.world_size != world_size:
            raise ValueError(
                f"TrainConfig: world_size={self.world_size} but the run is launched with {world_size} processes"
            )
        return dataclasses.replace(self, world_size=world_size)


def _lists(value):
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


@dataclass
class RunResult:
    """What :func:`train_run` returns.

    Attributes:
        name: the run's name.
        config: the resolved config.
        metrics: the metrics rows (empty on ranks > 0 for a run found finished).
        model: the trained model (unwrapped, in eval mode); None for a run found finished.
        skipped: True when the run was found finished in the store and not trained again.
        dir: the run's folder on rank 0 (None without a store, and on other ranks).
    """

    name: str
    config: TrainConfig
    metrics: list[dict]
    model: nn.Module | None
    skipped: bool
    dir: Path | None


@dataclass
class SweepSummary:
    """What :func:`sweep` returns: names of the runs trained and of those found finished, and every result."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    results: list[RunResult] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size, local rank and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def torchrun_world_size() -> int:
    """The number of processes ``torchrun`` started (its ``WORLD_SIZE``), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ...).

    NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is available, gloo on CPU. Without torchrun (no
    ``WORLD_SIZE`` or 1) it does nothing and returns rank 0 of 1. Idempotent.
    """
    world = torchrun_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda and world > 1 else _default_device()
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = _rank_and_world()
    return DistInfo(rank, world, local_rank, device)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        if dist.is_available() and dist.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda")
    return torch.device("cpu")


def _from_rank0(value, world: int):
    """Rank 0's ``value`` on every rank (so all ranks take the same decision)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def _broadcast_buffers(model: nn.Module, world: int) -> None:
    """Rank 0's buffers everywhere: DDP syncs them at the start of each training forward, so after the last step
    every rank's running statistics are its own; evaluation must use one set."""
    if world > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


# ------------------------------------------------------------------------------------------------ the schedule


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, *, cosine: bool = True
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up to the optimizer's rate over ``warmup_steps`` steps, then cosine decay to
    0 at ``total_steps`` (or constant with ``cosine=False``). Call ``step()`` after every optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def shard_batches(
    n: int, batch_size: int, *, generator: torch.Generator, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """One epoch's batches of this rank: a (steps, batch_size) tensor of sample indices.

    A permutation of ``n`` (from ``generator``, the same on every rank) is dealt round-robin to the ranks; each
    keeps ``n // world_size`` indices and its full batches (the last partial batch is dropped: a batch of one breaks
    BatchNorm). The ranks' k-th batches together are positions ``[k * B, (k + 1) * B)`` of the permutation, B the
    global batch: what one process at batch B would take.

    Example:
        >>> import torch
        >>> from normlab.lab.trainer import shard_batches
        >>> shard_batches(10, 2, generator=torch.Generator().manual_seed(0), rank=1, world_size=2).shape
        torch.Size([2, 2])
    """
    order = torch.randperm(n, generator=generator)
    mine = order[rank::world_size][: n // world_size]
    steps = len(mine) // batch_size
    return mine[: steps * batch_size].view(steps, batch_size)


# ------------------------------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500, rank: int = 0, world_size: int = 1
) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``error`` (%) of ``model`` on ``(x, y)`` in eval mode (the model's mode is
    restored). With ``world_size > 1`` each rank evaluates ``x[rank::world_size]`` and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x, y = x[rank::world_size], y[rank::world_size]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, wrong, count
    try:
        with torch.no_grad():
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                xb, yb = xb.to(device), yb.to(device)
                logits = model(xb)
                totals[0] += F.cross_entropy(logits.float(), yb, reduction="sum").double()
                totals[1] += (logits.argmax(1) != yb).sum()
                totals[2] += len(yb)
    finally:
        model.train(was_training)
    loss_sum, wrong, count = _all_reduce_sum(totals, world_size).tolist()
    return {"loss": loss_sum / count, "error": 100.0 * wrong / count}


# ----------------------------------------------------------------------------------------------------- training


class _NoRun:
    """Stands in for a store's Run where nothing is written (no store, or ranks > 0)."""

    dir = None

    def log(self, **metrics) -> None:
        pass


def _data_for(config: TrainConfig, data) -> Split:
    split = data(config) if callable(data) else data
    try:
        (x_train, y_train), (x_test, y_test) = split
    except (TypeError, ValueError):
        raise ValueError(
            "train_run: data must be ((x_train, y_train), (x_test, y_test)) tensors or a callable returning them"
        ) from None
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"train_run: the {name} split has {len(x)} inputs and {len(y)} labels")
    return split


@contextlib.contextmanager
def _deterministic(enabled: bool):
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _fit(model, ddp, config: TrainConfig, split: Split, run, progress, rank: int, world: int) -> list[dict]:
    """The training loop; returns the logged rows."""
    (x_train, y_train), (x_test, y_test) = split
    device = next(model.parameters()).device
    x_train, y_train = x_train.to(device), y_train.to(device)
    steps_per_epoch = (len(x_train) // world) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"train_run: batch_size={config.batch_size} exceeds the {len(x_train) // world} training samples per rank"
        )
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    sched = warmup_cosine(opt, round(config.warmup_epochs * steps_per_epoch), total, cosine=config.schedule == "cosine")
    max_norm = config.clip_grad_norm if config.clip_grad_norm is not None else math.inf
    g = torch.Generator().manual_seed(config.seed)
    rows, step = [], 0
    progress.start_run(config.name, total)
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum over steps, wrong, samples
        norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        norm_max = torch.zeros((), dtype=torch.float64, device=device)
        for idx in shard_batches(len(x_train), config.batch_size, generator=g, rank=rank, world_size=world):
            idx = idx.to(device)
            xb, yb = x_train[idx], y_train[idx]
            logits = ddp(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).double()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            sums[0] += loss.detach().double()
            sums[1] += (logits.detach().argmax(1) != yb).sum()
            sums[2] += len(yb)
            norm_sum += grad_norm
            norm_max = torch.maximum(norm_max, grad_norm)
            step += 1
            progress.advance()
        loss_sum, wrong, samples = _all_reduce_sum(sums, world).tolist()
        row = {
            "epoch": epoch,
            "step": step,
            "lr": lr,
            "train_loss": loss_sum / (steps_per_epoch * world),
            "train_error": 100.0 * wrong / samples,
            "grad_norm_mean": norm_sum.item() / steps_per_epoch,
            "grad_norm_max": norm_max.item(),
        }
        diverged = not math.isfinite(row["train_loss"])
        if diverged or epoch % config.eval_every == 0 or epoch == config.epochs:
            _broadcast_buffers(model, world)
            test = evaluate(model, x_test, y_test, batch_size=config.eval_batch_size, rank=rank, world_size=world)
            row.update(test_loss=test["loss"], test_error=test["error"])
        if diverged:
            row["diverged"] = True
        row["time_s"] = time.perf_counter() - start
        run.log(**row)
        rows.append(row)
        if diverged:
            progress.advance((config.epochs - epoch) * steps_per_epoch)
            break
    return rows


def train_run(
    config: TrainConfig,
    store: RunStore | None,
    data,
    *,
    device=None,
    progress=None,
    save_model: bool = False,
    deterministic: bool = True,
) -> RunResult:
    """Train ``config`` end to end and write its run to ``store``, unless the store holds it finished already.

    Args:
        config: the run.
        store: where the run is written (on rank 0); None trains without writing.
        data: ``((x_train, y_train), (x_test, y_test))`` tensors in the task model's input layout, or a callable
            ``data(config)`` returning them (it may read ``config.data``).
        device: where to train; default ``cuda`` (this rank's GPU under torchrun) when available, else ``cpu``.
        progress: a progress reporter from :func:`make_progress` (default: none).
        save_model: also save the trained ``state_dict`` as ``model.pt`` in the run folder (see :func:`load_model`).
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` during the run.

    Returns:
        A :class:`RunResult`.

    Raises:
        ValueError: for a norm the task's model does not take, malformed data, a batch larger than the training
            samples of a rank, or a config made for another world size.
    """
    rank, world = _rank_and_world()
    config = config.resolved(world)
    check_norm(config.task, config.norm)
    progress = progress if progress is not None else _NullProgress()
    name = config.name
    if store is not None and _from_rank0(store.is_done(name) if rank == 0 else None, world):
        metrics = store.load(name)[1] if rank == 0 else []
        progress.end_run(name, "skipped", metrics[-1] if metrics else None)
        return RunResult(name, config, metrics, None, True, store.path(name) if rank == 0 else None)
    device = torch.device(device) if device is not None else _default_device()
    split = _data_for(config, data)
    started = time.perf_counter()
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), _deterministic(deterministic):
        torch.manual_seed(config.seed)
        model = build_model(config.task, config.norm, **config.model).to(device)
        ddp = model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        writing = store is not None and rank == 0
        if writing:
            env = env_info(device, world_size=world, backend=dist.get_backend() if world > 1 else None)
        with store.run(name, config.to_dict(), env) if writing else contextlib.nullcontext(_NoRun()) as run:
            metrics = _fit(model, ddp, config, split, run, progress, rank, world)
            if save_model and writing:
                torch.save(model.state_dict(), run.dir / "model.pt")
    model.eval()
    summary = dict(metrics[-1]) if metrics else {}
    summary["run_s"] = time.perf_counter() - started
    progress.end_run(name, "trained", summary)
    return RunResult(name, config, metrics, model, False, run.dir if writing else None)


def load_model(store: RunStore, name: str, device="cpu") -> nn.Module:
    """The model of finished run ``name``, rebuilt from its config.json with the weights of its model.pt, in eval
    mode. Raises ValueError if the run was not saved with ``save_model=True``."""
    config = TrainConfig.from_dict(store.load(name)[0])
    path = store.path(name) / "model.pt"
    if not path.is_file():
        raise ValueError(f"load_model: run {name!r} has no model.pt (train it with save_model=True)")
    model = build_model(config.task, config.norm, **config.model)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return model.to(device).eval()


def sweep(
    configs: Iterable[TrainConfig],
    store: RunStore,
    data,
    *,
    device=None,
    progress="auto",
    quiet: bool = False,
    echo: Callable[[str], None] = print,
    save_model: bool = False,
    deterministic: bool = True,
    jobs: int = 1,
) -> SweepSummary:
    """Train every config not finished in ``store`` (resume: a killed sweep run again redoes only its unfinished
    runs, and never trains a finished one twice).

    All configs are checked before anything trains; duplicates (same name) run once. Stale temporary folders of
    killed runs are removed first (rank 0). ``data`` is as for :func:`train_run`; a callable is called once per
    trained run, so cache expensive loading in it.

    With ``jobs > 1`` (single process only, not under torchrun) the runs train in that many worker processes at
    once, each with one torch thread (the lab's small models gain more from one process per core than from
    intra-op threads); ``data`` must then be picklable (a callable such as the studies' ``DataSource``, which each
    worker calls for itself). Every run is still seeded by its own config, so results do not depend on ``jobs``.
    Progress then reports finished runs only (no per-step bar), and ``results`` hold no models (``model`` is None:
    load saved ones with :func:`load_model`).

    Args:
        configs: the runs.
        store: the study's run store.
        data: tensors or a callable ``data(config)``, as for :func:`train_run`.
        device: as for :func:`train_run`.
        progress: ``"auto"``, ``"rich"``, ``"tqdm"``, ``"lines"``, ``"none"``, or a reporter object (see
            :func:`make_progress`).
        quiet: no output at all (CI logs), whatever ``progress`` says. Ranks > 0 are always quiet.
        echo: where ``"lines"`` progress writes.
        save_model, deterministic: as for :func:`train_run`.
        jobs: worker processes (1: train in this process).

    Returns:
        A :class:`SweepSummary`.
    """
    rank, world = _rank_and_world()
    check_positive_int("sweep", "jobs", jobs)
    if jobs > 1 and world > 1:
        raise ValueError(f"sweep: jobs={jobs} needs a single process; under torchrun (world size {world}) use jobs=1")
    unique: dict[str, TrainConfig] = {}
    for config in configs:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"sweep: configs must be TrainConfig objects, got {type(config).__name__}")
        resolved = config.resolved(world)
        check_norm(resolved.task, resolved.norm)
        unique.setdefault(resolved.name, resolved)
    if rank == 0:
        store.clean_stale()
    if quiet or rank > 0:
        reporter = _NullProgress()
    else:
        reporter = make_progress(progress, echo=echo) if isinstance(progress, str) else progress
    summary = SweepSummary()
    reporter.start_sweep(len(unique))
    options = {"device": device, "save_model": save_model, "deterministic": deterministic}
    try:
        if jobs > 1:
            results = _train_in_workers(list(unique.values()), store, data, jobs, reporter, options)
        else:
            results = (train_run(config, store, data, progress=reporter, **options) for config in unique.values())
        for result in results:
            (summary.skipped if result.skipped else summary.trained).append(result.name)
            summary.results.append(result)
    finally:
        reporter.close()
    return summary


def _worker_start() -> None:
    torch.set_num_threads(1)


def map_in_workers(fn: Callable, items: list, jobs: int, on_result: Callable | None = None) -> list:
    """``[fn(item) for item in items]`` computed in ``jobs`` spawned processes with one torch thread each.

    ``fn`` must be a picklable (module-level) function and ``items`` picklable. ``on_result(result)`` runs in
    this process as each result arrives (for progress). Results come back in the order of ``items``; the first
    exception raised in a worker propagates after the pending items are cancelled.
    """
    import concurrent.futures as cf
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads and locks
    results: list = [None] * len(items)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_start) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for future in cf.as_completed(futures):
                results[futures[future]] = future.result()
                if on_result is not None:
                    on_result(results[futures[future]])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def _train_in_worker(root: str, study: str, data, options: dict, config: TrainConfig) -> RunResult:
    result = train_run(config, RunStore(root, study=study), data, **options)
    return dataclasses.replace(result, model=None)


def _train_in_workers(configs, store: RunStore, data, jobs: int, reporter, options: dict) -> list[RunResult]:
    """Train ``configs`` in ``jobs`` processes, reporting each finished run; results in the order of ``configs``."""

    def report(result: RunResult) -> None:
        summary = dict(result.metrics[-1]) if result.metrics else None
        if summary is not None and not result.skipped:
            summary["run_s"] = sum(row.get("time_s", 0.0) for row in result.metrics)
        reporter.end_run(result.name, "skipped" if result.skipped else "trained", summary)

    worker = functools.partial(_train_in_worker, str(store.root), store.study, data, options)
    return map_in_workers(worker, list(configs), jobs, report)


# ------------------------------------------------------------------------------------------------------ progress


class _NullProgress:
    """The progress-reporter interface, reporting nothing (``quiet``)."""

    def start_sweep(self, total: int) -> None:
        pass

    def start_run(self, name: str, total_steps: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def end_run(self, name: str, status: str, summary: dict | None) -> None:
        pass

    def close(self) -> None:
        pass


def _summary_text(name: str, status: str, summary: dict | None) -> str:
    parts = [name, "(finished before: skipped)" if status == "skipped" else ""]
    if summary and "test_error" in summary:
        parts.append(f"test error {summary['test_error']:.2f}%")
    if summary and summary.get("diverged"):
        parts.append("DIVERGED")
    if summary and "run_s" in summary:
        parts.append(f"{summary['run_s']:.1f} s")
    return "  ".join(p for p in parts if p)


class _LineProgress(_NullProgress):
    """One line per finished run: for logs that are not terminals."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo, self.total, self.done = echo, 0, 0

    def start_sweep(self, total: int) -> None:
        self.total = total

    def end_run(self, name: str, status: str, summary: dict | None) -> None:
        self.done += 1
        count = f"[{self.done}/{self.total}] " if self.total else ""
        self.echo(count + _summary_text(name, status, summary))


class _TqdmProgress(_NullProgress):
    def __init__(self, tqdm) -> None:
        self.tqdm, self.runs, self.steps = tqdm, None, None

    def start_sweep(self, total: int) -> None:
        self.runs = self.tqdm(total=total, desc="runs", unit="run", position=0)

    def start_run(self, name: str, total_steps: int) -> None:
        self._close_steps()
        self.steps = self.tqdm(total=total_steps, desc=name, unit="step", position=1, leave=False)

    def advance(self, steps: int = 1) -> None:
        if self.steps is not None:
            self.steps.update(steps)

    def end_run(self, name: str, status: str, summary: dict | None) -> None:
        self._close_steps()
        if self.runs is not None:
            self.runs.write(_summary_text(name, status, summary))
            self.runs.update(1)

    def _close_steps(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def close(self) -> None:
        self._close_steps()
        if self.runs is not None:
            self.runs.close()


class _RichProgress(_NullProgress):
    def __init__(self, rich_progress) -> None:
        p = rich_progress
        self.bar = p.Progress(
            p.TextColumn("{task.description}"),
            p.BarColumn(),
            p.MofNCompleteColumn(),
            p.TimeElapsedColumn(),
            p.TimeRemainingColumn(),
        )
        self.bar.start()
        self.runs = self.steps = None

    def start_sweep(self, total: int) -> None:
        self.runs = self.bar.add_task("runs", total=total)

    def start_run(self, name: str, total_steps: int) -> None:
        self._remove_steps()
        self.steps = self.bar.add_task(f"  {name}", total=total_steps)

    def advance(self, steps: int = 1) -> None:
        if self.steps is not None:
            self.bar.advance(self.steps, steps)

    def end_run(self, name: str, status: str, summary: dict | None) -> None:
        self._remove_steps()
        self.bar.console.print(_summary_text(name, status, summary), highlight=False)
        if self.runs is not None:
            self.bar.advance(self.runs, 1)

    def _remove_steps(self) -> None:
        if self.steps is not None:
            self.bar.remove_task(self.steps)
            self.steps = None

    def close(self) -> None:
        self.bar.stop()


_PROGRESS_KINDS = ("auto", "rich", "tqdm", "lines", "none")


def make_progress(kind: str = "auto", *, quiet: bool = False, echo: Callable[[str], None] = print):
    """A progress reporter for :func:`sweep` / :func:`train_run`.

    ``"rich"`` and ``"tqdm"`` draw a bar for the sweep and one for the current run's steps (imported only here; an
    ImportError names the package to install); ``"lines"`` prints one line per finished run through ``echo``;
    ``"none"`` (or ``quiet=True``) prints nothing. ``"auto"``: rich, else tqdm, on a terminal; lines otherwise
    (CI logs).
    """
    if kind not in _PROGRESS_KINDS:
        raise ValueError(f"make_progress: {unknown_name_error('kind', str(kind), _PROGRESS_KINDS)} (got {kind!r})")
    if quiet or kind == "none":
        return _NullProgress()
    if kind == "auto":
        if not sys.stderr.isatty():
            return _LineProgress(echo)
        for candidate in ("rich", "tqdm"):
            with contextlib.suppress(ImportError):
                return make_progress(candidate, echo=echo)
        return _LineProgress(echo)
    if kind == "lines":
        return _LineProgress(echo)
    try:
        if kind == "rich":
            import rich.progress

            return _RichProgress(rich.progress)
        from tqdm.auto import tqdm

        return _TqdmProgress(tqdm)
    except ImportError as e:
        raise ImportError(f"make_progress: progress={kind!r} needs the {kind} package: pip install {kind}") from e
