"""Study ``speed``: what each norm costs in a training step: its share of the step, step time, throughput, memory.

The claim under test: normalization costs a noticeable share of a convolutional network's training step, and the
alternatives to BatchNorm may cost more where torch has no fused kernel for them (normlab runs those as reference
PyTorch math until fused kernels exist). Every norm is timed here in the same network, in one process, side by side.

Protocol (per device; one measurement session is one run folder in the study's :class:`~normlab.lab.runs.RunStore`):

* model: :class:`~normlab.lab.models.SmallResNet` with the norm (``"X+ws"``: weight-standardized convolutions), one
  model per norm built with seed 0; SGD (lr 0.01, momentum 0.9); one training step is forward, cross-entropy,
  backward, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``;
* data: one fixed batch of random N(0, 1) images (1 x 28 x 28) and uniform random labels per norm. Speed does not
  depend on the values (no data-dependent branching in the norms), so no dataset is read and nothing is downloaded;
* every model first runs ``warmup`` untimed steps (allocator, oneDNN / cuDNN algorithm selection), then ``rounds``
  rounds; in each round every norm runs ``steps`` timed steps back to back, and the norms' order rotates from round
  to round. A norm's step time is the mean step time of its **fastest** round: on a shared machine other processes
  only ever add time, so the fastest round is the best estimate of the undisturbed cost. The rounds' times are all
  kept in ``metrics.jsonl``. CUDA timings synchronize before and after each round;
* ratios: each norm's step time divided by BatchNorm's (``x bn``) and by the network without norm (``x none``);
  ``bn`` and ``none`` are therefore always measured, added to ``--norms`` when missing.

How the norm's share is measured (:func:`norm_share`): after the timed rounds, ``profiled`` more steps per norm run
under :mod:`torch.profiler`, with a ``record_function`` scope opened by a forward pre-hook and closed by a forward
hook around every norm module (every module of the spec's layer class; for ``"+ws"`` also around each
:class:`~normlab.layers.weight_standardization.StdConv2d`'s ``standardized_weight()`` call, so weight
standardization counts as norm time but the convolution does not). Forward: everything inside a scope (the ops and
the module's Python code). Backward: autograd runs a node outside any forward scope, so each scope notes the range
of autograd sequence numbers it used (``torch.autograd._get_sequence_nr()`` on entry and exit: exactly the nodes its
ops created), and every ``autograd::engine::evaluate_function: ...Backward`` event whose ``sequence_nr`` (on the
forward thread) falls in a range counts, with its whole subtree. (Matching the forward ops' own ``sequence_nr``
would be wrong: an op that creates no node records the next number, which the next node outside the scope takes.)
The share is the norm's time over the total of the step's events, the median over the profiled steps: on CPU self
CPU time (the sum is the step's wall time under the profiler); on CUDA the time of the GPU kernels each op launched.
The norm's milliseconds in the table are ``share x step time`` (the step time measured without the profiler).

Limits of the share: the profiler adds a roughly fixed cost to every op, so norms built of many small ops (the
reference implementations: FRN, EvoNorm, Online Norm, Batch Renorm) read somewhat high on CPU compared with a
single fused op; ``AccumulateGrad`` of the norm's parameters and their optimizer update count as the rest; a norm
that carries its own nonlinearity (FRN's TLU, EvoNorm-S0) includes it, while the other norms' ReLU is the rest;
on CUDA the share is of kernel time, which is not the step time when the step is launch-bound (small models);
``none`` has no norm modules, so its share is 0 by definition. ``x none`` is a profiler-free cross-check: step
time with the norm over step time without any.

Peak memory (``peak MiB``): the most memory the step allocates above what was allocated when it started (its
activations, saved tensors, gradients and temporaries; the parameters, momentum buffers and the batch are not
counted, and are in ``results.json`` as ``state_bytes``). On CUDA: ``torch.cuda.max_memory_allocated`` over one
step without the profiler, minus ``torch.cuda.memory_allocated`` before it. On CPU, where torch keeps no allocator
statistics: the running sum of the profiler's memory events (``profile_memory=True``: every allocation and free of
tensor storage through PyTorch's CPU allocator) over the profiled steps; memory that oneDNN or other libraries
allocate themselves and the Python heap are not counted.

Levels (``--norms`` selects any norms the model takes; default :data:`NORMS`):

=======  =================================================================================================
smoke    CPU (and CUDA when present), one torch thread (two threads on a busy 2-core machine can wait on
         each other for a second per op); SmallResNet widths (4, 8, 8), one block per stage; batch 4; 1
         warm-up step, 2 rounds of 1 step, 1 profiled step. Seconds; for tests, not for conclusions.
quick    CPU (and CUDA when present); SmallResNet widths (16, 32, 64), one block per stage (the batch-size
         study's model); batch 32; 3 warm-up steps, 10 rounds of 2 steps, 3 profiled steps; torch's thread
         count as the caller set it. Measured with the ten default norms on a 2-core machine shared with other
         jobs: 11 s with one torch thread, 76 to 168 s with two, because two threads on two busy cores stall
         each other (rounds of seconds instead of milliseconds; the summary then says the machine was busy):
         measure with one thread there. ``wall_s`` in results.json and the report's notes say how long it took.
full     CUDA (the CPU only when no GPU is present, which takes tens of minutes); batch 128; SmallResNet with
         ResNet-34's layout of basic blocks (3, 4, 6, 3) at widths (64, 128, 256, 512) (ResNet-50's inner
         widths), still on 28 x 28 inputs (stages at 28, 14, 7, 4 pixels); 10 warm-up steps, 5 rounds of 20
         steps, 3 profiled steps. The GPU-scale protocol: not run on CPU here.
=======  =================================================================================================

Backends: the norms run through :func:`normlab.kernels.call` with the current default backend
(``NORMLAB_BACKEND``, ``auto`` unless set); the implementation each op resolved to (``native``, ``reference`` or
``triton``) is recorded per norm in ``results.json``, so fused Triton kernels are measured, and said to be, as soon
as they exist.

Files: ``study.json``; per device and session a run folder ``speed-LEVEL-DEVICE-HASH/`` with ``config.json``,
``env.json`` (device name, versions, threads, git commit), ``metrics.jsonl`` (one row per round and norm) and
``results.json`` (per norm: step time, samples/s, norm share, peak memory, ratios, backends; plus the device name,
torch version, threads and the session's wall time). A second run with the same options finds the session
finished and measures nothing; ``run(..., remeasure=True)`` measures again into a new folder, and the summary shows
the newest session per level and device. ``speed-LEVEL-DEVICE.png``: stacked bars of step time = norm + rest.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from ...factory import get_norm_layer
from ...functional._checks import check_positive_int, unknown_name_error
from ...layers.weight_standardization import StdConv2d
from ..models import SmallResNet
from ..runs import RunStore, env_info, run_name
from . import LEVELS, Study, Summary, torch_threads
from .batch_size import check_level, check_norms

__all__ = ["STUDY", "NORMS", "REFERENCES", "PROTOCOLS", "Protocol", "norm_share", "measure", "collect"]

NAME = "speed"

NORMS = ("bn", "gn", "gn+ws", "ln", "in", "frn", "evo_s0", "brn", "online", "none")
"""The default norms, in the order of the table."""

REFERENCES = ("bn", "none")
"""Norms always measured: the step-time ratios are to these."""

_RESULTS = "results.json"
_NORM_SCOPE = "normlab.speed.norm"
_STEP_SCOPE = "normlab.speed.step"
_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
_MIB = 2.0**20
_BUSY_SPREAD = 1.5  # median round / fastest round above which the summary says the machine was busy


@dataclass(frozen=True)
class Protocol:
    """What one level measures (see the module docstring)."""

    batch_size: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    warmup: int
    steps: int
    rounds: int
    profiled: int
    image_size: int = 28
    lr: float = 0.01
    momentum: float = 0.9
    threads: int | None = None  # torch intra-op threads while measuring on CPU (None: as set by the caller)


PROTOCOLS = {
    "smoke": Protocol(
        batch_size=4, widths=(4, 8, 8), blocks=(1, 1, 1), warmup=1, steps=1, rounds=2, profiled=1, threads=1
    ),
    "quick": Protocol(batch_size=32, widths=(16, 32, 64), blocks=(1, 1, 1), warmup=3, steps=2, rounds=10, profiled=3),
    "full": Protocol(
        batch_size=128, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), warmup=10, steps=20, rounds=5, profiled=3
    ),
}
"""The protocol of each level."""


def devices_for(level: str) -> list[str]:
    """Devices measured at ``level``: the CPU (and CUDA when present) below ``full``; at ``full`` CUDA if present."""
    cuda = torch.cuda.is_available()
    if level == "full":
        return ["cuda"] if cuda else ["cpu"]
    return ["cpu"] + (["cuda"] if cuda else [])


# ----------------------------------------------------------------------------------------------------- options


def _check_norms(norms) -> tuple[str, ...]:
    """``norms`` (validated as every study does) plus the references, in the table's order."""
    checked = list(check_norms(NAME, norms, "fashion", NORMS))
    checked += [ref for ref in REFERENCES if ref not in checked]
    # one canonical order (the table's), so that the same norms in another order are the same session
    return tuple(n for n in NORMS if n in checked) + tuple(sorted(n for n in checked if n not in NORMS))


