"""Backend dispatch: one entry point per op, choosing among implementations that share the functional signature.

Backends:
    ``reference``  normlab.functional: plain PyTorch math, runs anywhere; the oracle.
    ``native``     torch's own fused ops where torch has the exact op (F.batch_norm, F.group_norm, ...).
    ``triton``     fused Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) for every op that has
                   one (``triton_ops.OPS``), on any input; the other ops run as under ``auto``. A RuntimeError
                   when Triton or normlab's kernels cannot be imported.
    ``auto``       (default) triton for CUDA inputs when Triton is importable and the op has a kernel (unless the
                   kernel was measured slower than torch for such an input in GPU time, or saves too little GPU time
                   to pay for its extra host time in eager calls: ``triton_ops.prefers_torch``), else native where it
                   exists, else reference.
    ``auto-gpu``   as ``auto``, but torch's op only where the kernel was measured slower in GPU time
                   (``triton_ops.SLOWER_THAN_TORCH``): for steps captured in CUDA graphs, where the GPU's time is
                   all that counts, and for hosts that launch kernels faster than the measured machine, whose slow
                   host the eager table reflects. The choice depends on the input's shape, dtype and layout
                   only, so a CUDA graph's warm-up compiles every kernel its capture will launch.

Under torch.compile, ``auto`` and ``auto-gpu`` resolve to native (else the reference) whatever the input: Inductor
then compiles the same plain PyTorch ops it compiles for torch's own layers (normlab's GroupNorm, InstanceNorm,
LayerNorm and BatchNorm without its NaN guard trace to the very same aten graph, channels-last and under autocast
too) and fuses them with their neighbours, where a custom op would stay an opaque call through its Python launcher.
``triton`` still compiles the kernels in as custom ops, without graph breaks.

The default comes from the environment variable ``NORMLAB_BACKEND`` (read at import) and can be changed with
:func:`set_backend` or, for a block, :func:`use_backend`. Every dispatched call also takes ``backend=`` to force one.
Modules reach implementations only through here, so a CPU-only install always works.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

from .. import functional
from ..functional._checks import unknown_name_error
from . import native

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "get_backend",
    "set_backend",
    "use_backend",
    "resolve",
    "triton_available",
    "call",
    "fuses_nan_guard",
    "commits_in_one_launch",
    "commit_if_finite",
    "commit_batch_stats",
]

BACKENDS = ("auto", "auto-gpu", "native", "reference", "triton")


def _validated(name: str) -> str:
    if name not in BACKENDS:
        raise unknown_name_error("backend (NORMLAB_BACKEND / set_backend)", name, BACKENDS)
    return name


_backend = _validated(os.environ.get("NORMLAB_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The current default backend name."""
    return _backend


