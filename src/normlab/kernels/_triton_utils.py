"""What every normlab Triton kernel module shares: the (N, C, S) view of an input, activation codes, and the
fused activations as Triton functions.

Imported only by the kernel modules (which need Triton); the dispatch in ``normlab.kernels`` never imports it on a
machine without Triton.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..functional._checks import unknown_name_error

__all__ = [
    "ACTIVATIONS",
    "INTERPRET",
    "act_code",
    "check_kernel_input",
    "Flat",
    "flat",
    "output_like",
    "same_layout",
    "vector_arg",
    "cdiv",
    "next_power_of_2",
    "pow2_factor",
    "stride_hints",
    "sm_count",
    "grads_as_params",
    "unaliased",
    "traced",
    "eager_function",
    "needs_grad",
    "on_input_device",
    "activation",
    "with_factor",
    "with_factors",
    "activation_grad",
]

ACTIVATIONS = ("none", "relu", "silu")
"""The activations a kernel can fuse after its affine: code 0, 1, 2 in :func:`activation`."""


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels run through Triton's interpreter (on CPU tensors): triton.jit reads TRITON_INTERPRET when a
kernel is defined, i.e. when the kernel modules are imported."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_kernel_dtype_device(owner: str, x: torch.Tensor) -> None:
    """ValueError naming ``owner`` unless ``x`` is floating point on a device where the kernels run (CUDA, or any
    device under the interpreter)."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"{owner}: expected a float16, bfloat16, float32 or float64 input, got dtype {x.dtype}")
    if not x.is_cuda and not INTERPRET:
        raise ValueError(
            f"{owner}: the Triton kernel needs a CUDA input (or TRITON_INTERPRET=1 set before import to run on CPU), "
            f"got an input on {x.device}"
        )


