r"""Triton kernels for the per-position norms over channels: LayerNorm2d and RMSNorm2d (ConvNeXt's channel norm).

Statistics are per sample and position over the C channels, so the work splits into independent positions and the
only question is how the channels of a position lie in memory. Both layouts run in place, without the
permute-and-copy that a last-dimension kernel needs:

* channels_last (and every (N, C) or S = 1 input): a position's channels are a contiguous row of C values, and the
  N * S rows follow each other. A program takes a tile [BLOCK_S rows, BLOCK_C channels] with BLOCK_C >= C up to
  4096 channels (loops over channel blocks above), loads are coalesced along the channels.
* NCHW: a position's channels are S apart; consecutive positions are contiguous. A program takes the same logical
  tile [BLOCK_S, BLOCK_C] of one sample with a short run of positions, so loads are coalesced along the positions,
  and reduces across the channel axis (loops over channel blocks above 256 channels).

One forward and one backward kernel serve both norms; the constexpr ``CENTER`` says whether the mean is subtracted
(LayerNorm2d) or not (RMSNorm2d). The statistics of a tile are exact two-pass values in registers; channel blocks
are merged with Chan's formula (count, mean, centered M2), so a large offset (mean 1e4, std 1) does not cancel.
Accumulation is float32 (float64 for float64 input). An optional ReLU / SiLU is fused after the affine.

Kernels and traffic (x, dy: the input and output gradient; one pass = one read or write of a tensor of x's size):

* forward ``_channel_norm_fwd_kernel``, one program per tile: reads x once and writes y once, plus 4 bytes of rstd
  (and 4 of mean) per position for the backward. When C exceeds the channel block, x is read twice (statistics,
  then normalization; the second read of a program's rows usually hits L2).
* backward ``_channel_norm_bwd_kernel``, a persistent grid of about 4 programs per SM, each walking tiles: reads
  x and dy once and writes dx once (x and dy are read twice when C exceeds the block). xhat and, with a fused
  activation, its input are recomputed from x and the saved (mean, rstd); the per-position sums over C of dz*w and
  dz*w*xhat (dz: the gradient at the affine output) are formed and used in the same program. dweight and dbias
  are per-channel sums over (n, s): each program accumulates float32 partials for the tiles it visits, then
  ``torch.sum`` over the programs (a deterministic second stage of size programs x C).

The ops are registered as ``normlab::channel_norm_fwd`` and ``normlab::channel_norm_bwd`` (torch.library custom
ops with fake implementations and autograd), so torch.compile(fullgraph=True) traces through them without a graph
break. The public functions have the signatures of their namesakes in :mod:`normlab.functional.layer_norm` plus a
keyword-only ``act``.

Example::

    from normlab.kernels.channel_norm import layer_norm2d
    x = torch.randn(8, 96, 56, 56, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = layer_norm2d(x, weight, bias, act="silu")  # channels_last output, no layout copy
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..functional._stats import accumulation_dtype
from ._triton_utils import (
    Flat,
    act_code,
    activation,
    activation_grad,
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

__all__ = ["layer_norm2d", "rms_norm2d"]

# Block choices, in one place so they can be tuned on a GPU (tests shrink them to exercise the loops).
_TILE = 4096  # elements of x a program holds at once (16 float32 registers per thread at 8 warps)
_MAX_BLOCK_C_ROWS = 4096  # channels_last: channels per block; more channels loop over blocks
_MAX_BLOCK_C_STRIDED = 256  # NCHW: channels per block
_BLOCK_S_STRIDED = (16, 128)  # NCHW: bounds of the run of contiguous positions per tile
_PROGRAMS_PER_SM = 4  # backward: persistent programs per SM (per CPU for the interpreter)
# backward, channels in one block: accumulate the parameter gradients over a program's tiles in a [rows, channels]
# register tile, reduced over the rows once, instead of a cross-row reduction per tile. A candidate of
# benchmarks/gpu_tune.py, not yet timed on a GPU (the backward ran at 37% of copy bandwidth in run 4's profile)
_ACC_2D = False
# channels_last (rows of contiguous channels): tiles of 2 x _TILE, which made LayerNorm2d's forward+backward 36% faster
# on an H100 at (32, 256, 56, 56) bf16 (benchmarks/gpu_tune.py, CUDA-graph times)
_ROWS_TILE_SCALE = 2


class _Launch(NamedTuple):
    """How one call is tiled: the (N, C, S) view the kernels index, the block sizes, and the kernels' keyword
    arguments that follow from them (``kw``: blocks, alignment hints, SINGLE, warps)."""

    n: int
    s: int
    stride_n: int
    stride_s: int
    block_s: int
    block_c: int
    num_warps: int
    kw: dict

    @property
    def tiles(self) -> int:
        return self.n * cdiv(self.s, self.block_s)


def _launch(f: Flat) -> _Launch:
    """Tile sizes for ``f``; rows of contiguous channels (channels_last, or S = 1) are taken as one sample of N * S
    positions, so a tile never stops at a sample boundary. Built once per signature (the tuning constants are part of
    the key: tests shrink them)."""
    tuning = (_TILE, _MAX_BLOCK_C_ROWS, _MAX_BLOCK_C_STRIDED, _BLOCK_S_STRIDED)
    return _cached_launch(f.n, f.c, f.s, f.stride_c == 1, tuning)


@functools.lru_cache(maxsize=4096)
def _cached_launch(n: int, c: int, s: int, rows: bool, tuning: tuple) -> _Launch:
    tile, max_block_c_rows, max_block_c_strided, (low, high) = tuning
    if rows:
        n, s, stride_n, stride_s = 1, n * s, 0, c
        block_c = min(next_power_of_2(c), max_block_c_rows)
        block_s = max(1, min(_ROWS_TILE_SCALE * tile // block_c, next_power_of_2(s)))
    else:
        stride_n, stride_s = c * s, 1
        block_c = min(next_power_of_2(c), max_block_c_strided)
        block_s = min(max(tile // block_c, low), high, next_power_of_2(s))
    num_warps = min(8, max(1, block_s * block_c // 512))
    stride_c = 1 if rows else s
    kw = dict(
        BLOCK_S=block_s, BLOCK_C=block_c, **stride_hints(s, stride_c, stride_s), SINGLE=c <= block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return _Launch(n, s, stride_n, stride_s, block_s, block_c, num_warps, kw)


def _backward_programs(tiles: int, device: torch.device) -> int:
    units = sm_count(device, 1)
    return max(1, min(tiles, _PROGRAMS_PER_SM * units))


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---- Triton ---------------------------------------------------------------------------------------------------


@triton.jit
def _tile(t, S, stride_n, stride_s, BLOCK_S: tl.constexpr):
    """Row offsets, position indices (n * S + s) and validity of the positions of tile ``t``."""
    s_blocks = tl.cdiv(S, BLOCK_S)
    n = (t // s_blocks).to(tl.int64)
    s = (t % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    return n * stride_n + s.to(tl.int64) * stride_s, n * S + s, s < S


@triton.jit
def _block(rows, s_mask, c0, C, stride_c, BLOCK_C: tl.constexpr):
    """Channel indices, their validity, the 2-D mask and the element offsets of channel block ``c0`` of a tile."""
    cols = c0 + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    mask = s_mask[:, None] & c_mask[None, :]
    return cols, c_mask, mask, rows[:, None] + cols[None, :].to(tl.int64) * stride_c


@triton.jit
def _vector(ptr, cols, c_mask, HAS: tl.constexpr, default: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """A per-channel parameter block, or ``default`` everywhere when the parameter is absent."""
    if HAS:
        v = tl.load(ptr + cols, mask=c_mask, other=default).to(ACC)
    else:
        v = tl.full([BLOCK_C], default, ACC)
    return v


@triton.jit
def _block_stats(x, mask, count, CENTER: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per-row mean (0 without CENTER) and sum of squared deviations of a zero-padded block of ``count`` columns."""
    if CENTER:
        mean = tl.sum(x, axis=1) / count
        d = tl.where(mask, x - mean[:, None], 0.0)
    else:
        mean = tl.zeros([BLOCK_S], ACC)
        d = x
    return mean, tl.sum(d * d, axis=1)


