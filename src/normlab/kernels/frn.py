r"""Triton kernels for Filter Response Normalization with the TLU (Singh & Krishnan, 2020, arXiv 1911.09737).

The statistic is per (sample, channel) over the positions, with no mean: :math:`\nu^2 = \mathrm{E}_s[x^2]`, so
the work is N * C independent sums of squares, each followed by a pointwise
:math:`y = \max(\gamma x / \sqrt{\nu^2 + \epsilon + |\epsilon_l|} + \beta, \tau)`.

Tiles are [BLOCK_S positions, BLOCK_C channels] of one sample, the same logical tile for both layouts:

* NCHW: each (n, c) is a contiguous row of S values; BLOCK_S covers the row (up to 4096 positions, e.g. 56 x 56)
  and short rows share a program across several channels. Loads are coalesced along the positions.
* channels_last: a block of up to 64 contiguous channels per position, coalesced along the channels. There are only
  N * C / 64 such blocks (128 at (32, 256, 56, 56)), so the positions are split across programs (about 4 programs
  per SM in all) that write float32 partial sums to a small (split, N, C) workspace.

When a tile holds every position of its (n, c) block, one kernel does everything (statistics in registers, then
the output). Otherwise the second stage sums the workspace with torch (N x C values) and an apply kernel writes the
output. Accumulation is float32 (float64 for float64 input).

Kernels and traffic (one pass = one read or write of a tensor of x's size):

* forward: single tile ``_frn_fwd_kernel`` reads x once and writes y once; split ``_frn_fwd_kernel`` (partials)
  plus ``_frn_apply_kernel`` read x twice and write y once. 4 bytes of rstd per (n, c) are kept for the backward.
* backward: per (n, c) the input gradient needs :math:`A = \sum_s \partial z \hat x` (dz: the gradient past the
  TLU), so ``_frn_bwd_kernel`` reduces A, :math:`\sum_s \partial z` and the TLU's share
  :math:`\sum_s (\partial y - \partial z)` (the tau gradient) over its positions; in a single tile it also writes dx
  (x and dy read once, dx written once), else ``_frn_bwd_apply_kernel`` writes dx (x and dy read twice). The
  parameter gradients are sums over n of these (N, C) values (torch, deterministic): dweight = sum A, dbias =
  sum dz, dtau = the TLU's share, and d learned_eps = sign(eps_l) * sum(-rstd^2 * weight * A / 2).

The TLU passes the gradient where :math:`z > \tau`, to tau where :math:`z < \tau`, and half to each at a tie, as
torch.maximum does (ties happen: zero inputs with bias == tau, both 0 at initialization).

The ops are registered as ``normlab::filter_response_norm_fwd`` and ``normlab::filter_response_norm_bwd``
(torch.library custom ops with fake implementations and autograd) so torch.compile(fullgraph=True) traces through
them without a graph break.

Example::

    from normlab.kernels.frn import filter_response_norm
    x = torch.randn(32, 256, 56, 56, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = filter_response_norm(x, weight, bias, tau)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..functional._checks import check_input
from ..functional._stats import accumulation_dtype
from ._triton_utils import (
    Flat,
    cdiv,
    check_kernel_input,
    eager_function,
    flat,
    grads_as_params,
    next_power_of_2,
    on_input_device,
    output_like,
    same_layout,
    sm_count,
    stride_hints,
    traced,
    unaliased,
    vector_arg,
    with_factors,
)

__all__ = ["filter_response_norm"]

# Block choices, in one place so they can be tuned on a GPU (tests shrink them to exercise the split path).
_TILE = 4096  # elements of x a program holds at once
_MAX_BLOCK_S = 4096  # NCHW: positions per block (a whole 56 x 56 row)
_MAX_BLOCK_C_CHANNELS_LAST = 64  # channels_last: contiguous channels per block
_PROGRAMS_PER_SM = 4  # enough programs to fill the GPU (per CPU for the interpreter)


class _Launch(NamedTuple):
    """How one call is tiled: block sizes, the split of the positions, and whether one tile covers them; ``grid`` and
    ``blocks`` (the kernels' block keyword arguments and alignment hints) follow from them."""

    block_s: int
    block_c: int
    c_blocks: int
    split: int
    blocks_per_split: int
    num_warps: int
    grid: tuple[int, int]
    blocks: dict

    @property
    def single(self) -> bool:
        return self.split == 1 and self.blocks_per_split == 1


def _launch(f: Flat, device: torch.device) -> _Launch:
    """The tiling for ``f`` on ``device``, built once per signature (the tuning constants are part of the key: tests
    shrink them)."""
    tuning = (_TILE, _MAX_BLOCK_C_CHANNELS_LAST, _MAX_BLOCK_S, _PROGRAMS_PER_SM)
    return _cached_launch(f.n, f.c, f.s, f.channels_last, f.stride_c, f.stride_s, sm_count(device, 1), tuning)


@functools.lru_cache(maxsize=4096)
def _cached_launch(n, c, s, channels_last, stride_c, stride_s, units, tuning) -> _Launch:
    tile, max_block_c_channels_last, max_block_s, programs_per_sm = tuning
    if channels_last:
        block_c = min(next_power_of_2(c), max_block_c_channels_last)
        block_s = max(1, min(tile // block_c, next_power_of_2(s)))
    else:
        block_s = min(next_power_of_2(s), max_block_s)
        block_c = max(1, min(tile // block_s, next_power_of_2(c)))
    c_blocks = cdiv(c, block_c)
    s_blocks = cdiv(s, block_s)
    split = min(s_blocks, max(1, cdiv(programs_per_sm * units, n * c_blocks)))
    blocks_per_split = cdiv(s_blocks, split)
    split = cdiv(s_blocks, blocks_per_split)
    num_warps = min(8, max(1, block_s * block_c // 512))
    blocks = dict(
        BLOCK_S=block_s, BLOCK_C=block_c, num_warps=num_warps, **stride_hints(s, stride_c, stride_s),
    )  # fmt: skip
    return _Launch(block_s, block_c, c_blocks, split, blocks_per_split, num_warps, (n * c_blocks, split), blocks)


def _launch_args(f: Flat, launch: _Launch, weight, bias, tau) -> tuple[tuple, dict, dict, tuple[int, int]]:
    """(strides, parameter flags, block parameters, grid) of the kernels' launches for ``f``."""
    strides = (f.stride_n, f.stride_c, f.stride_s)
    acc = _acc_type(f.tensor.dtype)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_TAU=tau is not None, ACC=acc)
    return strides, flags, launch.blocks, launch.grid


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---- Triton ---------------------------------------------------------------------------------------------------


@triton.jit
def _channels(pid, C, stride_n, stride_c, BLOCK_C: tl.constexpr):
    """Sample, channel indices, their validity, (n, c) indices and element offsets of program ``pid``'s block."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = pid // c_blocks
    cols = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    base = n.to(tl.int64) * stride_n + cols.to(tl.int64) * stride_c
    return cols, c_mask, n * C + cols, base


@triton.jit
def _positions(base, c_mask, s0, s_end, stride_s, BLOCK_S: tl.constexpr):
    """The 2-D mask and element offsets of positions [s0, s0 + BLOCK_S) (those below ``s_end``) of a block."""
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (s < s_end)[:, None] & c_mask[None, :]
    return mask, base[None, :] + s[:, None].to(tl.int64) * stride_s


@triton.jit
def _span(split, S, blocks_per_split, BLOCK_S: tl.constexpr):
    """The positions [start, end) of split ``split``."""
    start = split * blocks_per_split * BLOCK_S
    return start, tl.minimum(S, start + blocks_per_split * BLOCK_S)


@triton.jit
def _vector(ptr, cols, c_mask, HAS: tl.constexpr, default: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """A per-channel parameter block, or ``default`` everywhere when the parameter is absent."""
    if HAS:
        v = tl.load(ptr + cols, mask=c_mask, other=default).to(ACC)
    else:
        v = tl.full([BLOCK_C], default, ACC)
    return v


@triton.jit
def _write(x, rstd, w, b, tau, y_ptr, offs, mask, HAS_TAU: tl.constexpr):
    z = x * (rstd * w)[None, :] + b[None, :]
    if HAS_TAU:
        z = tl.maximum(z, tau[None, :])
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _frn_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    tau_ptr,
    leps_ptr,
    y_ptr,
    rstd_ptr,
    partial_ptr,
    N,
    C,
    S,
    stride_n,
    stride_c,
    stride_s,
    eps,
    blocks_per_split,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_TAU: tl.constexpr,
    HAS_LEPS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
    S_DIV: tl.constexpr,
    STRIDE_C_DIV: tl.constexpr,
    STRIDE_S_DIV: tl.constexpr,
):
    S, stride_c, stride_s = with_factors(S, stride_c, stride_s, S_DIV, STRIDE_C_DIV, STRIDE_S_DIV)  # for vectors
    cols, c_mask, nc, base = _channels(tl.program_id(0), C, stride_n, stride_c, BLOCK_C)
    if SINGLE:
        mask, offs = _positions(base, c_mask, 0, S, stride_s, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        leps = tl.abs(_vector(leps_ptr, cols, c_mask, HAS_LEPS, 0.0, ACC, BLOCK_C))
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / S + eps + leps)
        tl.store(rstd_ptr + nc, rstd, mask=c_mask)
        w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
        b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
        tau = _vector(tau_ptr, cols, c_mask, HAS_TAU, 0.0, ACC, BLOCK_C)
        _write(x, rstd, w, b, tau, y_ptr, offs, mask, HAS_TAU)
    else:
        split = tl.program_id(1)
        start, end = _span(split, S, blocks_per_split, BLOCK_S)
        sum_sq = tl.zeros([BLOCK_C], ACC)
        for s0 in range(start, end, BLOCK_S):
            mask, offs = _positions(base, c_mask, s0, end, stride_s, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            sum_sq += tl.sum(x * x, axis=0)
        tl.store(partial_ptr + split * N * C + nc, sum_sq, mask=c_mask)


@triton.jit
def _frn_apply_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    tau_ptr,
    rstd_ptr,
    y_ptr,
    C,
    S,
    stride_n,
    stride_c,
    stride_s,
    blocks_per_split,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_TAU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    S_DIV: tl.constexpr,
    STRIDE_C_DIV: tl.constexpr,
    STRIDE_S_DIV: tl.constexpr,
):
    S, stride_c, stride_s = with_factors(S, stride_c, stride_s, S_DIV, STRIDE_C_DIV, STRIDE_S_DIV)  # for vectors
    cols, c_mask, nc, base = _channels(tl.program_id(0), C, stride_n, stride_c, BLOCK_C)
    start, end = _span(tl.program_id(1), S, blocks_per_split, BLOCK_S)
    rstd = tl.load(rstd_ptr + nc, mask=c_mask, other=0.0)
    w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
    b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
    tau = _vector(tau_ptr, cols, c_mask, HAS_TAU, 0.0, ACC, BLOCK_C)
    for s0 in range(start, end, BLOCK_S):
        mask, offs = _positions(base, c_mask, s0, end, stride_s, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        _write(x, rstd, w, b, tau, y_ptr, offs, mask, HAS_TAU)


@triton.jit
def _grads(x, dy, rstd, w, b, tau, HAS_TAU: tl.constexpr):
    """xhat and the gradient at the affine output z (dy where z > tau, half of it at a tie) of one block."""
    xhat = x * rstd[None, :]
    dz = dy
    if HAS_TAU:
        z = xhat * w[None, :] + b[None, :]
        t = tau[None, :]
        dz = tl.where(z > t, dy, tl.where(z == t, 0.5 * dy, 0.0))
    return xhat, dz


@triton.jit
def _frn_bwd_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    tau_ptr,
    rstd_ptr,
    dx_ptr,
    partial_ptr,
    N,
    C,
    S,
    stride_n,
    stride_c,
    stride_s,
    blocks_per_split,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_TAU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
    S_DIV: tl.constexpr,
    STRIDE_C_DIV: tl.constexpr,
    STRIDE_S_DIV: tl.constexpr,
):
    S, stride_c, stride_s = with_factors(S, stride_c, stride_s, S_DIV, STRIDE_C_DIV, STRIDE_S_DIV)  # for vectors
    # partial_ptr: (3, split, N, C) sums over this program's positions of dz * xhat, dz and dy - dz.
    cols, c_mask, nc, base = _channels(tl.program_id(0), C, stride_n, stride_c, BLOCK_C)
    split = tl.program_id(1)
    rstd = tl.load(rstd_ptr + nc, mask=c_mask, other=0.0)
    w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
    b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
    tau = _vector(tau_ptr, cols, c_mask, HAS_TAU, 0.0, ACC, BLOCK_C)
    if SINGLE:
        mask, offs = _positions(base, c_mask, 0, S, stride_s, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat, dz = _grads(x, dy, rstd, w, b, tau, HAS_TAU)
        sum_dz_xhat = tl.sum(dz * xhat, axis=0)
        sum_dz = tl.sum(dz, axis=0)
        sum_dtau = tl.sum(dy - dz, axis=0)
        # dx = rstd * w * (dz - xhat * mean_s(dz * xhat))
        dx = (dz - xhat * (sum_dz_xhat / S)[None, :]) * (rstd * w)[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        start, end = _span(split, S, blocks_per_split, BLOCK_S)
        sum_dz_xhat = tl.zeros([BLOCK_C], ACC)
        sum_dz = tl.zeros([BLOCK_C], ACC)
        sum_dtau = tl.zeros([BLOCK_C], ACC)
        for s0 in range(start, end, BLOCK_S):
            mask, offs = _positions(base, c_mask, s0, end, stride_s, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            xhat, dz = _grads(x, dy, rstd, w, b, tau, HAS_TAU)
            sum_dz_xhat += tl.sum(dz * xhat, axis=0)
            sum_dz += tl.sum(dz, axis=0)
            sum_dtau += tl.sum(dy - dz, axis=0)
    slot = split * N * C + nc
    tl.store(partial_ptr + slot, sum_dz_xhat, mask=c_mask)
    tl.store(partial_ptr + tl.num_programs(1) * N * C + slot, sum_dz, mask=c_mask)
    tl.store(partial_ptr + 2 * tl.num_programs(1) * N * C + slot, sum_dtau, mask=c_mask)


@triton.jit
def _frn_bwd_apply_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    tau_ptr,
    rstd_ptr,
    mean_dz_xhat_ptr,
    dx_ptr,
    C,
    S,
    stride_n,
    stride_c,
    stride_s,
    blocks_per_split,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_TAU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    S_DIV: tl.constexpr,
    STRIDE_C_DIV: tl.constexpr,
    STRIDE_S_DIV: tl.constexpr,
):
    S, stride_c, stride_s = with_factors(S, stride_c, stride_s, S_DIV, STRIDE_C_DIV, STRIDE_S_DIV)  # for vectors
    cols, c_mask, nc, base = _channels(tl.program_id(0), C, stride_n, stride_c, BLOCK_C)
    start, end = _span(tl.program_id(1), S, blocks_per_split, BLOCK_S)
    rstd = tl.load(rstd_ptr + nc, mask=c_mask, other=0.0)
    mean_dz_xhat = tl.load(mean_dz_xhat_ptr + nc, mask=c_mask, other=0.0)
    w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
    b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
    tau = _vector(tau_ptr, cols, c_mask, HAS_TAU, 0.0, ACC, BLOCK_C)
    for s0 in range(start, end, BLOCK_S):
        mask, offs = _positions(base, c_mask, s0, end, stride_s, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat, dz = _grads(x, dy, rstd, w, b, tau, HAS_TAU)
        dx = (dz - xhat * mean_dz_xhat[None, :]) * (rstd * w)[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- host launchers and custom ops ----------------------------------------------------------------------------


def _fwd_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized (y, rstd), rstd (N, C) in the accumulation dtype."""
    return output_like(x), x.new_empty(x.shape[:2], dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("normlab::filter_response_norm_fwd", mutates_args=())
def _frn_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    tau: torch.Tensor | None,
    eps: float,
    learned_eps: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) with rstd = 1 / sqrt(nu2 + eps + |learned_eps|) per (n, c)."""
    return _fwd_impl(x, weight, bias, tau, eps, learned_eps)


@on_input_device
def _fwd_impl(x, weight, bias, tau, eps, learned_eps):
    y, rstd = _fwd_outputs(x)
    if x.numel() == 0:
        return y, rstd
    f = flat(x)
    launch = _launch(f, x.device)
    acc = accumulation_dtype(x.dtype)
    partial = rstd if launch.single else torch.empty((launch.split, f.n, f.c), device=x.device, dtype=acc)
    strides, flags, blocks, grid = _launch_args(f, launch, weight, bias, tau)
    params = (vector_arg(weight, rstd), vector_arg(bias, rstd), vector_arg(tau, rstd))
    _frn_fwd_kernel[grid](
        f.tensor,
        *params,
        vector_arg(learned_eps, rstd),
        y,
        rstd,
        partial,
        f.n,
        f.c,
        f.s,
        *strides,
        eps,
        launch.blocks_per_split,
        HAS_LEPS=learned_eps is not None,
        SINGLE=launch.single,
        **flags,
        **blocks,
    )
    if not launch.single:
        total_eps = eps if learned_eps is None else learned_eps.to(acc).abs() + eps
        torch.rsqrt(partial.sum(dim=0) / f.s + total_eps, out=rstd)
        _frn_apply_kernel[grid](
            f.tensor, *params, rstd, y, f.c, f.s, *strides, launch.blocks_per_split, **flags, **blocks
        )
    return y, rstd


@_frn_fwd.register_fake
def _(x, weight, bias, tau, eps, learned_eps):
    return _fwd_outputs(x)


@torch.library.custom_op("normlab::filter_response_norm_bwd", mutates_args=())
def _frn_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    tau: torch.Tensor | None,
    learned_eps: torch.Tensor | None,
    rstd: torch.Tensor,
) -> list[torch.Tensor]:
    """[dx, dweight, dbias, dtau, dlearned_eps]; the gradient of a None parameter is an empty tensor."""
    return unaliased(_bwd_impl(dy, x, weight, bias, tau, learned_eps, rstd))


@on_input_device
def _bwd_impl(dy, x, weight, bias, tau, learned_eps, rstd):
    dx = output_like(x)
    acc = accumulation_dtype(x.dtype)
    f = None if x.numel() == 0 else flat(x)
    if f is None:
        sums = torch.zeros((3, x.shape[0], x.shape[1]), device=x.device, dtype=acc)
    else:
        launch = _launch(f, x.device)
        partial = torch.empty((3, launch.split, f.n, f.c), device=x.device, dtype=acc)
        strides, flags, blocks, grid = _launch_args(f, launch, weight, bias, tau)
        dy = same_layout(dy, f.tensor)
        params = (vector_arg(weight, rstd), vector_arg(bias, rstd), vector_arg(tau, rstd))
        _frn_bwd_kernel[grid](
            f.tensor,
            dy,
            *params,
            rstd,
            dx,
            partial,
            f.n,
            f.c,
            f.s,
            *strides,
            launch.blocks_per_split,
            SINGLE=launch.single,
            **flags,
            **blocks,
        )
        sums = partial.sum(dim=1)
        if not launch.single:
            mean_dz_xhat = sums[0] / f.s
            _frn_bwd_apply_kernel[grid](
                f.tensor,
                dy,
                *params,
                rstd,
                mean_dz_xhat,
                dx,
                f.c,
                f.s,
                *strides,
                launch.blocks_per_split,
                **flags,
                **blocks,
            )
    sum_dz_xhat = sums[0]
    grads = [dx]
    for p, grad in zip((weight, bias, tau), grads_as_params(sums.sum(dim=1), (weight, bias, tau))):
        grads.append(x.new_empty(0) if p is None else grad)
    if learned_eps is None:
        grads.append(x.new_empty(0))
    else:
        # d/d(eps_total) of rstd * sum_s(dz * w * x) is -rstd^2 * w * sum_s(dz * xhat) / 2; d|eps_l| = sign(eps_l).
        w = 1.0 if weight is None else weight.to(acc)
        deps = (rstd.square() * w * sum_dz_xhat).sum(dim=0) * -0.5
        grads.append((deps * learned_eps.to(acc).sign()).to(learned_eps.dtype))
    return grads


@_frn_bwd.register_fake
def _(dy, x, weight, bias, tau, learned_eps, rstd):
    return [output_like(x)] + [
        x.new_empty(0) if p is None else torch.empty_like(p) for p in (weight, bias, tau, learned_eps)
    ]


def _setup_context(ctx, inputs, output):
    x, weight, bias, tau, _eps, learned_eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient (a launch) for the statistics
    ctx.save_for_backward(x, weight, bias, tau, learned_eps, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, bias, tau, learned_eps, rstd = ctx.saved_tensors
    backward = _frn_bwd if traced(dy) else _bwd_impl
    dx, *param_grads = backward(dy, x, weight, bias, tau, learned_eps, rstd)
    dweight, dbias, dtau, dlearned_eps = (
        None if p is None else g for p, g in zip((weight, bias, tau, learned_eps), param_grads)
    )
    return dx, dweight, dbias, dtau, None, dlearned_eps


_frn_fwd.register_autograd(_backward, setup_context=_setup_context)
_FilterResponseNorm = eager_function("_FilterResponseNorm", _fwd_impl, _setup_context, _backward)


# ---- public function ------------------------------------------------------------------------------------------


def filter_response_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tau: torch.Tensor | None = None,
    eps: float = 1e-6,
    learned_eps: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Filter response normalization with the optional TLU, as :func:`normlab.functional.filter_response_norm`.

    .. math::
        \nu^2 = \frac{1}{|S|}\sum_{s \in S} x_s^2, \qquad
        y = \max\Big(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon + |\epsilon_l|}} + \beta,\ \tau\Big)

    Singh & Krishnan, 2020, "Filter Response Normalization Layer: Eliminating Batch Dependence in the Training of
    Deep Neural Networks", arXiv 1911.09737.

    Args:
        x: input (N, C, *) with 1 to 3 spatial dims, on CUDA or on CPU under ``TRITON_INTERPRET=1``;
            NCHW-contiguous and channels_last are used in place.
        weight, bias: optional (C,) affine parameters.
        tau: optional (C,) TLU threshold; None skips the activation.
        eps: constant added to :math:`\nu^2`.
        learned_eps: optional (C,) learned addition to ``eps`` (its absolute value is used).

    Returns:
        Tensor of x's shape, dtype and memory format.

    Raises:
        ValueError: if ``x`` is not 3D, 4D or 5D, or a parameter is not a (C,) vector.

    Note:
        No running statistics: training and eval compute the same thing.

    Example::

        y = filter_response_norm(x.to(memory_format=torch.channels_last), weight, bias, tau)
    """
    check_input("filter_response_norm", x, (3, 4, 5), None)
    check_kernel_input("filter_response_norm", x, weight=weight, bias=bias, tau=tau, learned_eps=learned_eps)
    fwd = _frn_fwd if traced(x) else _FilterResponseNorm.call
    return fwd(x, weight, bias, tau, eps, learned_eps)[0]
