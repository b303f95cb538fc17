"""What every normlab Triton kernel module shares: the (N, C, S) view of an input, activation codes, and the
fused activations as Triton functions.

Imported only by the kernel modules (which need Triton); the dispatch in ``normlab.kernels`` never imports it on a
machine without Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    "activation",
    "activation_grad",
]

ACTIVATIONS = ("none", "relu", "silu")
"""The activations a kernel can fuse after its affine: code 0, 1, 2 in :func:`activation`."""


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels run through Triton's interpreter (on CPU tensors): triton.jit reads TRITON_INTERPRET when a
kernel is defined, i.e. when the kernel modules are imported."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_kernel_input(owner: str, x: torch.Tensor, **per_channel: torch.Tensor | None) -> None:
    """ValueError naming ``owner`` unless ``x`` is a floating-point (N, C, *) tensor where the kernels can run (CUDA,
    or any device under the interpreter) and every given per-channel tensor has shape (C,) on x's device (a kernel
    would read out of bounds otherwise)."""
    if x.dim() < 2:
        raise ValueError(f"{owner}: expected input (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{owner}: expected a float16, bfloat16, float32 or float64 input, got dtype {x.dtype}")
    if not x.is_cuda and not INTERPRET:
        raise ValueError(
            f"{owner}: the Triton kernel needs a CUDA input (or TRITON_INTERPRET=1 set before import to run on CPU), "
            f"got an input on {x.device}"
        )
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


@dataclass(frozen=True)
class Flat:
    """An (N, C, *) tensor seen as (N, C, S) with S the product of the spatial sizes (1 for (N, C)).

    ``tensor`` is the input itself when its layout allows the view (contiguous, or channels-last: one stride per
    dim of (N, C, S)), else a contiguous copy. Outputs allocated with ``torch.empty_like(tensor)`` share the
    strides, so a kernel that indexes ``n * stride_n + c * stride_c + s * stride_s`` writes them in the same layout.
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
    n, c = x.shape[0], x.shape[1]
    s = x[0, 0].numel() if x.dim() > 2 else 1
    if not x.is_contiguous() and _channels_last(x):
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