def _check_devices(devices) -> list[str]:
    valid = ("cpu", "cuda")
    if isinstance(devices, str) or not isinstance(devices, (list, tuple)) or not devices:
        raise ValueError(f"{NAME}: devices={devices!r} must be a non-empty list of 'cpu' / 'cuda'")
    for device in devices:
        if device not in valid:
            raise ValueError(f"{NAME}: {unknown_name_error('device', str(device), valid)} (got {device!r})")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{NAME}: devices={list(devices)!r} asks for 'cuda', but no CUDA device is available")
    return list(dict.fromkeys(devices))


# ---------------------------------------------------------------------------------------- the measured step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _norm_classes(norm: str) -> tuple[type, ...]:
    """The layer class(es) a spec builds in SmallResNet (none for ``"none"``)."""
    base = norm.strip()
    if base.lower().endswith("+ws"):
        base = base[: -len("+ws")]
    build = get_norm_layer(base).build
    if not isinstance(build, type) or build is nn.Identity:
        return ()
    return (build,)


def _implementation_backend(impl: Callable) -> str:
    module = getattr(impl, "__module__", "") or ""
    if module.startswith("normlab.kernels.native"):
        return "native"
    if module.startswith("normlab.kernels.triton"):
        return "triton"
    if module.startswith("normlab.functional"):
        return "reference"
    return module or "unknown"