def check_kernel_input(owner: str, x: torch.Tensor, **per_channel: torch.Tensor | None) -> None:
    """ValueError naming ``owner`` unless ``x`` is a floating-point (N, C, *) tensor where the kernels can run (CUDA,
    or any device under the interpreter) and every given per-channel tensor has shape (C,) on x's device (a kernel
    would read out of bounds otherwise)."""
    if x.dim() < 2:
        raise ValueError(f"{owner}: expected input (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    check_kernel_dtype_device(owner, x)
    channels = x.shape[1]
    for name, p in per_channel.items():
        if p is not None and (tuple(p.shape) != (channels,) or p.device != x.device):
            raise ValueError(
                f"{owner}: {name} of shape {tuple(p.shape)} on {p.device} does not match the input's {channels} "
                f"channels on {x.device} (expected shape ({channels},))"
            )


def act_code(owner: str, act: str | None) -> int:
    """The kernel code of ``act`` (None and "none" are 0); ValueError naming ``owner`` for an unknown one."""
    name = "none" if act is None else act
    if name not in ACTIVATIONS:
        raise unknown_name_error(f"{owner}: act", name, ACTIVATIONS)
    return ACTIVATIONS.index(name)


class Flat(NamedTuple):
    """An (N, C, *) tensor seen as (N, C, S) with S the product of the spatial sizes (1 for (N, C)).

    ``tensor`` is the input itself when its layout allows the view (contiguous, or channels-last: one stride per
    dim of (N, C, S)), else a contiguous copy. Outputs allocated with ``torch.empty_like(tensor)`` share the
    strides, so a kernel that indexes ``n * stride_n + c * stride_c + s * stride_s`` writes them in the same layout.
    A named tuple: built on every kernel call, three times faster to create than a frozen dataclass.
    """

    tensor: torch.Tensor
    n: int
    c: int
    s: int
    stride_n: int
    stride_c: int
    stride_s: int

    @property
    def channels_last(self) -> bool:
        """True when channels are the fastest-varying dim (stride 1) and there is more than one position."""
        return self.stride_c == 1 and self.s > 1


def _channels_last(x: torch.Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return x.dim() == 3 and x.transpose(1, 2).is_contiguous()


def flat(x: torch.Tensor) -> Flat:
    """The :class:`Flat` view of ``x`` (N, C, *): NCHW-contiguous and channels-last inputs are used in place.

    A tensor that is both (a size-1 dim makes both layouts match) is taken as contiguous, as torch does.
    """
    shape = x.shape
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    if not x.is_contiguous():
        if _channels_last(x):
            return Flat(x, n, c, s, c * s, 1, c)
        x = x.contiguous()
    return Flat(x, n, c, s, c * s, s, 1)


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor in the layout the kernels write: that of :func:`flat`'s view of ``x``."""
    return torch.empty_like(x if x.numel() == 0 else flat(x).tensor)


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``like`` (a dense tensor of the same shape); copied only when they differ."""
    if t.stride() == like.stride():
        return t
    out = torch.empty_like(like, dtype=t.dtype)
    out.copy_(t)
    return out


def vector_arg(p: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter as the kernels read it (contiguous), or any tensor when it is None (not read then)."""
    return default if p is None else p.contiguous()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code (``triton.cdiv`` is a constexpr function: several times slower on the host)."""
    return -(-a // b)


def pow2_factor(n: int, cap: int = 16) -> int:
    """The largest power of 2 that divides ``n``, at most ``cap`` (``cap`` for 0): a kernel's constexpr hint of a
    runtime size's alignment."""
    return cap if n == 0 else min(n & -n, cap)


def stride_hints(s: int, stride_c: int, stride_s: int) -> dict[str, int]:
    """The alignment constexprs of a kernel indexing (n, c, s) by runtime strides, for :func:`with_factors`:
    ``S_DIV``, ``STRIDE_C_DIV``, ``STRIDE_S_DIV``, the :func:`pow2_factor` of the position count and of each stride."""
    return {"S_DIV": pow2_factor(s), "STRIDE_C_DIV": pow2_factor(stride_c), "STRIDE_S_DIV": pow2_factor(stride_s)}


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), for host code (see :func:`cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device, without_cuda: int) -> int:
    """The multiprocessor count of a CUDA ``device`` (looked up once per GPU), else ``without_cuda`` (the
    interpreter)."""
    if device.type != "cuda":
        return without_cuda
    if device.index is None:  # the current GPU (never cached under a None key: it can change)
        return torch.cuda.get_device_properties(device).multi_processor_count
    count = _SM_COUNTS.get(device.index)
    if count is None:
        count = _SM_COUNTS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def grads_as_params(sums: torch.Tensor, params) -> list[torch.Tensor | None]:
    """Row i of ``sums`` (P, C) as the gradient of ``params[i]`` in that parameter's dtype (None where the parameter
    is None), converting all rows with one launch where the parameters share a dtype."""
    dtypes = {p.dtype for p in params if p is not None}
    if len(dtypes) == 1:
        dtype = dtypes.pop()
        sums = sums if sums.dtype == dtype else sums.to(dtype)
        return [None if p is None else sums[i] for i, p in enumerate(params)]
    return [None if p is None else sums[i].to(p.dtype) for i, p in enumerate(params)]


def unaliased(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` with a copy of each one that shares memory with an earlier one: a custom op's outputs may not
    alias each other (e.g. rows of one :func:`grads_as_params` conversion)."""
    seen, out = set(), []
    for t in tensors:
        key = t.untyped_storage().data_ptr() if t.numel() else None
        out.append(t.clone() if key is not None and key in seen else t)
        seen.add(key)
    return out


def traced(x: torch.Tensor) -> bool:
    """Whether a kernel call on ``x`` must go through its ``torch.library`` custom op: under torch.compile (Dynamo's
    tracing, or AOTAutograd's fake or functional tensors) and for any tensor subclass. Plain eager calls run the
    op's implementation and autograd directly (:func:`eager_function`), which skips the dispatcher's per-call cost:
    tens of microseconds per op, more than a kernel's GPU time at small shapes."""
    return type(x) is not torch.Tensor or torch.compiler.is_compiling()


def needs_grad(args) -> bool:
    """Whether autograd needs a graph for a call on ``args``: grad mode is on and a tensor argument requires grad."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def eager_function(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """A torch.autograd.Function computing what a custom op registered with
    ``op.register_autograd(backward, setup_context=setup_context)`` computes, for eager calls (see :func:`traced`).

    ``forward`` is the op's implementation; ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` are
    the functions registered with the op, so both paths share one definition of the gradient. Call it through its
    ``call(*args)``: ``apply`` where autograd needs the graph (:func:`needs_grad`), else ``forward`` itself, which
    spares inference (``torch.no_grad()``, eval at batch size 1) the autograd.Function's per-call cost (about a
    quarter of a GroupNorm call's host time, measured on CPU).
    """

    # forward(ctx, ...) rather than a separate setup_context staticmethod: with the latter, every apply() binds the
    # arguments through inspect.signature, which costs about as much as the rest of the call
    def _forward(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    def call(*args):
        return function.apply(*args) if needs_grad(args) else forward(*args)

    namespace = {
        "forward": staticmethod(_forward),
        "backward": staticmethod(backward),
        "call": staticmethod(call),
        "__doc__": f"Eager autograd of {name} (normlab.kernels._triton_utils.eager_function).",
    }
    function = type(name, (torch.autograd.Function,), namespace)
    return function


_NO_SWITCH = contextlib.nullcontext()


def on_input_device(fn):
    """Decorate a function that launches kernels on its first argument's device: run it with that GPU current.

    Triton launches on the *current* CUDA device (and its current stream), whatever device the tensors are on, so a
    call on a tensor on another GPU than the current one would launch there with pointers it cannot use. torch's
    own ops switch devices the same way. Costs one device query per call when nothing needs switching; nothing for
    CPU tensors (the interpreter).
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        switch = _NO_SWITCH
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            switch = torch.cuda.device(x.device)
        with switch:
            return fn(x, *args, **kwargs)

    return wrapper


@triton.jit
def with_factor(n, N_DIV: tl.constexpr):
    """``n``, written so that Triton's alignment analysis sees its power-of-2 factor ``N_DIV`` (:func:`pow2_factor`;
    the JIT knows a runtime integer only as divisible by 16 or not): rows of n elements then load with the widest
    vectors their alignment allows (16 bytes for float32 rows of 14 x 14 positions, 8 for bfloat16), not one element
    at a time. ``N_DIV`` must divide ``n`` (pass ``pow2_factor(n)``), or the result is another number."""
    return (n // N_DIV) * N_DIV


@triton.jit
def with_factors(S, stride_c, stride_s, S_DIV: tl.constexpr, STRIDE_C_DIV: tl.constexpr, STRIDE_S_DIV: tl.constexpr):
    """(S, stride_c, stride_s) through :func:`with_factor` with the hints of :func:`stride_hints`."""
    return with_factor(S, S_DIV), with_factor(stride_c, STRIDE_C_DIV), with_factor(stride_s, STRIDE_S_DIV)


@triton.jit
def activation(z, ACT: tl.constexpr):
    """The fused activation of a float32 block: 0 none, 1 ReLU, 2 SiLU."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def activation_grad(dy, z, ACT: tl.constexpr):
    """The gradient with respect to the pre-activation ``z`` given the output gradient ``dy`` (float32 blocks)."""
    if ACT == 1:
        dy = tl.where(z > 0.0, dy, 0.0)
    elif ACT == 2:
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy
