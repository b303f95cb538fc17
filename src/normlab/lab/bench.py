"""``normlab bench kernels`` and ``normlab bench resnet50``: the GPU benchmarks of issue 6 (fused Triton kernels).

Both commands time normlab next to torch in one process, print a table as they go and append each result to a CSV
at once (so a run stopped by a time limit keeps what it measured). Every CSV row carries the device name, the
torch / triton / CUDA / Python versions and the git commit of normlab's source (as :func:`normlab.lab.runs.env_info`
records them; where the source is not a git checkout, e.g. a copy on a GPU machine, the environment variable
``NORMLAB_GIT_COMMIT`` supplies it).

``bench kernels``: one normalization op at a time, forward (``fwd``) and forward+backward (``fwd+bwd``:
``torch.autograd.grad`` of the output with respect to the input and every parameter, given a random output
gradient), for three implementations:

* ``normlab``: the normlab module with ``backend="triton"`` (the fused kernels);
* ``eager``: torch's own module (``nn.GroupNorm``, ``nn.InstanceNorm2d(affine=True)``, ``nn.BatchNorm2d`` in
  training mode, ``nn.LayerNorm`` / ``nn.RMSNorm``; for LayerNorm2d / RMSNorm2d torch's LayerNorm / RMSNorm on the
  channels-last permutation, as timm does); FRN+TLU and EvoNorm-S0, which torch lacks, use normlab's reference
  backend (plain PyTorch) as the eager baseline;
* ``compile``: ``torch.compile`` (Inductor, default mode) of that eager baseline module.

Shapes: the ResNet-50 activations (32, 256, 56, 56), (32, 64, 112, 112) and (2, 256, 56, 56), NCHW and
channels-last, float32 and bfloat16; LayerNorm and RMSNorm also over transformer rows (16384, 1024) as (N, C) input.
Parameters are in the input's dtype. Times are medians of :func:`triton.testing.do_bench` (it flushes L2 between
calls). GB/s counts the roofline traffic: 2 x elements x bytes per element for the forward (read x, write y),
5 x for forward+backward (plus read x, dy and write dx), and ``*_bw_frac`` divides by the device-to-device copy
bandwidth measured once per run (bytes read + written by a 1 GiB copy), as in ANCHORS.md. ``speedup_vs_eager`` is
eager ms / normlab ms (above 1: normlab is faster).

``bench resnet50``: a full SGD training step (forward, cross-entropy, backward, ``optimizer.step()``, ``zero_grad``)
of :class:`normlab.lab.models.ResNet50` on random 224x224 images, in two configurations (batch 64 under bfloat16
autocast, channels-last; batch 32 float32 NCHW), with torch BatchNorm, normlab BatchNorm (backend triton), normlab
GroupNorm(32) (triton), torch GroupNorm(32) and no norm (Identity), eager; ``--compile`` adds ``torch.compile`` of
the whole model for the four norms. A setting's time is the median step over ``steps`` timed steps after ``warmup``
steps, each step between two device synchronizations. The normalization cost is a step minus the no-norm step of the
same configuration (eager only: the no-norm model is not compiled). A second CSV (``...-targets.csv``) holds the
ratios the issue's targets name, rewritten after every measurement.

Missing pieces are reported, not fatal: a normlab op without a Triton kernel (yet) gives rows with status
``unavailable: ...``; an implementation that raises gives ``error: ...``, and the run goes on. (A CUDA error that
corrupts the context, such as an illegal memory access, makes every later row an error too.)

Without CUDA only ``--smoke`` runs: tiny shapes and a few repetitions on CPU, for tests (the times mean nothing).
There the normlab rows use backend triton when ``TRITON_INTERPRET=1`` is set (Triton's interpreter), else the
reference backend; ``--backend`` overrides.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import kernels
from ..factory import get_norm_layer
from ..functional._checks import unknown_name_error

__all__ = [
    "KERNEL_OPS",
    "KERNEL_COLUMNS",
    "RESNET_SETTINGS",
    "RESNET_CONFIGS",
    "RESNET_COLUMNS",
    "TARGET_COLUMNS",
    "ENV_COLUMNS",
    "bench_kernels",
    "bench_resnet50",
    "resnet_targets",
    "roofline_bytes",
    "copy_bandwidth_gbps",
    "cuda_timer",
    "cuda_graph_timer",
    "cpu_timer",
    "parse_shape",
    "add_bench_parser",
]

ENV_COLUMNS = ["device", "torch", "triton", "cuda", "python", "normlab", "git_commit", "git_dirty", "created"]
KERNEL_COLUMNS = [
    "op",
    "label",
    "shape",
    "dtype",
    "layout",
    "pass",
    "elements",
    "traffic_bytes",
    "normlab_backend",
    "baseline",
    "normlab_ms",
    "eager_ms",
    "compile_ms",
    "normlab_gbps",
    "eager_gbps",
    "compile_gbps",
    "normlab_bw_frac",
    "eager_bw_frac",
    "compile_bw_frac",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "normlab_graph_ms",
    "eager_graph_ms",
    "graph_speedup_vs_eager",
    "normlab_graph_bw_frac",
    "normlab_graph_status",
    "eager_graph_status",
    "normlab_status",
    "eager_status",
    "compile_status",
    "copy_gbps",
    *ENV_COLUMNS,
]
RESNET_COLUMNS = [
    "config",
    "setting",
    "mode",
    "round",
    "backend",
    "batch",
    "image_size",
    "precision",
    "layout",
    "step_ms",
    "step_ms_min",
    "step_ms_max",
    "norm_cost_ms",
    "norm_share",
    "steps",
    "warmup",
    "first_step_s",
    "graph_breaks",
    "status",
    *ENV_COLUMNS,
]
TARGET_COLUMNS = ["config", "ratio", "numerator_ms", "denominator_ms", "value", "target", "met", *ENV_COLUMNS]

_IMPLS = ("normlab", "eager", "compile")
_GRAPH_IMPLS = ("normlab", "eager")  # also timed as CUDA-graph replays: the GPU's time without the host's
_PASSES = ("fwd", "fwd+bwd")
_TRAFFIC = {"fwd": 2, "fwd+bwd": 5}
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
_LAYOUTS = {"channels_last": "channels_last", "cl": "channels_last", "nhwc": "channels_last", "nchw": "nchw"}
_COMPILE_SCOPES = ("all", "bf16-cl", "none")
_BACKENDS = ("triton", "reference", "native", "auto", "auto-gpu")

_SHAPES = ((32, 256, 56, 56), (32, 64, 112, 112), (2, 256, 56, 56))
_ROWS = (16384, 1024)
_SMOKE_SHAPES = ((2, 32, 5, 5),)
_SMOKE_ROWS = (4, 64)


# ----------------------------------------------------------------------------------------------------- the ops


class _Permuted(nn.Module):
    """A norm over the last dim applied to (N, C, H, W) through its channels-last permutation (timm's LayerNorm2d)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class _KernelOp:
    """One benchmarked op: how to build the normlab module and torch's (None: normlab's reference backend)."""

    label: str
    kernel: str  # the op name normlab.kernels dispatches (and triton_ops must export)
    normlab: Callable[[int], nn.Module]
    torch: Callable[[int], nn.Module] | None
    baseline: str
    rows: bool = False  # transformer rows (N, C) instead of (N, C, H, W)
    groups: int | None = None  # C must be divisible by this


def _layers():
    from .. import layers

    return layers


KERNEL_OPS: dict[str, _KernelOp] = {
    "gn": _KernelOp(
        "GroupNorm(32)",
        "group_norm",
        lambda c: _layers().GroupNorm(c, num_groups=32),
        lambda c: nn.GroupNorm(32, c),
        "nn.GroupNorm",
        groups=32,
    ),
    "in": _KernelOp(
        "InstanceNorm2d(affine)",
        "instance_norm",
        lambda c: _layers().InstanceNorm2d(c),
        lambda c: nn.InstanceNorm2d(c, affine=True),
        "nn.InstanceNorm2d",
    ),
    "bn": _KernelOp(
        "BatchNorm2d(train)", "batch_norm", lambda c: _layers().BatchNorm2d(c), nn.BatchNorm2d, "nn.BatchNorm2d"
    ),
    "ln2d": _KernelOp(
        "LayerNorm2d",
        "layer_norm2d",
        lambda c: _layers().LayerNorm2d(c),
        lambda c: _Permuted(nn.LayerNorm(c, eps=1e-6)),
        "permute+nn.LayerNorm",
    ),
    "rms2d": _KernelOp(
        "RMSNorm2d",
        "rms_norm2d",
        lambda c: _layers().RMSNorm2d(c),
        lambda c: _Permuted(nn.RMSNorm(c, eps=1e-6)),
        "permute+nn.RMSNorm",
    ),
    "frn": _KernelOp(
        "FRN+TLU", "filter_response_norm", lambda c: _layers().FilterResponseNorm2d(c), None, "normlab reference"
    ),
    "evo_s0": _KernelOp(
        "EvoNorm-S0(32)",
        "evonorm_s0",
        lambda c: _layers().EvoNorm2dS0(c, num_groups=32),
        None,
        "normlab reference",
        groups=32,
    ),
    "ln": _KernelOp(
        "LayerNorm(rows)", "layer_norm", lambda c: _layers().LayerNorm(c), nn.LayerNorm, "nn.LayerNorm", rows=True
    ),
    "rms": _KernelOp(
        "RMSNorm(rows)",
        "rms_norm",
        lambda c: _layers().RMSNorm(c),
        lambda c: nn.RMSNorm(c, eps=1e-6),
        "nn.RMSNorm",
        rows=True,
    ),
}
"""The ops of ``bench kernels`` by their CLI name (the factory's spec names)."""


# ------------------------------------------------------------------------------------------ shared helpers


def roofline_bytes(numel: int, element_size: int, pass_: str) -> int:
    """The minimum memory traffic of one pass of a normalization: 2 x the tensor for ``"fwd"`` (read x, write y),
    5 x for ``"fwd+bwd"`` (also read x and dy, write dx).

    Example:
        >>> from normlab.lab.bench import roofline_bytes
        >>> roofline_bytes(32 * 256 * 56 * 56, 2, "fwd+bwd") / 1e6
        256.90112
    """
    return _TRAFFIC[pass_] * numel * element_size


def parse_shape(owner: str, text: str, dims: int) -> tuple[int, ...]:
    """``"32,256,56,56"`` or ``"32x256x56x56"`` -> a tuple of ``dims`` positive ints; ValueError naming ``owner``.

    Example:
        >>> from normlab.lab.bench import parse_shape
        >>> parse_shape("bench kernels", "2x256x56x56", 4)
        (2, 256, 56, 56)
    """
    parts = str(text).replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != dims or any(s <= 0 for s in shape):
        raise ValueError(f"{owner}: shape={text!r} must be {dims} positive integers separated by ',' or 'x'")
    return shape


def _names(owner: str, kind: str, given: Iterable[str] | None, valid: Sequence[str] | dict, default) -> list:
    """Validate a list of names: ValueError listing the valid ones for an unknown name or an empty list."""
    if given is None:
        return list(default)
    given = [str(g).strip().lower() for g in given]
    if not given:
        raise ValueError(f"{owner}: at least one {kind} is needed; valid: {', '.join(valid)}")
    for name in given:
        if name not in valid:
            raise ValueError(f"{owner}: {unknown_name_error(kind, name, valid)}")
    out = [valid[g] if isinstance(valid, dict) else g for g in given]
    return list(dict.fromkeys(out))


def _git_columns() -> dict:
    from .runs import git_commit

    git = git_commit()
    commit = git["commit"] or os.environ.get("NORMLAB_GIT_COMMIT") or None
    return {"git_commit": commit, "git_dirty": git["dirty"]}


def _env_columns(device: torch.device) -> dict:
    """The environment columns of every CSV row (see :data:`ENV_COLUMNS`)."""
    import normlab

    from .runs import env_info

    info = env_info(device)
    return {
        "device": info["device_name"],
        "torch": info["torch"],
        "triton": info["triton"],
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": info["python"],
        "normlab": info["normlab"] or normlab.__version__,
        **_git_columns(),
        "created": info["created"],
    }


class _CsvSink:
    """A CSV written row by row and flushed each time, so a killed run keeps every finished row."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=list(columns))
        self._writer.writeheader()
        self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: _csv_value(v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    sink = _CsvSink(path, columns)
    for row in rows:
        sink.write(row)
    sink.close()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _default_backend(device: torch.device) -> str:
    """triton on CUDA or under Triton's interpreter; the reference elsewhere (CPU without the interpreter)."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


def _unavailable(op: str, probe: torch.Tensor, backend: str) -> str | None:
    """Why normlab's ``op`` cannot run on ``probe``'s device under ``backend`` (an ``unavailable: ...`` or
    ``error: ...`` status), or None when it can."""
    try:
        impl = kernels.resolve(op, probe, backend)
    except RuntimeError as err:  # the dispatch's answer when Triton or the kernels cannot be imported
        return f"unavailable: {err}"
    except Exception as err:
        return _error(err)
    if backend == "triton" and impl is not kernels._triton_impl(op):  # an op without a kernel runs unfused
        return f"unavailable: no Triton kernel for {op!r}"
    return None


def _error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"error: {type(err).__name__}: {text[:300]}"


def _compile_reset() -> None:
    """Forget earlier compiled code: each benchmarked module compiles fresh, and no recompile limit is hit."""
    import torch._dynamo

    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------- timers

Timer = Callable[[Callable[[], object]], float]


def cuda_timer(smoke: bool) -> Timer:
    warmup_ms, rep_ms = (2, 5) if smoke else (5, 30)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None

    def time_ms(fn):
        fn()  # first call: JIT / compile and allocator warm-up, kept out of do_bench's run-time estimate
        fn()
        torch.cuda.synchronize()
        if do_bench is not None:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        return _cuda_event_median(fn, reps=max(3, rep_ms // 2))

    return time_ms


def cuda_graph_timer() -> Timer:
    """Median time of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: many calls unrolled
    in one graph, no L2 flush between them): the GPU's time, without the host's launch and Python overhead."""
    from triton.testing import do_bench_cudagraph

    def time_ms(fn):
        fn()
        torch.cuda.synchronize()
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))

    return time_ms


def _cuda_event_median(fn, reps: int) -> float:
    """Median of CUDA-event timings (used only where Triton, hence do_bench, is missing)."""
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def cpu_timer(reps: int) -> Timer:
    def time_ms(fn):
        fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return time_ms


def copy_bandwidth_gbps(device: torch.device, timer: Timer, numel: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read and written (``dst.copy_(src)``, float32)."""
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e6)


# ------------------------------------------------------------------------------------------ bench kernels


@dataclass(frozen=True)
class _Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # "nchw" | "channels_last" | "rows"


def _kernel_cases(ops, shapes, rows, dtypes, layouts) -> list[_Case]:
    """Per dtype (in the order given): every image op at every shape and layout, then the rows ops, so that a run
    cut short has the first dtype's (by default bfloat16's) whole picture."""
    cases = []
    for dtype in dtypes:
        for shape in shapes:
            for layout in layouts:
                cases += [_Case(op, shape, dtype, layout) for op in ops if not KERNEL_OPS[op].rows]
        cases += [_Case(op, rows, dtype, "rows") for op in ops if KERNEL_OPS[op].rows]
    return cases


def _input(case: _Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(case.shape, dtype=case.dtype, device=device)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    return x, torch.randn_like(x)


def _time_passes(
    module: nn.Module, x, grad, *, backend: str, compiled: bool, timer: Timer, only: Sequence[str] = _PASSES
) -> dict:
    """``{pass: (ms or None, status)}`` for one implementation (the passes not in ``only``: ``skipped``); an
    exception marks that pass as an error."""
    params = [p for p in module.parameters() if p.requires_grad]
    with kernels.use_backend(backend):
        if compiled:
            _compile_reset()
            run = torch.compile(module)
        else:
            run = module
        # fwd+bwd first: under torch.compile its first call compiles the forward and backward graphs
        passes = {
            "fwd+bwd": lambda: torch.autograd.grad(run(x), [x, *params], grad),
            "fwd": lambda: run(x),
        }
        out = {name: (None, "skipped") for name in passes if name not in only}
        for name, fn in passes.items():
            if name not in only:
                continue
            try:
                out[name] = (timer(fn), "ok")
            except Exception as err:  # a failing implementation is a result, not the end of the run
                out[name] = (None, _error(err))
    return out


def _measure_case(
    case: _Case, device, *, backend: str, compiled: bool, timer: Timer, graph_timer: Timer | None = None
) -> dict:
    """``{impl: {pass: (ms, status)}}`` of one case."""
    op = KERNEL_OPS[case.op]
    channels = case.shape[1]
    x, grad = _input(case, device)
    results = {}

    why = _unavailable(op.kernel, x, backend) if backend == "triton" else None
    if why is not None:
        results["normlab"] = {p: (None, why) for p in _PASSES}
    else:
        module = op.normlab(channels).to(device=device, dtype=case.dtype).train()
        results["normlab"] = _time_passes(module, x, grad, backend=backend, compiled=False, timer=timer)

    baseline_backend = "reference"  # for the normlab-reference baseline of FRN / EvoNorm; inert for torch modules
    build = op.torch if op.torch is not None else op.normlab
    module = build(channels).to(device=device, dtype=case.dtype).train()
    results["eager"] = _time_passes(module, x, grad, backend=baseline_backend, compiled=False, timer=timer)
    if compiled:
        module = build(channels).to(device=device, dtype=case.dtype).train()
        results["compile"] = _time_passes(module, x, grad, backend=baseline_backend, compiled=True, timer=timer)
    else:
        results["compile"] = {p: (None, "skipped") for p in _PASSES}
    for impl in _GRAPH_IMPLS:
        results[f"{impl}_graph"] = {p: (None, "skipped") for p in _PASSES}
    if graph_timer is not None:
        if why is None:
            module = op.normlab(channels).to(device=device, dtype=case.dtype).train()
            results["normlab_graph"] = _time_passes(
                module, x, grad, backend=backend, compiled=False, timer=graph_timer, only=("fwd+bwd",)
            )
        module = build(channels).to(device=device, dtype=case.dtype).train()
        results["eager_graph"] = _time_passes(
            module, x, grad, backend=baseline_backend, compiled=False, timer=graph_timer, only=("fwd+bwd",)
        )
    del x, grad
    _free(device)
    return results


def _kernel_rows(case: _Case, results: dict, *, backend: str, copy_gbps: float, env: dict) -> list[dict]:
    op = KERNEL_OPS[case.op]
    numel = math.prod(case.shape)
    element_size = torch.empty((), dtype=case.dtype).element_size()
    rows = []
    for pass_ in _PASSES:
        traffic = roofline_bytes(numel, element_size, pass_)
        ms = {impl: results[impl][pass_][0] for impl in _IMPLS}
        gbps = {impl: None if v is None else traffic / (v * 1e6) for impl, v in ms.items()}
        row = {
            "op": case.op,
            "label": op.label,
            "shape": "x".join(map(str, case.shape)),
            "dtype": _DTYPE_NAMES[case.dtype],
            "layout": case.layout,
            "pass": pass_,
            "elements": numel,
            "traffic_bytes": traffic,
            "normlab_backend": backend,
            "baseline": op.baseline,
        }
        row.update({f"{impl}_ms": ms[impl] for impl in _IMPLS})
        row.update({f"{impl}_gbps": gbps[impl] for impl in _IMPLS})
        row.update({f"{impl}_bw_frac": None if g is None else g / copy_gbps for impl, g in gbps.items()})
        ours = ms["normlab"]
        row["speedup_vs_eager"] = ms["eager"] / ours if ours and ms["eager"] else None
        row["speedup_vs_compile"] = ms["compile"] / ours if ours and ms["compile"] else None
        row.update({f"{impl}_status": results[impl][pass_][1] for impl in _IMPLS})
        graph = {impl: results[f"{impl}_graph"][pass_] for impl in _GRAPH_IMPLS}
        ours_graph, theirs_graph = graph["normlab"][0], graph["eager"][0]
        row["normlab_graph_ms"], row["eager_graph_ms"] = ours_graph, theirs_graph
        row["graph_speedup_vs_eager"] = theirs_graph / ours_graph if ours_graph and theirs_graph else None
        row["normlab_graph_bw_frac"] = traffic / (ours_graph * 1e6) / copy_gbps if ours_graph else None
        row.update({f"{impl}_graph_status": graph[impl][1] for impl in _GRAPH_IMPLS})
        row["copy_gbps"] = copy_gbps
        row.update(env)
        rows.append(row)
    return rows


_KERNEL_TABLE = (
    f"{'op':<8} {'shape':<14} {'dtype':<5} {'layout':<13} {'pass':<8} {'normlab ms':>10} {'eager ms':>9} "
    f"{'compile ms':>10} {'normlab GB/s':>12} {'%copy':>6} {'x eager':>8} {'x compile':>9}"
)


def _kernel_line(row: dict) -> str:
    normlab_ms = _fmt(row["normlab_ms"], ".4f") if row["normlab_ms"] is not None else _short(row["normlab_status"])
    frac = row["normlab_bw_frac"]
    return (
        f"{row['op']:<8} {row['shape']:<14} {row['dtype']:<5} {row['layout']:<13} {row['pass']:<8} "
        f"{normlab_ms:>10} {_fmt(row['eager_ms'], '.4f'):>9} {_fmt(row['compile_ms'], '.4f'):>10} "
        f"{_fmt(row['normlab_gbps'], '.0f'):>12} {_fmt(None if frac is None else 100 * frac, '.1f'):>6} "
        f"{_fmt(row['speedup_vs_eager'], '.2f'):>8} {_fmt(row['speedup_vs_compile'], '.2f'):>9}"
    )


def _short(status: str) -> str:
    """A status in a table cell: the reason is printed once below the table."""
    return "n/a" if status.startswith("unavailable") else status.split(":", 1)[0]


def _resolve_device_and_backend(owner: str, smoke: bool, backend: str | None) -> tuple[torch.device, str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        raise RuntimeError(
            f"{owner}: timing needs a CUDA GPU and none is available; --smoke runs a tiny CPU configuration (for "
            "tests: its times mean nothing)"
        )
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"{owner}: {unknown_name_error('backend', str(backend), _BACKENDS)}")
    return device, backend or _default_backend(device)


def bench_kernels(
    out,
    *,
    ops: Iterable[str] | None = None,
    shapes: Iterable[str | Sequence[int]] | None = None,
    rows: str | Sequence[int] | None = None,
    dtypes: Iterable[str] | None = None,
    layouts: Iterable[str] | None = None,
    compile: str = "all",
    smoke: bool = False,
    backend: str | None = None,
    graph: bool = True,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Time every op at every shape, dtype and layout for normlab, torch eager and torch.compile; write ``out`` (CSV).

    Args:
        out: the CSV file to write (its folder is created).
        ops: names from :data:`KERNEL_OPS` (default: all).
        shapes: (N, C, H, W) shapes for the image ops, as tuples or ``"N,C,H,W"`` strings (default: the ResNet-50
            shapes; with ``smoke``, one tiny shape).
        rows: the (N, C) shape of the rows ops (default (16384, 1024); tiny with ``smoke``).
        dtypes: ``"bf16"``, ``"fp32"``, ``"fp16"`` (default bf16 then fp32).
        layouts: ``"channels_last"``, ``"nchw"`` for the image ops (default both, channels-last first).
        compile: where to time torch.compile: ``"all"`` cases, only the bfloat16 channels-last (and bfloat16 rows)
            cases ``"bf16-cl"`` (each compile takes seconds), or ``"none"``.
        smoke: tiny shapes and few repetitions (the only mode without CUDA).
        backend: normlab's backend (default: triton on CUDA or under ``TRITON_INTERPRET=1``, else reference).
        graph: on CUDA, also time normlab's and torch eager's forward+backward as CUDA-graph replays (columns
            ``*_graph_*``, empty in the fwd rows): the GPU's time without the host's launch and Python overhead.
        echo: where the table goes.

    Returns:
        The CSV's rows (two per case: fwd and fwd+bwd).

    Raises:
        ValueError: for an unknown op, dtype, layout, compile scope or backend, a malformed shape, or a shape whose
            C the grouped ops (GroupNorm(32), EvoNorm-S0(32)) cannot split into 32 groups.
        RuntimeError: without CUDA unless ``smoke``.
    """
    owner = "bench kernels"
    ops = _names(owner, "op", ops, list(KERNEL_OPS), KERNEL_OPS)
    dtypes = _names(owner, "dtype", dtypes, _DTYPES, (torch.bfloat16, torch.float32))
    layouts = _names(owner, "layout", layouts, _LAYOUTS, ("channels_last", "nchw"))
    if compile not in _COMPILE_SCOPES:
        raise ValueError(f"{owner}: {unknown_name_error('compile scope', str(compile), _COMPILE_SCOPES)}")
    if shapes is None:
        shapes = _SMOKE_SHAPES if smoke else _SHAPES
    shapes = [s if isinstance(s, tuple) else parse_shape(owner, s, 4) for s in shapes]
    if not shapes:
        raise ValueError(f"{owner}: shapes=[] needs at least one N,C,H,W shape")
    rows_shape = rows if rows is not None else (_SMOKE_ROWS if smoke else _ROWS)
    rows_shape = rows_shape if isinstance(rows_shape, tuple) else parse_shape(owner, rows_shape, 2)
    for name in ops:
        groups = KERNEL_OPS[name].groups
        for shape in shapes:
            if groups and not KERNEL_OPS[name].rows and shape[1] % groups:
                raise ValueError(
                    f"{owner}: op {name!r} ({KERNEL_OPS[name].label}) needs C divisible by {groups}; shape "
                    f"{'x'.join(map(str, shape))} has C={shape[1]}"
                )
    device, backend = _resolve_device_and_backend(owner, smoke, backend)

    timer = cuda_timer(smoke) if device.type == "cuda" else cpu_timer(reps=2)
    graph_timer = cuda_graph_timer() if graph and device.type == "cuda" else None
    copy_numel = (1 << 20) if smoke else (1 << 28)  # 4 MiB / 1 GiB of float32
    copy_gbps = copy_bandwidth_gbps(device, timer, copy_numel)
    _free(device)
    env = _env_columns(device)
    echo(f"device: {env['device']}   torch {env['torch']}   triton {env['triton']}   cuda {env['cuda']}")
    echo(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s;   normlab backend: {backend}")
    echo("x eager / x compile: their time over normlab's (above 1: normlab is faster)\n")
    echo(_KERNEL_TABLE)

    sink = _CsvSink(Path(out), KERNEL_COLUMNS)
    all_rows, notes = [], {}
    try:
        for case in _kernel_cases(ops, shapes, rows_shape, dtypes, layouts):
            compiled = compile == "all" or (
                compile == "bf16-cl" and case.dtype == torch.bfloat16 and case.layout in ("channels_last", "rows")
            )
            results = _measure_case(
                case, device, backend=backend, compiled=compiled, timer=timer, graph_timer=graph_timer
            )
            for row in _kernel_rows(case, results, backend=backend, copy_gbps=copy_gbps, env=env):
                sink.write(row)
                all_rows.append(row)
                echo(_kernel_line(row))
                for impl in _IMPLS:
                    status = row[f"{impl}_status"]
                    if status not in ("ok", "skipped"):
                        notes.setdefault(f"{impl}: {status}", []).append(case.op)
    finally:
        sink.close()
    for note, where in notes.items():
        echo(f"note: {note} ({', '.join(dict.fromkeys(where))})")
    echo(f"\nwrote {sink.path}")
    return all_rows


# ----------------------------------------------------------------------------------------- bench resnet50


def _torch_group_norm32(num_features: int) -> nn.Module:
    return nn.GroupNorm(32, num_features)


@dataclass(frozen=True)
class _Setting:
    label: str
    norm: object  # a factory spec for ResNet50
    kernel: str | None = None  # the normlab op it dispatches (None: no normlab layer)
    backend: str | None = None  # its own normlab backend (default: the run's)


@dataclass(frozen=True)
class _Config:
    batch: int
    autocast: torch.dtype | None
    channels_last: bool

    @property
    def precision(self) -> str:
        return "fp32" if self.autocast is None else f"{_DTYPE_NAMES[self.autocast]}-autocast"


RESNET_SETTINGS: dict[str, _Setting] = {
    "torch-bn": _Setting("torch BatchNorm2d", nn.BatchNorm2d),
    "normlab-bn": _Setting("normlab BatchNorm2d", "bn", "batch_norm"),
    "normlab-gn": _Setting("normlab GroupNorm(32)", "gn:32", "group_norm"),
    # what a user gets by default: the dispatch picks torch's op where the kernel measured slower (triton_ops)
    "normlab-bn-auto": _Setting("normlab BatchNorm2d, backend auto", "bn", "batch_norm", backend="auto"),
    "normlab-gn-auto": _Setting("normlab GroupNorm(32), backend auto", "gn:32", "group_norm", backend="auto"),
    # the same without the NaN guard: what the guard costs (compiled: exactly torch's graph)
    "normlab-bn-noguard-auto": _Setting(
        "normlab BatchNorm2d(nan_guard=False), backend auto",
        get_norm_layer("bn", nan_guard=False),
        "batch_norm",
        backend="auto",
    ),
    # routed by GPU time alone (backend auto-gpu): what a CUDA-graph step should use
    "normlab-bn-auto-gpu": _Setting("normlab BatchNorm2d, backend auto-gpu", "bn", "batch_norm", backend="auto-gpu"),
    "normlab-gn-auto-gpu": _Setting(
        "normlab GroupNorm(32), backend auto-gpu", "gn:32", "group_norm", backend="auto-gpu"
    ),
    "torch-gn": _Setting("torch GroupNorm(32)", _torch_group_norm32),
    "none": _Setting("no norm (Identity)", "none"),
}
"""The norms of ``bench resnet50``; all but ``none`` also run compiled with ``--compile``."""

RESNET_CONFIGS: dict[str, _Config] = {
    "b64-bf16-cl": _Config(64, torch.bfloat16, True),
    "b32-fp32-nchw": _Config(32, None, False),
}
"""The step configurations of ``bench resnet50``: batch, autocast dtype, channels-last."""

# torch's layers and what a user of the default dispatch gets (under torch.compile, auto hands Inductor torch's ops:
# the issue's compile target), then normlab's kernels forced into the compiled graph as custom ops
_COMPILED_ORDER = (
    "torch-gn",
    "normlab-gn-auto",
    "torch-bn",
    "normlab-bn-auto",
    "normlab-bn-noguard-auto",
    "normlab-gn",
    "normlab-bn",
)


def _graph_breaks() -> int | None:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return sum(counters["graph_break"].values())


def _clear_graph_breaks() -> None:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return
    counters["graph_break"].clear()


def _time_resnet(
    setting: _Setting, config: _Config, *, compiled: bool, device, image_size, batch, steps, warmup, graph=False
):
    """``(median, min, max step ms, first step s, graph breaks)`` of one setting's training step; ``graph``: the
    step captured once in a CUDA graph and replayed (PyTorch's whole-network capture: forward, backward and the
    optimizer step), which times the GPU's work without the host's launch and Python overhead."""
    import torch.nn.functional as F

    from .models import ResNet50

    torch.manual_seed(0)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = ResNet50(setting.norm).to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), device=device)
    if compiled:
        _compile_reset()
        _clear_graph_breaks()
    run = torch.compile(model) if compiled else model

    def step(zero_grad=True):
        # a CUDA graph must not cache autocast's casts across its capture (the cache would be freed memory)
        with torch.autocast(
            device.type,
            dtype=config.autocast or torch.float32,
            enabled=config.autocast is not None,
            cache_enabled=not graph,
        ):
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)

    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first_step_s = time.perf_counter() - t0
    if graph:
        # warm up on a side stream (the momentum buffers are made there), then capture one step: the gradients
        # set to None before the capture are allocated in the graph's pool and rewritten by every replay
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup - 1, 2)):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step(zero_grad=False)
        step = captured.replay  # the timed step is the replay
        step()
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    breaks = _graph_breaks() if compiled else None
    return statistics.median(times), min(times), max(times), first_step_s, breaks