def set_backend(name: str) -> None:
    """Set the default backend for every dispatched op: one of :data:`BACKENDS`."""
    global _backend
    _backend = _validated(name)
    if _backend == "triton":
        _load_triton_ops()  # now, so that a model compiled next does not meet the import inside traced code


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` as the default backend inside a ``with`` block."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_available() -> bool:
    """True when Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


# The kernels module once loaded, False when it cannot be (then _triton_error says why), None before the first try.
# Loaded at import where kernels will be used (CUDA present, or backend triton), so that code traced by
# torch.compile only reads this variable: Dynamo cannot trace an import and would break the graph there.
_triton_ops = None
_triton_error: str | None = None


def _load_triton_ops():
    global _triton_ops, _triton_error
    if _triton_ops is None:
        _triton_ops = False
        if not triton_available():
            _triton_error = "Triton is not installed (pip install triton)"
        else:
            try:
                _triton_ops = importlib.import_module(f"{__name__}.triton_ops")
            except ImportError as err:
                _triton_error = f"importing normlab's Triton kernels failed: {err}"
    return _triton_ops


def _triton_impl(op: str) -> Callable | None:
    module = _triton_ops if _triton_ops is not None else _load_triton_ops()
    return getattr(module, op, None) if module else None


def resolve(op: str, x: torch.Tensor, backend: str | None = None) -> Callable:
    """The implementation of ``op`` to use for input ``x`` under ``backend`` (default: the current one)."""
    name = _validated(backend) if backend is not None else _backend
    reference = getattr(functional, op)
    if name == "reference":
        return reference
    if name == "native":
        return getattr(native, op, reference)
    if name == "triton":
        if not (_triton_ops if _triton_ops is not None else _load_triton_ops()):
            raise RuntimeError(f"backend='triton' for {op!r}: {_triton_error}")
        impl = _triton_impl(op)
        return impl if impl is not None else getattr(native, op, reference)  # no kernel: as under "auto"
    if x.is_cuda and not torch.compiler.is_compiling():  # compiling: Inductor gets plain ops (see the docstring)
        impl = _triton_impl(op)
        if impl is not None and not _triton_ops.prefers_torch(op, x, wall_time=name == "auto"):
            return impl
    return getattr(native, op, reference)


ACTIVATIONS = {"none": None, "relu": torch.nn.functional.relu, "silu": torch.nn.functional.silu}
"""The activations a norm can be followed by in :func:`call` (``act=``)."""


def call(op: str, x: torch.Tensor, *args, backend: str | None = None, act: str | None = None, **kwargs):
    """Run ``op`` on ``x`` with the implementation chosen by :func:`resolve`, then the activation ``act``.

    ``act`` ("relu", "silu"; None or "none" for no activation) is fused into the op where the implementation can
    (the Triton kernels named in ``triton_ops.FUSES_ACT``: one pass over the output saved), else applied after it.
    """
    impl = resolve(op, x, backend)
    if act is None or act == "none":
        return impl(x, *args, **kwargs)
    if act not in ACTIVATIONS:
        raise unknown_name_error("act", act, ACTIVATIONS)
    if _triton_ops and op in _triton_ops.FUSES_ACT and impl is getattr(_triton_ops, op):
        return impl(x, *args, act=act, **kwargs)
    return ACTIVATIONS[act](impl(x, *args, **kwargs))


def fuses_nan_guard(op: str, x: torch.Tensor, backend: str | None = None) -> bool:
    """True when the implementation :func:`resolve` picks for ``op`` and ``x`` takes
    ``nan_guard=(num_batches_tracked, num_nonfinite_batches)`` and commits a training update of the running
    statistics only if it is finite, counting the batch, in its own launches (``triton_ops.FUSES_NAN_GUARD``): the
    batch-norm layers then hand it their counters instead of guarding the update around the call."""
    impl = resolve(op, x, backend)
    return bool(_triton_ops) and op in _triton_ops.FUSES_NAN_GUARD and impl is getattr(_triton_ops, op)


def commits_in_one_launch(running_mean: torch.Tensor, running_var: torch.Tensor) -> bool:
    """Whether :func:`commit_if_finite` runs its Triton kernel for these running buffers (and fresh contiguous
    statistics of their dtype): CUDA buffers, contiguous, normlab's kernels loaded, not compiling."""
    return (
        running_mean.is_cuda
        and bool(_triton_ops)  # loaded, not failed
        and not torch.compiler.is_compiling()
        and running_mean.is_contiguous()
        and running_var.is_contiguous()
        and running_var.dtype == running_mean.dtype
    )


def commit_if_finite(new_mean, new_var, running_mean, running_var, num_batches_tracked, num_nonfinite_batches) -> bool:
    """The batch-norm NaN guard's commit in one Triton launch (``batch_norm.commit_if_finite``) where
    :func:`commits_in_one_launch`; returns False without doing anything otherwise (the caller then commits with torch
    ops). See :meth:`normlab.layers.BatchNorm2d` (``nan_guard``)."""
    if not commits_in_one_launch(running_mean, running_var):
        return False
    if not all(t.is_contiguous() and t.dtype == running_mean.dtype for t in (new_mean, new_var)):
        return False  # the commit kernel's preconditions (it raises on them): the torch ops handle these
    from .batch_norm import commit_if_finite as commit

    commit(new_mean, new_var, running_mean, running_var, num_batches_tracked, num_nonfinite_batches)
    return True


def commit_batch_stats(
    batch_mean, batch_var, running_mean, running_var, num_batches_tracked, num_nonfinite_batches, momentum
) -> None:
    """``batch_norm.commit_batch_stats``: fold a batch's statistics into the running ones if they are finite, count
    the batch, zero the batch statistics, in one Triton launch. Only where :func:`commits_in_one_launch` (the caller
    checks first; a RuntimeError otherwise)."""
    if not commits_in_one_launch(running_mean, running_var):
        raise RuntimeError("commit_batch_stats: needs CUDA buffers and normlab's kernels (see commits_in_one_launch)")
    from .batch_norm import commit_batch_stats as commit

    commit(batch_mean, batch_var, running_mean, running_var, num_batches_tracked, num_nonfinite_batches, momentum)


if _backend == "triton" or (torch.cuda.is_available() and triton_available()):
    _load_triton_ops()