@triton.jit
def _load_mean(mean_ptr, pos, s_mask, CENTER: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    if CENTER:
        mean = tl.load(mean_ptr + pos, mask=s_mask, other=0.0)
    else:
        mean = tl.zeros([BLOCK_S], ACC)
    return mean


@triton.jit
def _write(x, mean, rstd, w, b, y_ptr, offs, mask, ACT: tl.constexpr):
    z = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, activation(z, ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    C,
    S,
    stride_n,
    stride_c,
    stride_s,
    eps,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
    S_DIV: tl.constexpr,
    STRIDE_C_DIV: tl.constexpr,
    STRIDE_S_DIV: tl.constexpr,
):
    S, stride_c, stride_s = with_factors(S, stride_c, stride_s, S_DIV, STRIDE_C_DIV, STRIDE_S_DIV)  # for vectors
    rows, pos, s_mask = _tile(tl.program_id(0), S, stride_n, stride_s, BLOCK_S)
    if SINGLE:
        cols, c_mask, mask, offs = _block(rows, s_mask, 0, C, stride_c, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        mean, m2 = _block_stats(x, mask, C, CENTER, ACC, BLOCK_S)
        rstd = tl.rsqrt(m2 / C + eps)
        w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
        b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
        _write(x, mean, rstd, w, b, y_ptr, offs, mask, ACT)
    else:
        mean = tl.zeros([BLOCK_S], ACC)
        m2 = tl.zeros([BLOCK_S], ACC)
        for c0 in range(0, C, BLOCK_C):
            cols, c_mask, mask, offs = _block(rows, s_mask, c0, C, stride_c, BLOCK_C)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            count = tl.minimum(C - c0, BLOCK_C).to(ACC)
            block_mean, block_m2 = _block_stats(x, mask, count, CENTER, ACC, BLOCK_S)
            if CENTER:
                # Chan et al.: merge (c0 values, mean, m2) with (count values, block_mean, block_m2).
                frac = count / (c0 + count)
                delta = block_mean - mean
                mean += delta * frac
                m2 += block_m2 + delta * delta * (c0 * frac)
            else:
                m2 += block_m2
        rstd = tl.rsqrt(m2 / C + eps)
        for c0 in range(0, C, BLOCK_C):
            cols, c_mask, mask, offs = _block(rows, s_mask, c0, C, stride_c, BLOCK_C)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
            b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
            _write(x, mean, rstd, w, b, y_ptr, offs, mask, ACT)
    if CENTER:
        tl.store(mean_ptr + pos, mean, mask=s_mask)
    tl.store(rstd_ptr + pos, rstd, mask=s_mask)


@triton.jit
def _grads(x, dy, mean, rstd, w, b, mask, ACT: tl.constexpr):
    """xhat, the gradient at the affine output (through the activation) and at xhat, of one block."""
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    dz = dy
    if ACT != 0:
        dz = activation_grad(dy, xhat * w[None, :] + b[None, :], ACT)
    return xhat, dz, dz * w[None, :]


@triton.jit
def _dx(xhat, g, rstd, c_xhat, c_mean, CENTER: tl.constexpr):
    """dx = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)), without the mean_C(g) term for RMS."""
    dx = g - xhat * c_xhat[:, None]
    if CENTER:
        dx = dx - c_mean[:, None]
    return dx * rstd[:, None]


@triton.jit
def _channel_norm_bwd_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    partial_ptr,
    C,
    S,
    stride_n,
    stride_c,
    stride_s,
    num_tiles,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
    S_DIV: tl.constexpr,
    STRIDE_C_DIV: tl.constexpr,
    STRIDE_S_DIV: tl.constexpr,
    ACC_2D: tl.constexpr = False,
):
    S, stride_c, stride_s = with_factors(S, stride_c, stride_s, S_DIV, STRIDE_C_DIV, STRIDE_S_DIV)  # for vectors
    # partial_ptr: (2, programs, C) float; row ``pid`` of each half belongs to this program alone.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dw_ptr = partial_ptr + pid * C
    db_ptr = partial_ptr + (programs + pid) * C
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        c_mask = cols < C
        w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
        b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
        dw = tl.zeros([BLOCK_C], ACC)
        db = tl.zeros([BLOCK_C], ACC)
        # ACC_2D: the parameter gradients accumulate elementwise over the program's tiles and are reduced over rows
        # once at the end, instead of a cross-row reduction per tile (more registers, fewer reductions)
        dw_rows = tl.zeros([BLOCK_S, BLOCK_C] if ACC_2D else [1, 1], ACC)
        db_rows = tl.zeros([BLOCK_S, BLOCK_C] if ACC_2D else [1, 1], ACC)
        for t in range(pid, num_tiles, programs):
            rows, pos, s_mask = _tile(t, S, stride_n, stride_s, BLOCK_S)
            _cols, _c_mask, mask, offs = _block(rows, s_mask, 0, C, stride_c, BLOCK_C)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            mean = _load_mean(mean_ptr, pos, s_mask, CENTER, ACC, BLOCK_S)
            rstd = tl.load(rstd_ptr + pos, mask=s_mask, other=0.0)
            xhat, dz, g = _grads(x, dy, mean, rstd, w, b, mask, ACT)
            dx = _dx(xhat, g, rstd, tl.sum(g * xhat, axis=1) / C, tl.sum(g, axis=1) / C, CENTER)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if ACC_2D:
                dw_rows += dz * xhat
                db_rows += dz
            else:
                dw += tl.sum(dz * xhat, axis=0)
                db += tl.sum(dz, axis=0)
        if ACC_2D:
            dw = tl.sum(dw_rows, axis=0)
            db = tl.sum(db_rows, axis=0)
        tl.store(dw_ptr + cols, dw, mask=c_mask)
        tl.store(db_ptr + cols, db, mask=c_mask)
    else:
        for t in range(pid, num_tiles, programs):
            rows, pos, s_mask = _tile(t, S, stride_n, stride_s, BLOCK_S)
            mean = _load_mean(mean_ptr, pos, s_mask, CENTER, ACC, BLOCK_S)
            rstd = tl.load(rstd_ptr + pos, mask=s_mask, other=0.0)
            c_xhat = tl.zeros([BLOCK_S], ACC)
            c_mean = tl.zeros([BLOCK_S], ACC)
            for c0 in range(0, C, BLOCK_C):
                cols, c_mask, mask, offs = _block(rows, s_mask, c0, C, stride_c, BLOCK_C)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
                w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
                b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
                xhat, dz, g = _grads(x, dy, mean, rstd, w, b, mask, ACT)
                c_xhat += tl.sum(g * xhat, axis=1)
                c_mean += tl.sum(g, axis=1)
            c_xhat = c_xhat / C
            c_mean = c_mean / C
            for c0 in range(0, C, BLOCK_C):
                cols, c_mask, mask, offs = _block(rows, s_mask, c0, C, stride_c, BLOCK_C)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
                w = _vector(w_ptr, cols, c_mask, HAS_W, 1.0, ACC, BLOCK_C)
                b = _vector(b_ptr, cols, c_mask, HAS_B, 0.0, ACC, BLOCK_C)
                xhat, dz, g = _grads(x, dy, mean, rstd, w, b, mask, ACT)
                dx = _dx(xhat, g, rstd, c_xhat, c_mean, CENTER)
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                # The partial rows start at zero and only this program touches them; the barrier orders one
                # tile's read-modify-write after the previous one across the program's threads.
                dw = tl.load(dw_ptr + cols, mask=c_mask, other=0.0) + tl.sum(dz * xhat, axis=0)
                db = tl.load(db_ptr + cols, mask=c_mask, other=0.0) + tl.sum(dz, axis=0)
                tl.store(dw_ptr + cols, dw, mask=c_mask)
                tl.store(db_ptr + cols, db, mask=c_mask)
                tl.debug_barrier()


# ---- host launchers and custom ops ----------------------------------------------------------------------------


def _fwd_outputs(x: torch.Tensor, center: bool, f: Flat | None = None) -> tuple[torch.Tensor, ...]:
    """Uninitialized (y, mean, rstd) of the forward; mean and rstd hold one value per position. ``f``: ``flat(x)``,
    when the caller has it."""
    y = output_like(x) if f is None else torch.empty_like(f.tensor)
    positions = math.prod((x.shape[0], *x.shape[2:]))
    acc = accumulation_dtype(x.dtype)
    return y, x.new_empty(positions if center else 0, dtype=acc), x.new_empty(positions, dtype=acc)


def _empty_param_grad(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0) if p is None else torch.empty_like(p)


@torch.library.custom_op("normlab::channel_norm_fwd", mutates_args=())
def _channel_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, center: bool, act: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): mean and rstd per position (N * S,) in the accumulation dtype; mean is empty without
    ``center``."""
    return _fwd_impl(x, weight, bias, eps, center, act)


@on_input_device
def _fwd_impl(x, weight, bias, eps, center, act):
    f = flat(x)
    y, mean, rstd = _fwd_outputs(x, center, f)
    if x.numel() == 0:
        return y, mean, rstd
    launch = _launch(f)
    _channel_norm_fwd_kernel[(launch.tiles,)](
        f.tensor,
        vector_arg(weight, f.tensor),
        vector_arg(bias, f.tensor),
        y,
        mean if center else rstd,
        rstd,
        f.c,
        launch.s,
        launch.stride_n,
        f.stride_c,
        launch.stride_s,
        eps,
        CENTER=center,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        ACT=act,
        ACC=_acc_type(x.dtype),
        **launch.kw,
    )
    return y, mean, rstd


@_channel_norm_fwd.register_fake
def _(x, weight, bias, eps, center, act):
    return _fwd_outputs(x, center)


@torch.library.custom_op("normlab::channel_norm_bwd", mutates_args=())
def _channel_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    center: bool,
    act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); a parameter gradient is empty when the parameter is None."""
    return tuple(unaliased(_bwd_impl(dy, x, weight, bias, mean, rstd, center, act)))