_RATIOS = (
    # (name, numerator (setting, mode), denominator, what, target): "cost" compares normalization costs
    ("normlab-gn eager / torch-bn eager", ("normlab-gn", "eager"), ("torch-bn", "eager"), "step", 1.0),
    ("normlab-gn eager / torch-gn compile", ("normlab-gn", "eager"), ("torch-gn", "compile"), "step", 0.9),
    ("normlab-bn norm cost / torch-bn norm cost", ("normlab-bn", "eager"), ("torch-bn", "eager"), "cost", 0.5),
    # compiled, normlab's layers with the default dispatch (auto), then with the kernels forced in as custom ops
    (
        "normlab-gn-auto compile / torch-gn compile",
        ("normlab-gn-auto", "compile"),
        ("torch-gn", "compile"),
        "step",
        1.0,
    ),
    (
        "normlab-bn-auto compile / torch-bn compile",
        ("normlab-bn-auto", "compile"),
        ("torch-bn", "compile"),
        "step",
        1.0,
    ),
    (
        "normlab-bn-noguard-auto compile / torch-bn compile",
        ("normlab-bn-noguard-auto", "compile"),
        ("torch-bn", "compile"),
        "step",
        None,
    ),
    ("normlab-gn compile / torch-gn compile", ("normlab-gn", "compile"), ("torch-gn", "compile"), "step", None),
    ("normlab-bn compile / torch-bn compile", ("normlab-bn", "compile"), ("torch-bn", "compile"), "step", None),
    ("torch-gn eager / torch-bn eager", ("torch-gn", "eager"), ("torch-bn", "eager"), "step", None),
    ("normlab-bn eager / torch-bn eager", ("normlab-bn", "eager"), ("torch-bn", "eager"), "step", None),
    # what the default dispatch gives (backend auto: torch's op where the kernel measured slower)
    ("normlab-gn-auto eager / torch-bn eager", ("normlab-gn-auto", "eager"), ("torch-bn", "eager"), "step", None),
    ("normlab-bn-auto eager / torch-bn eager", ("normlab-bn-auto", "eager"), ("torch-bn", "eager"), "step", None),
    # the same comparisons between CUDA-graph replays of the step: the GPU's share, without host overhead
    ("normlab-gn graph / torch-bn graph", ("normlab-gn", "graph"), ("torch-bn", "graph"), "step", None),
    ("normlab-gn graph / torch-gn graph", ("normlab-gn", "graph"), ("torch-gn", "graph"), "step", None),
    ("normlab-bn norm cost / torch-bn norm cost (graph)", ("normlab-bn", "graph"), ("torch-bn", "graph"), "cost", None),
    (
        "normlab-gn-auto-gpu graph / torch-bn graph",
        ("normlab-gn-auto-gpu", "graph"),
        ("torch-bn", "graph"),
        "step",
        None,
    ),
    (
        "normlab-bn-auto-gpu graph / torch-bn graph",
        ("normlab-bn-auto-gpu", "graph"),
        ("torch-bn", "graph"),
        "step",
        None,
    ),
)


