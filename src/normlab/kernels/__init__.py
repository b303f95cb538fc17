"""Backend dispatch: one entry point per op, choosing among implementations that share the functional signature.

Backends:
    ``reference``  normlab.functional: plain PyTorch math, runs anywhere; the oracle.
    ``native``     torch's own fused ops where torch has the exact op (F.batch_norm, F.group_norm, ...).
    ``triton``     fused Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), where they exist.
    ``auto``       (default) triton for CUDA inputs when Triton is importable and the op has a kernel, else native
                   where it exists, else reference.

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

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "resolve", "triton_available", "call"]

BACKENDS = ("auto", "native", "reference", "triton")


def _validated(name: str) -> str:
    if name not in BACKENDS:
        raise unknown_name_error("backend (NORMLAB_BACKEND / set_backend)", name, BACKENDS)
    return name


_backend = _validated(os.environ.get("NORMLAB_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The current default backend name."""
    return _backend


def set_backend(name: str) -> None:
    """Set the default backend for every dispatched op ("auto", "native", "reference" or "triton")."""
    global _backend
    _backend = _validated(name)


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


def _triton_impl(op: str) -> Callable | None:
    if not triton_available():
        return None
    try:
        module = importlib.import_module(f"{__name__}.triton_ops")
    except ImportError:
        return None
    return getattr(module, op, None)


def resolve(op: str, x: torch.Tensor, backend: str | None = None) -> Callable:
    """The implementation of ``op`` to use for input ``x`` under ``backend`` (default: the current one)."""
    name = _validated(backend) if backend is not None else _backend
    reference = getattr(functional, op)
    if name == "reference":
        return reference
    if name == "native":
        return getattr(native, op, reference)
    if name == "triton":
        impl = _triton_impl(op)
        if impl is None:
            raise RuntimeError(
                f"backend='triton': no Triton kernel for {op!r} (Triton installed: {triton_available()})"
            )
        return impl
    if x.is_cuda:
        impl = _triton_impl(op)
        if impl is not None:
            return impl
    return getattr(native, op, reference)


def call(op: str, x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Run ``op`` on ``x`` with the implementation chosen by :func:`resolve`."""
    return resolve(op, x, backend)(x, *args, **kwargs)