@on_input_device
def _bwd_impl(dy, x, weight, bias, mean, rstd, center, act):
    f = flat(x)
    dx = torch.empty_like(f.tensor)  # x's layout: flat(x).tensor is x itself for NCHW and channels-last
    if x.numel() == 0:
        zero = [x.new_zeros(0) if p is None else torch.zeros_like(p) for p in (weight, bias)]
        return dx, zero[0], zero[1]
    launch = _launch(f)
    single = launch.kw["SINGLE"]
    programs = _backward_programs(launch.tiles, x.device)
    acc = accumulation_dtype(x.dtype)
    partial = (torch.empty if single else torch.zeros)((2, programs, f.c), device=x.device, dtype=acc)
    _channel_norm_bwd_kernel[(programs,)](
        f.tensor,
        same_layout(dy, f.tensor),
        vector_arg(weight, f.tensor),
        vector_arg(bias, f.tensor),
        mean if center else rstd,
        rstd,
        dx,
        partial,
        f.c,
        launch.s,
        launch.stride_n,
        f.stride_c,
        launch.stride_s,
        launch.tiles,
        CENTER=center,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        ACT=act,
        ACC=_acc_type(x.dtype),
        ACC_2D=_ACC_2D and single,
        **launch.kw,
    )
    dweight, dbias = grads_as_params(partial.sum(dim=1), (weight, bias))
    dweight = _empty_param_grad(weight, x) if weight is None else dweight
    dbias = _empty_param_grad(bias, x) if bias is None else dbias
    return dx, dweight, dbias