def resnet_targets(rows: Iterable[dict]) -> list[dict]:
    """The issue's target ratios from ``bench resnet50`` rows, per configuration.

    A ratio is None where a term was not measured (failed, unavailable, or not compiled); ``met`` is "yes" / "no"
    for ratios with a target (the ratio must be at most the target), "" otherwise. Rows of several rounds
    (``rounds``) count with the median of their rounds' values (their mean for two rounds).

    Example:
        >>> from normlab.lab.bench import resnet_targets
        >>> rows = [
        ...     {"config": "c", "setting": "torch-bn", "mode": "eager", "step_ms": 20.0, "norm_cost_ms": 4.0},
        ...     {"config": "c", "setting": "normlab-gn", "mode": "eager", "step_ms": 19.0, "norm_cost_ms": 3.0},
        ... ]
        >>> [(r["ratio"], r["value"], r["met"]) for r in resnet_targets(rows)][:1]
        [('normlab-gn eager / torch-bn eager', 0.95, 'yes')]
    """
    by_key, configs = {}, []
    for row in rows:
        by_key.setdefault((row["config"], row["setting"], row["mode"]), []).append(row)
        if row["config"] not in configs:
            configs.append(row["config"])

    def pooled(key, field):
        values = [row[field] for row in by_key.get(key, ()) if row.get(field) is not None]
        return statistics.median(values) if values else None

    out = []
    for config in configs:
        for name, num_key, den_key, what, target in _RATIOS:
            field = "step_ms" if what == "step" else "norm_cost_ms"
            num = pooled((config, *num_key), field)
            den = pooled((config, *den_key), field)
            # a cost at or below zero is noise (a norm cannot make the step faster): no ratio of it
            value = num / den if num is not None and den is not None and den > 0 else None
            met = "" if target is None or value is None else ("yes" if value <= target else "no")
            out.append(
                {
                    "config": config,
                    "ratio": name,
                    "numerator_ms": num,
                    "denominator_ms": den,
                    "value": value,
                    "target": None if target is None else f"<= {target:g}",
                    "met": met,
                }
            )
    return out