@contextlib.contextmanager
def _recording_backends(found: dict[str, str]) -> Iterator[None]:
    """Record ``op -> backend`` of every :func:`normlab.kernels.call` made inside the block."""
    original = kernels.resolve

    def resolve(op, x, backend=None):
        impl = original(op, x, backend)
        found[op] = _implementation_backend(impl)
        return impl

    kernels.resolve = resolve
    try:
        yield
    finally:
        kernels.resolve = original


class _Bench:
    """One norm's model, optimizer and fixed random batch on one device."""

    def __init__(self, norm: str, protocol: Protocol, device: torch.device, seed: int = 0) -> None:
        self.norm = norm
        self.device = device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SmallResNet(norm, widths=protocol.widths, blocks=protocol.blocks)
            size = protocol.image_size
            self.x = torch.randn(protocol.batch_size, 1, size, size).to(device)
            self.y = torch.randint(10, (protocol.batch_size,)).to(device)
        self.model = model.to(device).train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=protocol.lr, momentum=protocol.momentum)
        self.norm_classes = _norm_classes(norm)
        self.loss = None

    def step(self) -> torch.Tensor:
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def warm_up(self, steps: int) -> dict[str, str]:
        """Run ``steps`` untimed steps; return the backend each dispatched op of the first one resolved to."""
        found: dict[str, str] = {}
        with _recording_backends(found):
            self.step()
        for _ in range(steps - 1):
            self.step()
        _sync(self.device)
        return dict(sorted(found.items()))

    def time_steps(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` steps."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        _sync(self.device)
        self.loss = loss  # kept only from timed steps: the profiled ones must not free memory allocated before them
        return (time.perf_counter() - start) / steps

    def state_bytes(self) -> int:
        """Bytes of the parameters, buffers and optimizer state (live between steps; not in the step's peak)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def cuda_peak_bytes(self) -> int:
        """``max_memory_allocated`` over one step, above the memory allocated when it starts."""
        _sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        self.step()
        _sync(self.device)
        return torch.cuda.max_memory_allocated(self.device) - start

    def loss_is_finite(self) -> bool:
        return self.loss is not None and bool(torch.isfinite(self.loss))


# ------------------------------------------------------------------------------------- profiler attribution


class _Scopes:
    """What :func:`_norm_scopes` recorded: the scoped modules and, per scope, the autograd sequence numbers of the
    nodes created inside it (``[start, end)``)."""

    def __init__(self) -> None:
        self.modules = 0
        self.created: list[tuple[int, int]] = []

    def holds(self, sequence_nr: int) -> bool:
        return any(start <= sequence_nr < end for start, end in self.created)


@contextlib.contextmanager
def _norm_scopes(model: nn.Module, classes: tuple[type, ...]) -> Iterator[_Scopes]:
    """Open a ``record_function`` scope around every module of ``classes`` and every StdConv2d's weight
    standardization while the block runs, and note the range of autograd sequence numbers each scope used."""
    from torch.autograd import _get_sequence_nr  # the next node's number, on this thread
    from torch.profiler import record_function

    scopes = _Scopes()
    open_scopes: list = []

    def enter(*_):
        scope = record_function(_NORM_SCOPE)
        scope.__enter__()
        open_scopes.append((scope, _get_sequence_nr()))

    def leave(*_):
        scope, start = open_scopes.pop()
        scopes.created.append((start, _get_sequence_nr()))
        scope.__exit__(None, None, None)

    def scoped(method):
        def standardized_weight():
            enter()
            try:
                return method()
            finally:
                leave()

        return standardized_weight

    handles, patched = [], []
    try:
        for module in model.modules():
            if classes and isinstance(module, classes):
                handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
            if isinstance(module, StdConv2d):
                module.standardized_weight = scoped(module.standardized_weight)
                patched.append(module)
        scopes.modules = len(handles) // 2 + len(patched)
        yield scopes
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.standardized_weight
        while open_scopes:  # a forward that raised left its scope open
            open_scopes.pop()[0].__exit__(None, None, None)


def _subtree(event) -> Iterator:
    stack = [event]
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.cpu_children)


def _event_time(event, device_time: bool) -> float:
    """Microseconds ``event`` itself accounts for: its kernels' time (device) or its self CPU time."""
    if device_time:
        return float(sum(k.duration for k in event.kernels))
    return float(event.self_cpu_time_total)


def attribute(events: Iterable, created: Callable[[int], bool], *, device_time: bool = False) -> dict:
    """Split profiler events (``prof.events()``) into the norm's and the rest (see the module docstring).

    Args:
        events: the profiled steps' events, with :data:`_NORM_SCOPE` scopes around the norms' forward.
        created: whether the autograd node of a sequence number was created inside a norm scope.
        device_time: attribute GPU kernel time instead of CPU time.

    Returns:
        ``{"norm_us", "total_us"`` (sums over the :data:`_STEP_SCOPE` steps; events outside them are left out),
        ``"shares"`` (norm / total of each step), ``"forward"`` (sorted op names in norm scopes), ``"backward"``
        (sorted backward node names of the norm)``}``.
    """
    events = [e for e in events if not e.is_async]
    norm_ids: set[int] = set()
    forward: set[str] = set()
    threads: set[int] = set()
    for scope in (e for e in events if e.name == _NORM_SCOPE):
        threads.add(scope.thread)
        for e in _subtree(scope):
            norm_ids.add(id(e))
            if e.name != _NORM_SCOPE:
                forward.add(e.name)
    backward: set[str] = set()
    for node in (e for e in events if e.name.startswith(_BACKWARD_PREFIX)):
        # an op that creates no node still records the next number: match the nodes, not the forward ops
        if node.fwd_thread in threads and node.sequence_nr >= 0 and created(node.sequence_nr):
            backward.add(node.name[len(_BACKWARD_PREFIX) :])
            norm_ids.update(id(e) for e in _subtree(node))
    # each event belongs to the step during which it started (CUDA's backward runs on another thread, but within it)
    steps = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == _STEP_SCOPE)
    starts = [start for start, _ in steps]
    norm, total = [0.0] * len(steps), [0.0] * len(steps)
    for e in events:
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i < 0 or e.time_range.start > steps[i][1]:
            continue
        t = _event_time(e, device_time)
        total[i] += t
        if id(e) in norm_ids:
            norm[i] += t
    return {
        "norm_us": sum(norm),
        "total_us": sum(total),
        "shares": [n / t if t > 0 else 0.0 for n, t in zip(norm, total)],
        "forward": sorted(forward),
        "backward": sorted(backward),
    }


def _memory_peak_bytes(prof, device_type) -> int | None:
    """Peak of the running sum of the profiler's memory events of ``device_type`` (None if unavailable)."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        return None
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and e.device_type() == device_type
    )
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def norm_share(bench_or_model, step: Callable[[], object] | None = None, *, steps: int = 1, norm_classes=()) -> dict:
    """Profile ``steps`` training steps and attribute their time to the norm modules (see the module docstring).

    Args:
        bench_or_model: the model (or an internal bench, which brings its own step and norm classes).
        step: runs one training step of the model.
        steps: steps to profile.
        norm_classes: the norm layer classes whose modules are scoped.

    Returns:
        :func:`attribute`'s dict plus ``"share"`` (the median over the steps of norm / total: one step disturbed
        by another process does not move it), ``"modules"`` (scoped modules) and, on CPU,
        ``"peak_bytes"`` (the profiler's memory peak over the steps, above the first step's start).

    Example:
        >>> import torch
        >>> from normlab.lab.models import SmallResNet
        >>> from normlab.lab.studies.speed import norm_share
        >>> from normlab.layers.batch_norm import BatchNorm2d
        >>> model = SmallResNet("bn", widths=(4, 8, 8))
        >>> x, y = torch.randn(4, 1, 28, 28), torch.randint(10, (4,))
        >>> def step():
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> r = norm_share(model, step, norm_classes=(BatchNorm2d,))
        >>> 0 < r["share"] < 1, "NativeBatchNormBackward0" in r["backward"], "ConvolutionBackward0" in r["backward"]
        (True, True, False)
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    if isinstance(bench_or_model, _Bench):
        model, step, norm_classes = bench_or_model.model, bench_or_model.step, bench_or_model.norm_classes
    else:
        model = bench_or_model
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _norm_scopes(model, tuple(norm_classes)) as scopes:
        _sync(device)
        with _without_profiler_chatter(), profile(activities=activities, profile_memory=not cuda) as prof:
            for _ in range(steps):
                with record_function(_STEP_SCOPE):
                    step()
            _sync(device)
    result = attribute(prof.events(), scopes.holds, device_time=cuda)
    result["share"] = statistics.median(result["shares"]) if result["shares"] else 0.0
    result["modules"] = scopes.modules
    result["peak_bytes"] = None if cuda else _memory_peak_bytes(prof, DeviceType.CPU)
    return result


@contextlib.contextmanager
def _without_profiler_chatter():
    """Drop the ``USDT: ... profiler_start/stop`` lines that torch's C++ profiler writes to stderr (file descriptor 2,
    below Python) at every start and stop; every other line written meanwhile is passed on to stderr afterwards."""
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True) if "USDT:" not in line]
            if kept:
                sys.stderr.write("".join(kept))


# ------------------------------------------------------------------------------------------------- measuring


def ratios(step_s: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """``{norm: {"x_bn": t / t_bn, "x_none": t / t_none}}`` (None where the reference was not measured)."""
    out = {}
    for norm, t in step_s.items():
        out[norm] = {f"x_{ref}": (t / step_s[ref] if step_s.get(ref) else None) for ref in REFERENCES}
    return out


def measure(norms: Iterable[str], protocol: Protocol, device="cpu", *, seed: int = 0, log=None, echo=None) -> dict:
    """Measure every norm on ``device`` by ``protocol`` (see the module docstring).

    Args:
        norms: norm specs SmallResNet takes.
        protocol: the level's :class:`Protocol`.
        device: ``"cpu"`` or ``"cuda"``.
        seed: initialisation and data seed.
        log: called with keyword arguments once per round and norm (a ``metrics.jsonl`` row).
        echo: progress lines (None: silent).

    Returns:
        ``{"norms": {norm: {...}}, "rounds": [...], "wall_s"}``; per norm ``step_ms`` (fastest round's mean),
        ``round_ms`` (every round), ``samples_per_s``, ``norm_share``, ``norm_ms``, ``peak_bytes``,
        ``state_bytes``, ``norm_modules``, ``backends``, ``attributed`` (op and backward-node names),
        ``loss_finite``, ``x_bn``, ``x_none``; ``phases_s``: seconds spent building and warming up, in the
        timed rounds and profiling.
    """
    device = torch.device(device)
    started = time.perf_counter()
    benches = [_Bench(norm, protocol, device, seed) for norm in norms]
    backends = {b.norm: b.warm_up(protocol.warmup) for b in benches}
    phases = {"build_and_warm_up": time.perf_counter() - started}
    round_s: dict[str, list[float]] = {b.norm: [] for b in benches}
    for r in range(protocol.rounds):
        shift = r % len(benches)
        for bench in benches[shift:] + benches[:shift]:
            seconds = bench.time_steps(protocol.steps)
            round_s[bench.norm].append(seconds)
            if log is not None:
                log(round=r, norm=bench.norm, steps=protocol.steps, step_ms=1e3 * seconds)
        if echo is not None:
            echo(f"{NAME}: {device.type} round {r + 1}/{protocol.rounds} done")
    phases["rounds"] = time.perf_counter() - started - sum(phases.values())
    results = {}
    for bench in benches:
        profiled = norm_share(bench, steps=protocol.profiled)
        peak = bench.cuda_peak_bytes() if device.type == "cuda" else profiled["peak_bytes"]
        step_s = min(round_s[bench.norm])
        results[bench.norm] = {
            "step_ms": 1e3 * step_s,
            "round_ms": [1e3 * s for s in round_s[bench.norm]],
            "samples_per_s": protocol.batch_size / step_s,
            "norm_share": profiled["share"],
            "profiled_shares": profiled["shares"],
            "norm_ms": 1e3 * step_s * profiled["share"],
            "profiled_norm_us": profiled["norm_us"] / protocol.profiled,
            "profiled_total_us": profiled["total_us"] / protocol.profiled,
            "peak_bytes": peak,
            "state_bytes": bench.state_bytes(),
            "norm_modules": profiled["modules"],
            "backends": backends[bench.norm],
            "attributed": {"forward": profiled["forward"], "backward": profiled["backward"]},
            "loss_finite": bench.loss_is_finite(),
        }
    for norm, r in ratios({n: v["step_ms"] for n, v in results.items()}).items():
        results[norm].update(r)
    phases["profiling"] = time.perf_counter() - started - sum(phases.values())
    return {"norms": results, "wall_s": time.perf_counter() - started, "phases_s": phases}


# --------------------------------------------------------------------------------------------------------- run


def _session_config(level: str, norms: tuple[str, ...], device: str, repeat: int) -> dict:
    return {
        "study": NAME,
        "level": level,
        "device": device,
        "norms": list(norms),
        "protocol": asdict(PROTOCOLS[level]),
        "threads": torch.get_num_threads(),
        "backend": kernels.get_backend(),
        "seed": 0,
        "repeat": repeat,
    }


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(
    out,
    *,
    level: str = "quick",
    norms=None,
    seeds=None,
    quiet: bool = False,
    echo=print,
    data_dir=None,
    jobs: int = 1,
    devices=None,
    remeasure: bool = False,
) -> None:
    """Measure every norm at ``level`` on each device, unless ``out`` already holds that measurement.

    Args:
        out: the study folder.
        level: ``"smoke"``, ``"quick"`` or ``"full"``.
        norms: norm specs (default :data:`NORMS`); ``bn`` and ``none`` are added when missing.
        seeds: accepted for the common interface; timings use seed 0 (the values do not change the speed), so
            any positive count measures once.
        quiet: no progress lines.
        echo: where progress lines go.
        data_dir: unused (the study times random data).
        jobs: accepted for the common interface and checked; the study always measures in this one process, alone,
            since timings taken while other runs share the cores would be meaningless.
        devices: ``["cpu"]``, ``["cuda"]`` or both (default: :func:`devices_for` the level).
        remeasure: measure again even when a finished session with the same options exists (a new folder).

    Raises:
        ValueError: for an unknown level, norm or device, seeds < 1, or an ``out`` folder holding something else.
    """
    level = check_level(NAME, level)
    norms = _check_norms(NORMS if norms is None else norms)
    if seeds is not None:
        check_positive_int(NAME, "seeds", seeds)
    check_positive_int(NAME, "jobs", jobs)
    devices = _check_devices(devices_for(level) if devices is None else devices)
    store = RunStore(out, study=NAME)
    store.clean_stale()  # a killed session's temporary folder
    say = (lambda _line: None) if quiet else echo
    with torch_threads(PROTOCOLS[level].threads):
        for device in devices:
            _measure_session(store, level, norms, device, remeasure, say)


def _measure_session(store: RunStore, level: str, norms: tuple[str, ...], device: str, remeasure: bool, say) -> None:
    """Measure ``norms`` on ``device`` into a new run folder, unless the same session is finished there."""
    config = _session_config(level, norms, device, repeat=0)
    name = run_name(f"{NAME}-{level}-{device}", config)
    if store.is_done(name) and not remeasure:
        say(f"{NAME}: {device} at {level} already measured in {store.path(name)} (remeasure=True to redo)")
        return
    while store.is_done(name):
        config["repeat"] += 1
        name = run_name(f"{NAME}-{level}-{device}", config)
    env = env_info(device, backend=kernels.get_backend())
    threads = env["torch_threads"]
    say(f"{NAME}: measuring {len(norms)} norms on {env['device_name']} ({device}, {threads} torch thread(s))")
    with store.run(name, config, env) as session:
        measured = measure(norms, PROTOCOLS[level], device, log=session.log, echo=say)
        _write_json(
            session.dir / _RESULTS,
            {
                "study": NAME,
                "level": level,
                "device": device,
                "device_name": env["device_name"],
                "torch": env["torch"],
                "threads": env["torch_threads"],
                "cpu_count": env["cpu_count"],
                "backend_setting": env["backend"],
                "triton_available": kernels.triton_available(),
                "protocol": config["protocol"],
                "created": env["created"],
                "repeat": config["repeat"],
                **measured,
            },
        )
    say(f"{NAME}: {device} measured in {measured['wall_s']:.1f} s -> {store.path(name)}")


# ----------------------------------------------------------------------------------------------------- results


def collect(out) -> list[dict]:
    """The newest finished session (its results.json) per level and device in ``out``, from the files alone."""
    out = Path(out)
    marker = out / "study.json"
    if not marker.is_file():
        raise ValueError(f"{NAME}: {str(out)!r} holds no {NAME} results (no study.json); run the study first")
    found = json.loads(marker.read_text()).get("study")
    if found != NAME:
        raise ValueError(f"{NAME}: {str(out)!r} holds the results of study {found!r}, not {NAME!r}")
    newest: dict[tuple[str, str], dict] = {}
    for path in sorted(out.glob(f"*/{_RESULTS}")):
        if path.parent.name.startswith("."):
            continue
        result = json.loads(path.read_text())
        result["folder"] = path.parent.name
        key = (result["level"], result["device"])
        if key not in newest or (result["created"], result["repeat"]) > (newest[key]["created"], newest[key]["repeat"]):
            newest[key] = result
    order = {level: i for i, level in enumerate(LEVELS)}
    return [newest[k] for k in sorted(newest, key=lambda k: (order.get(k[0], len(order)), k[1]))]


def _ordered(norms: dict) -> list[str]:
    return [n for n in NORMS if n in norms] + [n for n in norms if n not in NORMS]


def _cell(value, digits: int):
    return "-" if value is None else round(float(value), digits)


def busy_spread(session: dict) -> float | None:
    """Median over norms of (median round / fastest round): about 1 on an idle machine (None for one round)."""
    spreads = [
        statistics.median(v["round_ms"]) / min(v["round_ms"])
        for v in session["norms"].values()
        if len(v.get("round_ms", [])) > 1 and min(v["round_ms"]) > 0
    ]
    return statistics.median(spreads) if spreads else None


def summarize(out) -> Summary:
    """One row per device and norm: step time, the norm's time and share, samples/s, peak memory, ratios."""
    sessions = collect(out)
    if not sessions:
        raise ValueError(f"{NAME}: {str(out)!r} holds no finished {NAME} measurement; run the study first")
    rows, notes = [], []
    for s in sessions:
        step_ms = {n: v["step_ms"] for n, v in s["norms"].items()}
        rel = ratios(step_ms)
        for norm in _ordered(s["norms"]):
            v = s["norms"][norm]
            peak = v.get("peak_bytes")
            rows.append(
                [
                    f"{s['device']}/{s['level']}",
                    norm,
                    _cell(v["step_ms"], 2),
                    _cell(v["step_ms"] * v["norm_share"], 2),
                    _cell(100 * v["norm_share"], 1),
                    round(1e3 * s["protocol"]["batch_size"] / v["step_ms"]),
                    _cell(None if peak is None else peak / _MIB, 2),
                    _cell(rel[norm]["x_bn"], 2),
                    _cell(rel[norm]["x_none"], 2),
                ]
            )
        p = s["protocol"]
        backends = sorted({b for v in s["norms"].values() for b in v["backends"].values()})
        notes.append(
            f"{s['device']}/{s['level']}: {s['device_name']}, torch {s['torch']}, {s['threads']} torch threads "
            f"({s['cpu_count']} CPUs); SmallResNet widths {tuple(p['widths'])}, blocks {tuple(p['blocks'])}, batch "
            f"{p['batch_size']} of random 1x{p['image_size']}x{p['image_size']} images; step time = fastest of "
            f"{p['rounds']} rounds x {p['steps']} step(s) (norms alternating, after {p['warmup']} warm-up step(s)); "
            f"norm share: median of {p['profiled']} profiled step(s); backend setting {s['backend_setting']!r}, "
            f"ops ran on: {', '.join(backends) or 'none'}; measured in {s['wall_s']:.0f} s."
        )
        spread = busy_spread(s)
        if spread is not None and spread > _BUSY_SPREAD:
            notes.append(
                f"{s['device']}/{s['level']}: the machine was busy: a norm's median round took {spread:.1f}x its "
                "fastest (median over norms). The fastest rounds are reported, but the ratios are unreliable; "
                "measure again (remeasure) on an idle machine, or with one torch thread (torch.set_num_threads(1)): "
                "threads that share busy cores wait on each other."
            )
        diverged = [n for n, v in s["norms"].items() if not v.get("loss_finite", True)]
        if diverged:
            notes.append(f"{s['device']}/{s['level']}: loss not finite at the end for {', '.join(diverged)}.")
    notes += [
        "Norm share: self time (CPU) or kernel time (CUDA) of the ops inside record_function scopes around each "
        "norm module's forward, plus the backward nodes those ops created (matched by autograd sequence number), "
        "over the whole step, under torch.profiler; 'norm ms' = share x step time. The profiler's per-op overhead "
        "makes norms built from many small ops read somewhat high; parameter updates count as the rest; FRN and "
        "EvoNorm include their own nonlinearity; gn+ws includes weight standardization.",
        "Peak MiB: most memory allocated during a step above its start (activations, saved tensors, gradients); "
        "CPU: the profiler's memory events (PyTorch's allocator only), CUDA: torch.cuda.max_memory_allocated.",
        "x bn / x none: step time over BatchNorm's / over the network without norm, same session. Timings, not "
        "tested claims: another process on the machine can only slow a round down, hence the fastest round.",
    ]
    return Summary(
        title="Training-step cost of each norm",
        columns=["device", "norm", "step ms", "norm ms", "norm %", "samples/s", "peak MiB", "x bn", "x none"],
        rows=rows,
        notes=notes,
        data={"sessions": sessions},
    )


def plot(out) -> list[Path]:
    """``speed-LEVEL-DEVICE.png`` per session: horizontal bars of step time split into the norm's and the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for s in collect(out):
        norms = _ordered(s["norms"])
        step = [s["norms"][n]["step_ms"] for n in norms]
        norm_ms = [t * s["norms"][n]["norm_share"] for t, n in zip(step, norms)]
        rest = [t - m for t, m in zip(step, norm_ms)]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(norms) + 1.6))
        ys = list(range(len(norms)))[::-1]
        ax.barh(ys, norm_ms, color="tab:orange", label="norm (profiled share)")
        ax.barh(ys, rest, left=norm_ms, color="tab:blue", alpha=0.6, label="rest of the step")
        for y, t in zip(ys, step):
            if math.isfinite(t):
                ax.text(t, y, f" {t:.1f}", va="center", fontsize=8)
        finite = [t for t in step if math.isfinite(t)]
        if finite:
            ax.set_xlim(0, 1.15 * max(finite))  # room for the labels
        ax.set_yticks(ys)
        ax.set_yticklabels(norms)
        ax.set_xlabel("training step time (ms, fastest round)")
        p = s["protocol"]
        ax.set_title(
            f"{s['device_name']} ({s['device']}, {s['threads']} threads), batch {p['batch_size']}, {s['level']}",
            fontsize=9,
        )
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        path = Path(out) / f"speed-{s['level']}-{s['device']}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


STUDY = Study(
    NAME,
    run,
    summarize,
    plot,
    "each norm's share of a training step, step time, samples/s and peak memory (torch.profiler)",
)