@_channel_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, center, act):
    return output_like(x), _empty_param_grad(weight, x), _empty_param_grad(bias, x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, center, act = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients (two launches) for the statistics
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.center, ctx.act = center, act


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    backward = _channel_norm_bwd if traced(dy) else _bwd_impl
    dx, dweight, dbias = backward(dy, x, weight, bias, mean, rstd, ctx.center, ctx.act)
    return dx, None if weight is None else dweight, None if bias is None else dbias, None, None, None


_channel_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
_ChannelNorm = eager_function("_ChannelNorm", _fwd_impl, _setup_context, _backward)


def unchecked_channel_norm(x, weight, bias, eps: float, center: bool, act: int) -> torch.Tensor:
    """The normalized output, unchecked: ``normlab::channel_norm_fwd`` where traced, else its eager Function.
    ``center`` selects LayerNorm (else RMSNorm), ``act`` is an activation code. For callers that validated ``x``
    and the parameters, e.g. LayerNorm / RMSNorm over (N, C) rows in :mod:`normlab.kernels.group_norm`."""
    return (_channel_norm_fwd if traced(x) else _ChannelNorm.call)(x, weight, bias, eps, center, act)[0]


# ---- public functions -----------------------------------------------------------------------------------------


def layer_norm2d(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    act: str | None = None,
) -> torch.Tensor:
    r"""Layer normalization over the channels at every position, as :func:`normlab.functional.layer_norm2d`.

    .. math:: y_{n,:,p} = \mathrm{act}\Big(\frac{x_{n,:,p} - \mathrm{E}_c[x_{n,:,p}]}
        {\sqrt{\mathrm{Var}_c[x_{n,:,p}] + \epsilon}} \gamma + \beta\Big)

    Ba, Kiros & Hinton, 2016, arXiv 1607.06450; the channel-wise form of ConvNeXt (Liu et al., 2022, arXiv
    2201.03545).

    Args:
        x: input (N, C, *) on CUDA, or on CPU under ``TRITON_INTERPRET=1``; NCHW-contiguous and channels_last are
            used in place (other layouts are copied first).
        weight, bias: optional (C,) affine parameters.
        eps: added to the variance.
        act: optional fused activation after the affine: None / "none", "relu" or "silu".

    Returns:
        Tensor of x's shape, dtype and memory format.

    Raises:
        ValueError: for an input with fewer than 2 dims or not floating point, a parameter that is not (C,), or an
            unknown ``act``.

    Note:
        No running statistics: training and eval compute the same thing.

    Example::

        y = layer_norm2d(x.to(memory_format=torch.channels_last), weight, bias, act="relu")
    """
    code = act_code("layer_norm2d", act)
    check_kernel_input("layer_norm2d", x, weight=weight, bias=bias)
    return unchecked_channel_norm(x, weight, bias, eps, True, code)


def rms_norm2d(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, act: str | None = None
) -> torch.Tensor:
    r"""RMS normalization over the channels at every position, as :func:`normlab.functional.rms_norm2d`.

    .. math:: y_{n,:,p} = \mathrm{act}\Big(\frac{x_{n,:,p}}{\sqrt{\mathrm{E}_c[x_{n,:,p}^2] + \epsilon}}
        \gamma\Big)

    Zhang & Sennrich, 2019, arXiv 1910.07467.

    Args:
        x: input (N, C, *) on CUDA, or on CPU under ``TRITON_INTERPRET=1``; NCHW-contiguous and channels_last are
            used in place.
        weight: optional (C,) scale.
        eps: added to the mean of squares.
        act: optional fused activation after the scale: None / "none", "relu" or "silu".

    Returns:
        Tensor of x's shape, dtype and memory format.

    Raises:
        ValueError: for an input with fewer than 2 dims or not floating point, a weight that is not (C,), or an
            unknown ``act``.

    Note:
        No running statistics: training and eval compute the same thing.

    Example::

        y = rms_norm2d(x, weight, act="silu")
    """
    code = act_code("rms_norm2d", act)
    check_kernel_input("rms_norm2d", x, weight=weight)
    return unchecked_channel_norm(x, weight, None, eps, False, code)