_RESNET_TABLE = (
    f"{'config':<14} {'setting':<23} {'mode':<8} {'round':>5} {'step ms':>8} {'min':>8} {'norm ms':>8} {'share':>6} "
    f"{'1st s':>6} {'breaks':>6}  status"
)


def _resnet_line(row: dict) -> str:
    share = row["norm_share"]
    return (
        f"{row['config']:<14} {row['setting']:<23} {row['mode']:<8} {row.get('round', 1):>5} "
        f"{_fmt(row['step_ms'], '.2f'):>8} "
        f"{_fmt(row['step_ms_min'], '.2f'):>8} {_fmt(row['norm_cost_ms'], '.2f'):>8} "
        f"{_fmt(None if share is None else 100 * share, '.0f'):>6} {_fmt(row['first_step_s'], '.1f'):>6} "
        f"{_fmt(row['graph_breaks'], 'd'):>6}  {row['status']}"
    )


def _resnet_runs(
    settings: list[str], *, compiled: bool, graph: bool = False, reverse: bool = False
) -> list[tuple[str, str]]:
    """(setting, mode) in measuring order: the no-norm step first (every cost needs it), then the other eager
    settings, then the CUDA-graph replays (no-norm first), then the compiled ones, the issue's key comparisons
    first. ``reverse``: the settings of each mode in the opposite order, the no-norm step still first (the second
    round of an A-B-B-A measurement, so that a drift of the machine's speed during a round cancels in the mean)."""
    ordered = sorted(settings, key=lambda s: s != "none")
    compiled_order = [s for s in _COMPILED_ORDER if s in settings] if compiled else []
    if reverse:
        ordered = ordered[:1] + ordered[:0:-1] if ordered[:1] == ["none"] else ordered[::-1]
        compiled_order = compiled_order[::-1]
    runs = [(s, "eager") for s in ordered]
    if graph:
        runs += [(s, "graph") for s in ordered]
    runs += [(s, "compile") for s in compiled_order]
    return runs


def _resnet_row(name, mode, config_name, *, device, backend, probe, image_size, batch, steps, warmup, round_=1) -> dict:
    """One measured (or unavailable, or failed) setting as a CSV row, without its cost and environment columns."""
    setting, config = RESNET_SETTINGS[name], RESNET_CONFIGS[config_name]
    backend = setting.backend or backend
    row = {
        "config": config_name,
        "setting": name,
        "mode": mode,
        "round": round_,
        "backend": backend if setting.kernel else None,
        "batch": batch,
        "image_size": image_size,
        "precision": config.precision,
        "layout": "channels_last" if config.channels_last else "nchw",
        "steps": steps,
        "warmup": warmup,
        **dict.fromkeys(("step_ms", "step_ms_min", "step_ms_max", "norm_cost_ms", "norm_share")),
        "first_step_s": None,
        "graph_breaks": None,
    }
    why = _unavailable(setting.kernel, probe, backend) if setting.kernel and backend == "triton" else None
    if why is not None:
        row["status"] = why
        return row
    try:
        with kernels.use_backend(backend):
            median, low, high, first, breaks = _time_resnet(
                setting,
                config,
                compiled=mode == "compile",
                graph=mode == "graph",
                device=device,
                image_size=image_size,
                batch=batch,
                steps=steps,
                warmup=warmup,
            )
        row.update(step_ms=median, step_ms_min=low, step_ms_max=high, first_step_s=first, graph_breaks=breaks)
        row["status"] = "ok"
    except Exception as err:  # e.g. out of memory, a kernel's error: a result, not the end of the run
        row["status"] = _error(err)
    _free(device)
    return row


def _targets_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-targets{out.suffix or '.csv'}")


def bench_resnet50(
    out,
    *,
    settings: Iterable[str] | None = None,
    configs: Iterable[str] | None = None,
    compile: bool | Iterable[str] = False,
    steps: int | None = None,
    warmup: int | None = None,
    smoke: bool = False,
    backend: str | None = None,
    graph: bool = False,
    rounds: int = 1,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Time a ResNet-50 SGD training step per norm setting and configuration; write ``out`` and its targets CSV.

    Args:
        out: the CSV of step times; the target ratios go to ``<out stem>-targets.csv`` beside it.
        settings: names from :data:`RESNET_SETTINGS` (default: all).
        configs: names from :data:`RESNET_CONFIGS` (default: both).
        compile: True to add torch.compile of the whole model for every selected setting but ``none`` in every
            selected configuration, or the names of the configurations to compile in.
        steps: timed steps per setting (default 20; 2 with ``smoke``).
        warmup: untimed steps first, the compiling one included (default 5; 1 with ``smoke``).
        smoke: 32x32 images, batch 2 (the only mode without CUDA).
        backend: the normlab settings' backend (default: triton on CUDA or under ``TRITON_INTERPRET=1``, else
            reference).
        graph: also time every setting as a CUDA-graph replay of its whole step (mode ``graph``, CUDA only): the
            GPU's time without the host's launch and Python overhead; its norm cost is against the no-norm replay.
        rounds: measure every (setting, mode) this many times per configuration, each round in the opposite order
            of the last (A-B-B-A: a drift of the machine's speed cancels), each with a model and compile of its
            own; one row per round (column ``round``), and the targets from the median over the rounds.
        echo: where the table goes.

    Returns:
        The CSV's rows.

    Raises:
        ValueError: for an unknown setting, configuration or backend, or steps / warmup / rounds below 1.
        RuntimeError: without CUDA unless ``smoke``.
    """
    owner = "bench resnet50"
    settings = _names(owner, "setting", settings, list(RESNET_SETTINGS), RESNET_SETTINGS)
    configs = _names(owner, "config", configs, list(RESNET_CONFIGS), RESNET_CONFIGS)
    if isinstance(compile, bool):
        compile_in = configs if compile else []
    else:
        compile_in = _names(owner, "config", compile, list(RESNET_CONFIGS), ())
        missing = [c for c in compile_in if c not in configs]
        if missing:
            raise ValueError(f"{owner}: compile={missing} names configurations not selected by configs={configs}")
    steps = steps if steps is not None else (2 if smoke else 20)
    warmup = warmup if warmup is not None else (1 if smoke else 5)
    for name, value in (("steps", steps), ("warmup", warmup), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name}={value!r} must be a positive integer")
    device, backend = _resolve_device_and_backend(owner, smoke, backend)
    image_size = 32 if smoke else 224
    graph = graph and device.type == "cuda"

    env = _env_columns(device)
    echo(f"device: {env['device']}   torch {env['torch']}   triton {env['triton']}   cuda {env['cuda']}")
    echo(f"ResNet-50 SGD step, {image_size}x{image_size} random images, median of {steps} steps after {warmup} ")
    echo(f"warm-up steps; normlab backend: {backend}; norm ms = step - no-norm step (eager)")
    echo(f"{rounds} round(s) per configuration, every other one in the opposite order\n" if rounds > 1 else "")
    echo(_RESNET_TABLE)
    out = Path(out)
    sink = _CsvSink(out, RESNET_COLUMNS)
    rows = []
    probe = torch.empty(1, 64, 1, 1, device=device)
    try:
        for config_name, round_ in ((c, r) for c in configs for r in range(1, rounds + 1)):
            none_ms = {}
            runs = _resnet_runs(settings, compiled=config_name in compile_in, graph=graph, reverse=round_ % 2 == 0)
            for name, mode in runs:
                row = _resnet_row(
                    name,
                    mode,
                    config_name,
                    device=device,
                    backend=backend,
                    probe=probe,
                    image_size=image_size,
                    batch=2 if smoke else RESNET_CONFIGS[config_name].batch,
                    steps=steps,
                    warmup=warmup,
                    round_=round_,
                )
                if name == "none":
                    none_ms[mode] = row["step_ms"]
                if mode != "compile" and row["step_ms"] is not None and none_ms.get(mode) is not None:
                    row["norm_cost_ms"] = row["step_ms"] - none_ms[mode]
                    row["norm_share"] = row["norm_cost_ms"] / row["step_ms"]
                row.update(env)
                rows.append(row)
                sink.write(row)
                echo(_resnet_line(row))
                _write_csv(_targets_path(out), TARGET_COLUMNS, [{**t, **env} for t in resnet_targets(rows)])
    finally:
        sink.close()
    targets = resnet_targets(rows)
    echo(f"\n{'config':<14} {'ratio':<44} {'value':>6} {'target':>7}  met")
    for t in targets:
        echo(f"{t['config']:<14} {t['ratio']:<44} {_fmt(t['value'], '.2f'):>6} {t['target'] or '':>7}  {t['met']}")
    echo(f"\nwrote {out} and {_targets_path(out)}")
    return rows


# ---------------------------------------------------------------------------------------------------- CLI


def _default_out(kind: str) -> Path:
    return Path("runs") / "bench" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.csv"


def _bench_kernels_command(args: argparse.Namespace) -> int:
    try:
        bench_kernels(
            args.out or _default_out("kernels"),
            ops=args.ops,
            shapes=args.shapes,
            rows=args.rows,
            dtypes=args.dtypes,
            layouts=args.layouts,
            compile=args.compile,
            smoke=args.smoke,
            backend=args.backend,
            graph=not args.no_graph,
        )
    except (ValueError, RuntimeError) as err:
        print(f"normlab: error: {err}", file=sys.stderr)
        return 2
    return 0


def _bench_resnet50_command(args: argparse.Namespace) -> int:
    # --compile absent: None; bare --compile: [] (every selected config); --compile NAMES: only those
    compile_in = False if args.compile is None else (args.compile or True)
    try:
        bench_resnet50(
            args.out or _default_out("resnet50"),
            settings=args.settings,
            configs=args.configs,
            compile=compile_in,
            steps=args.steps,
            warmup=args.warmup,
            smoke=args.smoke,
            backend=args.backend,
            graph=args.graph,
            rounds=args.rounds,
        )
    except (ValueError, RuntimeError) as err:
        print(f"normlab: error: {err}", file=sys.stderr)
        return 2
    return 0


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench kernels`` and ``bench resnet50`` to an argparse ``subparsers`` object; returns the bench parser."""
    bench = subparsers.add_parser(
        "bench",
        help="GPU benchmarks of the fused kernels: per-op kernels, and ResNet-50 training steps",
        description="Time normlab's Triton kernels against torch (eager and torch.compile) on a CUDA GPU; print a "
        "table and write a CSV with the device and versions. Without CUDA only --smoke runs (tests).",
    )
    sub = bench.add_subparsers(dest="bench", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions: seconds, also on CPU")
    common.add_argument("--out", metavar="FILE", help="the CSV to write (default: runs/bench/KIND-TIME.csv)")
    common.add_argument(
        "--backend", metavar="NAME", help="normlab's backend: triton (default on CUDA), reference, native or auto"
    )

    k = sub.add_parser(
        "kernels",
        parents=[common],
        help="each norm op: normlab (triton) vs torch eager vs torch.compile, fwd and fwd+bwd",
        description="Median ms (triton.testing.do_bench), GB/s and fraction of the measured copy bandwidth of each "
        "op, forward and forward+backward, at ResNet-50 and transformer shapes.",
    )
    k.add_argument("--ops", nargs="+", metavar="OP", help=f"ops (default all): {', '.join(KERNEL_OPS)}")
    k.add_argument("--shapes", nargs="+", metavar="N,C,H,W", help="image shapes (default: the ResNet-50 ones)")
    k.add_argument("--rows", metavar="N,C", help="the rows ops' shape (default 16384,1024)")
    k.add_argument("--dtypes", nargs="+", metavar="DTYPE", help="bf16, fp32, fp16 (default: bf16 fp32)")
    k.add_argument("--layouts", nargs="+", metavar="LAYOUT", help="channels_last, nchw (default: both)")
    k.add_argument(
        "--compile",
        default="all",
        metavar="SCOPE",
        help="where to time torch.compile: all (default), bf16-cl (bfloat16 channels-last and rows only: each "
        "compile takes seconds), none",
    )
    k.add_argument(
        "--no-graph",
        action="store_true",
        help="skip the CUDA-graph timings of normlab and torch eager (the GPU's time without host overhead)",
    )
    k.set_defaults(func=_bench_kernels_command)

    r = sub.add_parser(
        "resnet50",
        parents=[common],
        help="ResNet-50 training step with torch / normlab BatchNorm, GroupNorm and no norm",
        description="Median SGD step time of a ResNet-50 (random 224x224 data) per norm, batch 64 bf16 autocast "
        "channels-last and batch 32 fp32 NCHW; the normalization cost and the issue's target ratios.",
    )
    r.add_argument("--settings", nargs="+", metavar="NAME", help=f"norms (default all): {', '.join(RESNET_SETTINGS)}")
    r.add_argument("--configs", nargs="+", metavar="NAME", help=f"configs (default all): {', '.join(RESNET_CONFIGS)}")
    r.add_argument(
        "--compile",
        nargs="*",
        metavar="CONFIG",
        help="also time torch.compile of the whole model (every norm but none); with names, only in those configs "
        "(a compile takes about a minute)",
    )
    r.add_argument("--steps", type=_int_arg, metavar="N", help="timed steps (default 20)")
    r.add_argument("--warmup", type=_int_arg, metavar="N", help="warm-up steps, compile included (default 5)")
    r.add_argument(
        "--graph",
        action="store_true",
        help="also time each setting's step captured in a CUDA graph and replayed (the GPU's time, no host overhead)",
    )
    r.add_argument(
        "--rounds",
        type=_int_arg,
        default=1,
        metavar="N",
        help="measure everything N times per config, every other round in the opposite order (A-B-B-A; default 1)",
    )
    r.set_defaults(func=_bench_resnet50_command)
    return bench
