"""Fused Triton kernels for per-channel batch statistics: BatchNorm training and eval, and FrozenBatchNorm.

Batch normalization (Ioffe & Szegedy, 2015, arXiv 1502.03167) with the signatures of
:func:`normlab.functional.batch_norm` and :func:`normlab.functional.frozen_batch_norm`, plus a fused activation.

The input is seen through :func:`~normlab.kernels._triton_utils.flat` as (N, C, S) in one of two layouts:

* channels contiguous (channels_last, and every input with S = 1 such as (N, C)): rows of C values, P = N * S rows;
  tiles are [BLOCK_P rows, BLOCK_C channels], loaded along the channels;
* NCHW: the S positions of each (n, c) are contiguous; tiles run along S ([BLOCK_N samples, BLOCK_S positions] for
  one channel in the reductions, [BLOCK_R (n, c) rows, BLOCK_S positions] in the elementwise kernels).

Training forward (three launches, two reads of x and one write of y):

1. ``_stats_cl_kernel`` / ``_stats_nchw_kernel``: a split reduction. Each program covers a block of rows (or of
   samples and positions) for a block of channels (or one channel) and writes float32 partials count / mean / M2
   (per-tile mean and centred M2, merged across tiles with Chan's formula, so a mean of 1e4 with std 1 keeps its
   variance). The split is chosen so that about four programs per H100 SM run.
2. ``_stats_merge_kernel``: merges the partials of each channel (Chan again), writes mean and rstd, and updates
   running_mean / running_var in place (unbiased variance, momentum), all in one small launch.
3. ``_normalize_kernel``: ``y = act((x - mean) * rstd * weight + bias)``, one read of x and one write of y.

With the layers' NaN guard (``nan_guard=(num_batches_tracked, num_nonfinite_batches)``) the merge writes the updated
running statistics to fresh (C,) tensors instead, and program (0, 0) of the normalizing pass commits them
(``_commit_if_finite``: a loop over the channels checks that every new variance is finite, then copies them into the
buffers and increments num_batches_tracked, or leaves them and increments num_nonfinite_batches). The guard thus adds
no launch and no host synchronization, where cloning the buffers and selecting with torch.where took about ten.

Backward (x and dy read twice, dx written once; only mean and rstd are saved, never a normalized copy of x):

1. ``_grad_sums_cl_kernel`` / ``_grad_sums_nchw_kernel``: the same split, float32 partial sums of dz and dz * xhat
   per channel, where dz is dy through the activation's derivative (recomputed from x).
2. A sum over the partials: these are dbias and dweight.
3. ``_grad_input_kernel``: ``dx = weight * rstd * (dz - mean(dz) - xhat * mean(dz * xhat))``.

Eval with running statistics and FrozenBatchNorm are one elementwise pass (``_normalize_kernel`` computes each
channel's scale from running_var in the kernel); their backward is one elementwise pass for dx, preceded by the
reduction when weight or bias need gradients.

The block sizes and splits are chosen by :func:`_cl_reduce_config`, :func:`_nchw_reduce_config`,
:func:`_merge_config`, :func:`_commit_block` and :func:`_elementwise_config` (one place to tune on a GPU).

Custom ops (so torch.compile(fullgraph=True) keeps them opaque and Inductor recomputes nothing from the mutated
running statistics): ``normlab::batch_norm_train`` (mutates running_mean and running_var, and the guard's
counters; its autograd is a torch.autograd.Function around it, since torch.library cannot register autograd for a
mutating op),
``normlab::batch_norm_affine`` (eval / frozen, autograd registered on the op) and ``normlab::batch_norm_backward``.

Example::

    from normlab.kernels.batch_norm import batch_norm
    x = torch.randn(32, 256, 56, 56, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    running_mean, running_var = torch.zeros(256, device="cuda"), torch.ones(256, device="cuda")
    y = batch_norm(x, running_mean, running_var, weight, bias, training=True, act="relu")
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from .. import functional as reference
from ..functional._checks import check_batch_has_values
from ._triton_utils import (
    Flat,
    act_code,
    activation,
    activation_grad,
    cdiv,
    check_kernel_dtype_device,
    check_kernel_input,
    eager_function,
    flat,
    grads_as_params,
    needs_grad,
    next_power_of_2,
    on_input_device,
    pow2_factor,
    traced,
    with_factor,
)

__all__ = ["batch_norm", "frozen_batch_norm", "commit_if_finite", "commit_batch_stats"]

_TILE = 8192
"""Elements per program and loop step in every kernel. 8192 instead of 4096 made forward+backward 4-11% faster on
an H100 at (32, 256, 56, 56) and (2, 256, 56, 56) bf16, both layouts (benchmarks/gpu_tune.py, CUDA-graph times)."""
_SHORT_ROWS_TILE = 4096
"""Elements per tile of the elementwise passes over rows shorter than 128 positions (see _elementwise_config)."""
_MAX_BLOCK_C = 64
"""Channels per tile in the channels-contiguous reductions."""
_MAX_BLOCK_S = 1024
"""Positions per tile along the contiguous dimension in the NCHW reductions and in the elementwise kernels."""
_TARGET_PROGRAMS = 4 * 132
"""Programs a split reduction aims for: four per SM of an H100."""
_MERGE_PROGRAMS = 32
"""Programs (channel blocks) the merge of the statistics' partials aims for (see ``_merge_config``): 1.9% faster
forward+backward than the earlier 64-channel blocks on an H100 (run 4, (32, 256, 56, 56) bf16 channels-last)."""
_MAX_BLOCK_COMMIT = 1024
"""Channels per loop step of the NaN guard's commit, which one program runs over all channels."""
_NUM_WARPS = 4
"""Warps of the reductions, the merge and the elementwise passes (8 where a short-row elementwise tile would spill)."""


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Count, mean and M2 of the union of two sets from those of each (Chan, Golub & LeVeque, 1979)."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _channel_params(
    mean_ptr, inv_ptr, w_ptr, b_ptr, ch, chmask, eps,
    INV_IS_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-channel (mean, rstd, scale = weight * rstd, shift = bias) as ACC vectors; ``inv`` is rstd or a variance."""
    mean = tl.load(mean_ptr + ch, mask=chmask, other=0.0).to(ACC)
    if INV_IS_VAR:
        rstd = 1.0 / tl.sqrt(tl.load(inv_ptr + ch, mask=chmask, other=1.0).to(ACC) + eps)
    else:
        rstd = tl.load(inv_ptr + ch, mask=chmask, other=1.0).to(ACC)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + ch, mask=chmask, other=0.0).to(ACC)
    if HAS_B:
        shift = tl.load(b_ptr + ch, mask=chmask, other=0.0).to(ACC)
    else:
        shift = tl.zeros_like(mean)
    return mean, rstd, scale, shift


@triton.jit
def _per_channel(v, CHANNELS_LAST: tl.constexpr):
    """A per-channel vector broadcast against a tile: along the columns (channels_last) or the rows (NCHW)."""
    if CHANNELS_LAST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _dz_xhat(dy, x, mean, rstd, scale, shift, ACT: tl.constexpr):
    """The gradient at the pre-activation and the normalized input of a tile (per-channel values broadcast)."""
    xhat = (x - mean) * rstd
    if ACT != 0:
        dy = activation_grad(dy, (x - mean) * scale + shift, ACT)
    return dy, xhat


@triton.jit
def _stats_cl_kernel(
    x_ptr, pcount_ptr, pmean_ptr, pm2_ptr, P, C, ROWS_PER_PROG,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, C_DIV: tl.constexpr,
):  # fmt: skip
    """Partial count / mean / M2 of channels [BLOCK_C] over rows [g * ROWS_PER_PROG, ...) of a (P, C) input."""
    C = with_factor(C, C_DIV)  # rows of C channels: their alignment, for vector loads
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row0 = g * ROWS_PER_PROG
    row_end = tl.minimum(row0 + ROWS_PER_PROG, P)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for start in range(row0, row_end, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
        count = tl.sum(rmask.to(ACC), 0)
        tile_mean = tl.sum(x, 0) / count
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        _, mean, m2 = _chan_merge((start - row0).to(ACC), mean, m2, count, tile_mean, tl.sum(d * d, 0))
    tl.store(pmean_ptr + g * C + cols, mean, mask=cmask)
    tl.store(pm2_ptr + g * C + cols, m2, mask=cmask)
    if tl.program_id(1) == 0:
        tl.store(pcount_ptr + g, (row_end - row0).to(ACC))


@triton.jit
def _stats_nchw_kernel(
    x_ptr, pcount_ptr, pmean_ptr, pm2_ptr, N, C, S, N_PER_PROG, S_PER_PROG, GROUPS_S,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, S_DIV: tl.constexpr,
):  # fmt: skip
    """Partial count / mean / M2 of channel c over a block of samples and positions of an (N, C, S) input."""
    S = with_factor(S, S_DIV)
    c = tl.program_id(0)
    g = tl.program_id(1)
    n0 = (g // GROUPS_S) * N_PER_PROG
    n1 = tl.minimum(n0 + N_PER_PROG, N)
    s0 = (g % GROUPS_S) * S_PER_PROG
    s1 = tl.minimum(s0 + S_PER_PROG, S)
    # per-lane (position within the S block) accumulators, merged across lanes at the end
    lane_n = tl.zeros([BLOCK_S], ACC)
    lane_mean = tl.zeros([BLOCK_S], ACC)
    lane_m2 = tl.zeros([BLOCK_S], ACC)
    for nb in range(n0, n1, BLOCK_N):
        ns = nb + tl.arange(0, BLOCK_N)
        nmask = ns < n1
        row = (ns.to(tl.int64) * C + c) * S
        for sb in range(s0, s1, BLOCK_S):
            ss = sb + tl.arange(0, BLOCK_S)
            mask = nmask[:, None] & (ss < s1)[None, :]
            x = tl.load(x_ptr + row[:, None] + ss[None, :], mask=mask, other=0.0).to(ACC)
            count = tl.sum(mask.to(ACC), 0)
            tile_mean = tl.sum(x, 0) / tl.maximum(count, 1.0)
            d = tl.where(mask, x - tile_mean[None, :], 0.0)
            lane_n, lane_mean, lane_m2 = _chan_merge(lane_n, lane_mean, lane_m2, count, tile_mean, tl.sum(d * d, 0))
    n = tl.sum(lane_n, 0)
    mean = tl.sum(lane_n * lane_mean, 0) / tl.maximum(n, 1.0)
    d = lane_mean - mean
    m2 = tl.sum(lane_m2 + lane_n * d * d, 0)
    tl.store(pmean_ptr + g * C + c, mean)
    tl.store(pm2_ptr + g * C + c, m2)
    if c == 0:
        tl.store(pcount_ptr + g, n)


@triton.jit
def _stats_merge_kernel(
    pcount_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr, new_mean_ptr, new_var_ptr, G, C,
    momentum, eps, UPDATE: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge G partials per channel into mean and rstd; with UPDATE, move the running statistics towards the batch's
    mean and unbiased variance, storing the result at new_mean / new_var (the running buffers themselves for an
    update in place)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        gmask = gs < G
        mask = gmask[:, None] & cmask[None, :]
        offs = gs[:, None] * C + cols[None, :]
        count = tl.load(pcount_ptr + gs, mask=gmask, other=0.0)[:, None]
        part_mean = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        part_m2 = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        block_n = tl.sum(count, 0)
        block_mean = tl.sum(count * part_mean, 0) / tl.maximum(block_n, 1.0)
        d = part_mean - block_mean[None, :]
        block_m2 = tl.sum(part_m2 + count * d * d, 0)
        n, mean, m2 = _chan_merge(n, mean, m2, block_n, block_mean, block_m2)
    var = m2 / n
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)
    if UPDATE:
        running_mean = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(ACC)
        running_var = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(ACC)
        unbiased = var * (n / tl.maximum(n - 1.0, 1.0))
        running_mean = running_mean + momentum * (mean - running_mean)
        running_var = running_var + momentum * (unbiased - running_var)
        tl.store(new_mean_ptr + cols, running_mean.to(new_mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(new_var_ptr + cols, running_var.to(new_var_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _commit_if_finite(
    new_mean_ptr, new_var_ptr, rmean_ptr, rvar_ptr, tracked_ptr, nonfinite_ptr, C, BLOCK: tl.constexpr
):  # fmt: skip
    """The NaN guard's commit, run by one program: if every channel's new running variance is finite, copy new_mean
    and new_var into the running buffers and add 1 to num_batches_tracked; otherwise leave the buffers as they are
    and add 1 to num_nonfinite_batches."""
    ok = _all_finite(new_var_ptr, C, BLOCK)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < C * ok  # nothing when ok == 0
        tl.store(rmean_ptr + cols, tl.load(new_mean_ptr + cols, mask=mask), mask=mask)
        tl.store(rvar_ptr + cols, tl.load(new_var_ptr + cols, mask=mask), mask=mask)
    _count_batch(tracked_ptr, nonfinite_ptr, tl.load(tracked_ptr), ok)


@triton.jit
def _all_finite(var_ptr, C, BLOCK: tl.constexpr):
    """1 if every one of the C values at ``var_ptr`` is finite, else 0 (NaN, +-Inf), looping in blocks of BLOCK."""
    finite = tl.full([BLOCK], 1, tl.int32)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        var = tl.load(var_ptr + cols, mask=cols < C, other=0.0)
        finite = finite & (tl.abs(var) < float("inf")).to(tl.int32)  # false for NaN and +-Inf
    return tl.min(finite, 0)


@triton.jit
def _count_batch(tracked_ptr, nonfinite_ptr, tracked, ok):
    """Count the batch: num_batches_tracked (``tracked`` before it) + 1 if ``ok``, else num_nonfinite_batches + 1."""
    tl.store(tracked_ptr, tracked + ok.to(tl.int64))
    tl.store(nonfinite_ptr, tl.load(nonfinite_ptr) + (1 - ok).to(tl.int64))


@triton.jit
def _commit_kernel(
    new_mean_ptr, new_var_ptr, rmean_ptr, rvar_ptr, tracked_ptr, nonfinite_ptr, C, BLOCK: tl.constexpr
):  # fmt: skip
    """The NaN guard's commit as a launch of its own (one program), for updates computed outside these kernels."""
    _commit_if_finite(new_mean_ptr, new_var_ptr, rmean_ptr, rvar_ptr, tracked_ptr, nonfinite_ptr, C, BLOCK)


@triton.jit
def _blend_and_clear(b_ptr, r_ptr, cols, commit, cmask, m_hi, m_lo, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """running += (m_hi + m_lo) * (batch - running) where ``commit``, in ACC; batch = 0 where ``cmask``. The momentum
    comes as two float32 parts (a kernel's float arguments are float32) so that float64 statistics get it whole."""
    batch = tl.load(b_ptr + cols, mask=commit, other=0.0).to(ACC)
    running = tl.load(r_ptr + cols, mask=commit, other=0.0).to(ACC)
    step = batch - running
    tl.store(r_ptr + cols, (running + (m_hi * step + m_lo * step)).to(r_ptr.dtype.element_ty), mask=commit)
    tl.store(b_ptr + cols, tl.zeros([BLOCK], b_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _commit_batch_stats_kernel(
    bmean_ptr, bvar_ptr, rmean_ptr, rvar_ptr, tracked_ptr, nonfinite_ptr, C, momentum_hi, momentum_lo,
    CUMULATIVE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The NaN guard's commit of a batch's statistics, run by one program: if every channel's batch variance is
    finite, ``running += momentum * (batch - running)`` (momentum = momentum_hi + momentum_lo; CUMULATIVE:
    1 / (tracked + 1), read here) and num_batches_tracked + 1; otherwise the running statistics stay and
    num_nonfinite_batches + 1. The batch statistics are then set to zero either way, ready for the next step."""
    ok = _all_finite(bvar_ptr, C, BLOCK)
    tracked = tl.load(tracked_ptr)
    m_hi, m_lo = momentum_hi, momentum_lo
    if CUMULATIVE:
        m_hi = 1.0 / (tracked + 1).to(ACC)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cmask = cols < C
        commit = cols < C * ok  # nothing when ok == 0
        _blend_and_clear(bmean_ptr, rmean_ptr, cols, commit, cmask, m_hi, m_lo, ACC, BLOCK)
        _blend_and_clear(bvar_ptr, rvar_ptr, cols, commit, cmask, m_hi, m_lo, ACC, BLOCK)
    _count_batch(tracked_ptr, nonfinite_ptr, tracked, ok)


@triton.jit
def _normalize_kernel(
    x_ptr, y_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, A, B, C, eps,
    new_mean_ptr, new_var_ptr, rmean_ptr, rvar_ptr, tracked_ptr, nonfinite_ptr,
    CHANNELS_LAST: tl.constexpr, INV_IS_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    COMMIT: tl.constexpr, BLOCK_COMMIT: tl.constexpr, B_DIV: tl.constexpr,
):  # fmt: skip
    """y = act((x - mean) * rstd * weight + bias) over an (A, B) input with B contiguous; the channel is the column
    (channels_last: B = C) or the row modulo C (NCHW: rows are (n, c), B = S). With COMMIT, program (0, 0) also
    runs the NaN guard's commit (``_commit_if_finite``) of the running statistics the merge kernel wrote to
    new_mean / new_var: the guard costs no launch of its own."""
    B = with_factor(B, B_DIV)
    if COMMIT:
        if tl.program_id(0) + tl.program_id(1) == 0:
            _commit_if_finite(
                new_mean_ptr, new_var_ptr, rmean_ptr, rvar_ptr, tracked_ptr, nonfinite_ptr, C, BLOCK_COMMIT
            )
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows < A)[:, None] & (cols < B)[None, :]
    if CHANNELS_LAST:
        mean, rstd, scale, shift = _channel_params(
            mean_ptr, inv_ptr, w_ptr, b_ptr, cols, cols < B, eps, INV_IS_VAR, HAS_W, HAS_B, ACC
        )
    else:
        mean, rstd, scale, shift = _channel_params(
            mean_ptr, inv_ptr, w_ptr, b_ptr, rows % C, rows < A, eps, INV_IS_VAR, HAS_W, HAS_B, ACC
        )
    offs = rows.to(tl.int64)[:, None] * B + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = (x - _per_channel(mean, CHANNELS_LAST)) * _per_channel(scale, CHANNELS_LAST) + _per_channel(
        shift, CHANNELS_LAST
    )
    tl.store(y_ptr + offs, activation(z, ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_cl_kernel(
    dy_ptr, x_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, psum_ptr, P, C, G, ROWS_PER_PROG, eps,
    INV_IS_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, C_DIV: tl.constexpr,
):  # fmt: skip
    """Partial sums of dz and dz * xhat of channels [BLOCK_C] over a block of rows of a (P, C) input, stored at
    psum[0, c, g] and psum[1, c, g] (channel-major)."""
    C = with_factor(C, C_DIV)  # rows of C channels: their alignment, for vector loads
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, rstd, scale, shift = _channel_params(
        mean_ptr, inv_ptr, w_ptr, b_ptr, cols, cmask, eps, INV_IS_VAR, HAS_W, HAS_B, ACC
    )
    row0 = g * ROWS_PER_PROG
    row_end = tl.minimum(row0 + ROWS_PER_PROG, P)
    sum_dz = tl.zeros([BLOCK_C], ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], ACC)
    for start in range(row0, row_end, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        dz, xhat = _dz_xhat(dy, x, mean[None, :], rstd[None, :], scale[None, :], shift[None, :], ACT)
        dz = tl.where(mask, dz, 0.0)
        sum_dz += tl.sum(dz, 0)
        sum_dz_xhat += tl.sum(dz * xhat, 0)
    tl.store(psum_ptr + cols * G + g, sum_dz, mask=cmask)
    tl.store(psum_ptr + (C + cols) * G + g, sum_dz_xhat, mask=cmask)


@triton.jit
def _grad_sums_nchw_kernel(
    dy_ptr, x_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, psum_ptr, N, C, S, G, N_PER_PROG, S_PER_PROG, GROUPS_S, eps,
    INV_IS_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, S_DIV: tl.constexpr,
):  # fmt: skip
    """Partial sums of dz and dz * xhat of channel c over a block of samples and positions of an (N, C, S) input."""
    S = with_factor(S, S_DIV)
    c = tl.program_id(0)
    g = tl.program_id(1)
    mean, rstd, scale, shift = _channel_params(
        mean_ptr, inv_ptr, w_ptr, b_ptr, c, c < C, eps, INV_IS_VAR, HAS_W, HAS_B, ACC
    )
    n0 = (g // GROUPS_S) * N_PER_PROG
    n1 = tl.minimum(n0 + N_PER_PROG, N)
    s0 = (g % GROUPS_S) * S_PER_PROG
    s1 = tl.minimum(s0 + S_PER_PROG, S)
    sum_dz = tl.zeros([BLOCK_S], ACC)
    sum_dz_xhat = tl.zeros([BLOCK_S], ACC)
    for nb in range(n0, n1, BLOCK_N):
        ns = nb + tl.arange(0, BLOCK_N)
        nmask = ns < n1
        row = (ns.to(tl.int64) * C + c) * S
        for sb in range(s0, s1, BLOCK_S):
            ss = sb + tl.arange(0, BLOCK_S)
            mask = nmask[:, None] & (ss < s1)[None, :]
            offs = row[:, None] + ss[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            dz, xhat = _dz_xhat(dy, x, mean, rstd, scale, shift, ACT)
            dz = tl.where(mask, dz, 0.0)
            sum_dz += tl.sum(dz, 0)
            sum_dz_xhat += tl.sum(dz * xhat, 0)
    tl.store(psum_ptr + g * C + c, tl.sum(sum_dz, 0))
    tl.store(psum_ptr + (G + g) * C + c, tl.sum(sum_dz_xhat, 0))


@triton.jit
def _grad_input_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, sums_ptr, inv_count, A, B, C, eps,
    CHANNELS_LAST: tl.constexpr, BATCH_STATS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, B_DIV: tl.constexpr,
):  # fmt: skip
    """dx = weight * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)) with batch statistics, else weight * rstd * dz;
    the layout as in ``_normalize_kernel``; sums_ptr holds (sum dz, sum dz * xhat) as (2, C)."""
    B = with_factor(B, B_DIV)
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows < A)[:, None] & (cols < B)[None, :]
    if CHANNELS_LAST:
        ch = cols
        chmask = cols < B
    else:
        ch = rows % C
        chmask = rows < A
    mean, rstd, scale, shift = _channel_params(
        mean_ptr, inv_ptr, w_ptr, b_ptr, ch, chmask, eps, not BATCH_STATS, HAS_W, HAS_B, ACC
    )
    offs = rows.to(tl.int64)[:, None] * B + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz, xhat = _dz_xhat(
        dy,
        x,
        _per_channel(mean, CHANNELS_LAST),
        _per_channel(rstd, CHANNELS_LAST),
        _per_channel(scale, CHANNELS_LAST),
        _per_channel(shift, CHANNELS_LAST),
        ACT,
    )
    if BATCH_STATS:
        mean_dz = tl.load(sums_ptr + ch, mask=chmask, other=0.0) * inv_count
        mean_dz_xhat = tl.load(sums_ptr + C + ch, mask=chmask, other=0.0) * inv_count
        dz = dz - _per_channel(mean_dz, CHANNELS_LAST) - xhat * _per_channel(mean_dz_xhat, CHANNELS_LAST)
    dx = dz * _per_channel(scale, CHANNELS_LAST)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------- launch configs


@functools.lru_cache(maxsize=4096)
def _cl_reduce_config(p: int, c: int) -> tuple[tuple[int, int], dict]:
    """Grid and meta-parameters of a split reduction over the P rows of a (P, C) channels-contiguous input."""
    block_c = min(next_power_of_2(c), _MAX_BLOCK_C)
    block_p = min(next_power_of_2(p), max(1, _TILE // block_c))
    c_blocks = cdiv(c, block_c)
    groups = max(1, min(cdiv(_TARGET_PROGRAMS, c_blocks), cdiv(p, block_p)))
    rows = cdiv(cdiv(p, groups), block_p) * block_p
    grid = (cdiv(p, rows), c_blocks)
    meta = {"ROWS_PER_PROG": rows, "BLOCK_P": block_p, "BLOCK_C": block_c, "C_DIV": pow2_factor(c)}
    return grid, {**meta, "num_warps": _NUM_WARPS}


@functools.lru_cache(maxsize=4096)
def _nchw_reduce_config(n: int, c: int, s: int) -> tuple[tuple[int, int], dict]:
    """Grid (channel, split) and meta-parameters of a split reduction over (N, S) of an (N, C, S) input: samples
    are split first, positions too when N * C alone gives too few programs."""
    block_s = min(next_power_of_2(s), _MAX_BLOCK_S)
    block_n = min(next_power_of_2(n), max(1, _TILE // block_s))
    groups_n = max(1, min(cdiv(_TARGET_PROGRAMS, c), cdiv(n, block_n)))
    n_per = cdiv(cdiv(n, groups_n), block_n) * block_n
    groups_n = cdiv(n, n_per)
    groups_s = max(1, min(cdiv(_TARGET_PROGRAMS, c * groups_n), cdiv(s, block_s)))
    s_per = cdiv(cdiv(s, groups_s), block_s) * block_s
    groups_s = cdiv(s, s_per)
    meta = {"N_PER_PROG": n_per, "S_PER_PROG": s_per, "GROUPS_S": groups_s, "BLOCK_N": block_n, "BLOCK_S": block_s}
    meta["S_DIV"] = pow2_factor(s)
    return (c, groups_n * groups_s), {**meta, "num_warps": _NUM_WARPS}


@functools.lru_cache(maxsize=4096)
def _merge_config(groups: int, c: int) -> tuple[tuple[int], dict]:
    """Grid and meta-parameters of the merge of ``groups`` partials per channel: channel blocks narrow enough for
    about :data:`_MERGE_PROGRAMS` programs (at least 8 channels, one 32-byte sector per partial row). With 64-channel
    blocks, 256 channels got 4 programs, each looping over 132 partial rows: 4.9 us on an H100 (run 2's profile at
    (32, 256, 56, 56) channels-last, 3% of BatchNorm's forward+backward)."""
    block_c = min(next_power_of_2(c), _MAX_BLOCK_C, max(8, next_power_of_2(cdiv(c, _MERGE_PROGRAMS))))
    block_g = min(next_power_of_2(groups), max(1, _TILE // block_c))
    # 8 warps for full tiles: with 4, 256 groups x 32 channels (channels-last (32, 24, 112, 112)) spilled registers on
    # sm_90 (255 registers, a 120-byte stack)
    warps = 8 if block_g * block_c > _TILE // 2 else _NUM_WARPS
    return (cdiv(c, block_c),), {"BLOCK_G": block_g, "BLOCK_C": block_c, "num_warps": warps}


@functools.lru_cache(maxsize=4096)
def _commit_block(c: int) -> int:
    """Channels per loop step of the guard's single-program commit (``_commit_if_finite``)."""
    return min(next_power_of_2(c), _MAX_BLOCK_COMMIT)


@functools.lru_cache(maxsize=4096)
def _elementwise_config(a: int, b: int) -> tuple[tuple[int, int], dict]:
    """Grid and meta-parameters of an elementwise pass over an (A, B) input with B contiguous."""
    block_b = min(next_power_of_2(b), _MAX_BLOCK_S)
    # short rows (few positions, NCHW) make tiles of many rows, each with its own channel parameters: tiles of at
    # most _SHORT_ROWS_TILE elements and 8 warps keep the per-thread share of those below the register limit (4 warps
    # spilled at (32, 2048, 7, 7) bf16 on sm_90, and so did 8 warps with 8192-element tiles)
    short = block_b < 128
    tile = min(_TILE, _SHORT_ROWS_TILE) if short else _TILE
    block_a = min(next_power_of_2(a), max(1, tile // block_b))
    warps = max(8, _NUM_WARPS) if short and block_a * block_b >= _SHORT_ROWS_TILE else _NUM_WARPS
    meta = {"BLOCK_A": block_a, "BLOCK_B": block_b, "B_DIV": pow2_factor(b), "num_warps": warps}
    return (cdiv(a, block_a), cdiv(b, block_b)), meta


# ------------------------------------------------------------------------------------------------ launchers


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _elementwise_view(f: Flat) -> tuple[int, int, bool]:
    """(A, B, channels_last) of the elementwise kernels: B is the contiguous dimension."""
    if f.stride_c == 1:
        return f.n * f.s, f.c, True
    return f.n * f.c, f.s, False


def _channel_tensor(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """``t`` made contiguous, or a placeholder pointer for a kernel argument switched off by a constexpr flag."""
    return fallback if t is None else t.contiguous()


def _launch_stats(f: Flat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1 of the training forward: partial (count (G,), mean (G, C), M2 (G, C)) in the accumulation dtype."""
    x, acc = f.tensor, _acc(f.tensor.dtype)
    if f.stride_c == 1:
        grid, meta = _cl_reduce_config(f.n * f.s, f.c)
        meta = dict(meta)  # a copy: the config is cached
        args = (f.n * f.s, f.c, meta.pop("ROWS_PER_PROG"))
        kernel = _stats_cl_kernel
    else:
        grid, meta = _nchw_reduce_config(f.n, f.c, f.s)
        meta = dict(meta)  # a copy: the config is cached
        args = (f.n, f.c, f.s, meta.pop("N_PER_PROG"), meta.pop("S_PER_PROG"), meta.pop("GROUPS_S"))
        kernel = _stats_nchw_kernel
    groups = grid[0] if f.stride_c == 1 else grid[1]
    pcount = torch.empty(groups, dtype=acc, device=x.device)
    pmean = torch.empty((groups, f.c), dtype=acc, device=x.device)
    pm2 = torch.empty((groups, f.c), dtype=acc, device=x.device)
    kernel[grid](x, pcount, pmean, pm2, *args, ACC=_tl_acc(x.dtype), **meta)
    return pcount, pmean, pm2


def _launch_normalize(f: Flat, y, mean, inv, weight, bias, eps: float, act: int, inv_is_var: bool, commit=None):
    """The normalizing pass over ``f`` (``flat(x)``); ``commit`` = (new_mean, new_var, running_mean, running_var,
    num_batches_tracked, num_nonfinite_batches) also runs the NaN guard's commit in it (see ``_commit_if_finite``)."""
    x = f.tensor
    a, b, channels_last = _elementwise_view(f)
    grid, meta = _elementwise_config(a, b)
    commit_args = commit if commit is not None else (mean,) * 6  # placeholders, unused without COMMIT
    _normalize_kernel[grid](
        x, y, mean, inv, _channel_tensor(weight, mean), _channel_tensor(bias, mean), a, b, f.c, eps, *commit_args,
        CHANNELS_LAST=channels_last, INV_IS_VAR=inv_is_var, HAS_W=weight is not None, HAS_B=bias is not None,
        ACT=act, ACC=_tl_acc(x.dtype), COMMIT=commit is not None, BLOCK_COMMIT=_commit_block(f.c), **meta,
    )  # fmt: skip


@on_input_device
def _train_forward(
    x, weight, bias, running_mean, running_var, tracked, nonfinite, momentum: float, eps: float, act: int
):  # fmt: skip
    f = flat(x)
    acc = _acc(x.dtype)
    mean = torch.empty(f.c, dtype=acc, device=x.device)
    rstd = torch.empty(f.c, dtype=acc, device=x.device)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y, mean, rstd
    update = running_mean is not None and running_var is not None
    guarded = update and tracked is not None
    rmean = running_mean.contiguous() if update else mean
    rvar = running_var.contiguous() if update else rstd
    # guarded, the merge writes the updated statistics to fresh tensors and the normalizing pass commits them
    new_mean, new_var = (torch.empty_like(rmean), torch.empty_like(rvar)) if guarded else (rmean, rvar)
    pcount, pmean, pm2 = _launch_stats(f)
    grid, meta = _merge_config(pcount.numel(), f.c)
    _stats_merge_kernel[grid](
        pcount, pmean, pm2, mean, rstd, rmean, rvar, new_mean, new_var, pcount.numel(), f.c, momentum, eps,
        UPDATE=update, ACC=_tl_acc(x.dtype), **meta,
    )  # fmt: skip
    commit = (new_mean, new_var, rmean, rvar, tracked, nonfinite) if guarded else None
    _launch_normalize(f, y, mean, rstd, weight, bias, eps, act, inv_is_var=False, commit=commit)
    if update:
        # the kernels updated contiguous copies of strided buffers: write them back
        for buffer, updated in ((running_mean, rmean), (running_var, rvar)):
            if updated is not buffer:
                buffer.copy_(updated)
    return y, mean, rstd


def _launch_grad_sums(dy, f: Flat, mean, inv, weight, bias, eps: float, act: int, batch_stats: bool) -> torch.Tensor:
    """Stages 1 and 2 of the backward over ``f`` (``flat(x)``): (sum of dz, sum of dz * xhat) per channel, (2, C)."""
    x = f.tensor
    acc = _acc(x.dtype)
    if f.stride_c == 1:
        grid, meta = _cl_reduce_config(f.n * f.s, f.c)
        meta = dict(meta)  # a copy: the config is cached
        groups = grid[0]
        args = (f.n * f.s, f.c, groups, meta.pop("ROWS_PER_PROG"))
        kernel = _grad_sums_cl_kernel
    else:
        grid, meta = _nchw_reduce_config(f.n, f.c, f.s)
        meta = dict(meta)  # a copy: the config is cached
        groups = grid[1]
        args = (f.n, f.c, f.s, groups, meta.pop("N_PER_PROG"), meta.pop("S_PER_PROG"), meta.pop("GROUPS_S"))
        kernel = _grad_sums_nchw_kernel
    # channels-last: channel-major, (2, C, groups), so that torch sums the groups along contiguous memory (over a
    # middle dim, (2, groups, C), its reduction runs few threads per output: 4.9 us per forward+backward at (32, 256,
    # 56, 56) on an H100, run 2). NCHW grids have a program per channel and only a few groups: (2, groups, C) there
    # (channel-major stores made its float32 kernel spill under Triton 3.6)
    channel_major = f.stride_c == 1
    shape = (2, f.c, groups) if channel_major else (2, groups, f.c)
    psum = torch.empty(shape, dtype=acc, device=x.device)
    kernel[grid](
        dy, x, mean, inv, _channel_tensor(weight, mean), _channel_tensor(bias, mean), psum, *args, eps,
        INV_IS_VAR=not batch_stats, HAS_W=weight is not None, HAS_B=bias is not None, ACT=act,
        ACC=_tl_acc(x.dtype), **meta,
    )  # fmt: skip
    return psum.sum(2 if channel_major else 1)


@on_input_device
def _backward(dy, x, mean, inv, weight, bias, eps: float, act: int, batch_stats: bool, param_grads: bool):
    f = flat(x)
    dx = torch.empty_like(x)
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    mean, inv = mean.contiguous(), inv.contiguous()
    if x.numel() == 0:
        return dx, x.new_zeros((2, f.c), dtype=_acc(x.dtype))
    if batch_stats or param_grads:
        sums = _launch_grad_sums(dy, f, mean, inv, weight, bias, eps, act, batch_stats)
    else:
        sums = x.new_zeros((2, f.c), dtype=_acc(x.dtype))
    a, b, channels_last = _elementwise_view(f)
    grid, meta = _elementwise_config(a, b)
    _grad_input_kernel[grid](
        dy, x, dx, mean, inv, _channel_tensor(weight, mean), _channel_tensor(bias, mean), sums,
        f.c / x.numel(), a, b, f.c, eps, CHANNELS_LAST=channels_last, BATCH_STATS=batch_stats,
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=act, ACC=_tl_acc(x.dtype), **meta,
    )  # fmt: skip
    return dx, sums


# ---------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op(
    "normlab::batch_norm_train",
    mutates_args=("running_mean", "running_var", "num_batches_tracked", "num_nonfinite_batches"),
)
def _batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    num_nonfinite_batches: torch.Tensor | None,
    momentum: float,
    eps: float,
    act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, batch mean, batch rstd); running_mean and running_var (when given) are updated in place. With the two
    counters (the NaN guard), only if every new running variance is finite: then num_batches_tracked, else
    num_nonfinite_batches is incremented."""
    return _train_forward(
        x, weight, bias, running_mean, running_var, num_batches_tracked, num_nonfinite_batches, momentum, eps, act
    )


@_batch_norm_train.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, num_nonfinite_batches, momentum, eps, act):
    stat = x.new_empty(x.shape[1], dtype=_acc(x.dtype))
    return torch.empty_like(x), stat, torch.empty_like(stat)


@torch.library.custom_op("normlab::batch_norm_affine", mutates_args=())
def _batch_norm_affine(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: int,
) -> torch.Tensor:
    """act((x - mean) / sqrt(var + eps) * weight + bias) with fixed per-channel statistics."""
    return _affine_forward(x, mean, var, weight, bias, eps, act)


@on_input_device
def _affine_forward(x, mean, var, weight, bias, eps, act):
    y = torch.empty_like(x)
    if x.numel() > 0:
        _launch_normalize(flat(x), y, mean.contiguous(), var.contiguous(), weight, bias, eps, act, inv_is_var=True)
    return y


@_batch_norm_affine.register_fake
def _(x, mean, var, weight, bias, eps, act):
    return torch.empty_like(x)


@torch.library.custom_op("normlab::batch_norm_backward", mutates_args=())
def _batch_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    inv: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: int,
    batch_stats: bool,
    param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, sums) where sums (2, C) = (dbias, dweight) in the accumulation dtype (zeros when neither batch_stats nor
    param_grads asked for them). With batch_stats, (mean, inv) are the batch mean and rstd; without, the fixed
    mean and variance."""
    return _backward(dy, x, mean, inv, weight, bias, eps, act, batch_stats, param_grads)


@_batch_norm_backward.register_fake
def _(dy, x, mean, inv, weight, bias, eps, act, batch_stats, param_grads):
    return torch.empty_like(x), x.new_empty((2, x.shape[1]), dtype=_acc(x.dtype))


def _param_grads(sums: torch.Tensor, weight, bias, needs_weight: bool, needs_bias: bool):
    dbias, dweight = grads_as_params(sums, (bias if needs_bias else None, weight if needs_weight else None))
    return dweight, dbias


def _affine_setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, eps, act = inputs
    ctx.save_for_backward(x, mean, var, weight, bias)
    ctx.eps, ctx.act = eps, act


def _affine_backward(ctx, dy):
    x, mean, var, weight, bias = ctx.saved_tensors
    needs_weight, needs_bias = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    backward = _batch_norm_backward if traced(dy) else _backward
    dx, sums = backward(dy, x, mean, var, weight, bias, ctx.eps, ctx.act, False, needs_weight or needs_bias)
    return (dx, None, None, *_param_grads(sums, weight, bias, needs_weight, needs_bias), None, None)


_batch_norm_affine.register_autograd(_affine_backward, setup_context=_affine_setup_context)
_BatchNormAffine = eager_function("_BatchNormAffine", _affine_forward, _affine_setup_context, _affine_backward)


def _affine(x, mean, var, weight, bias, eps: float, act: int) -> torch.Tensor:
    """``normlab::batch_norm_affine`` with its autograd: the custom op where traced, else its eager Function."""
    return (_batch_norm_affine if traced(x) else _BatchNormAffine.call)(x, mean, var, weight, bias, eps, act)


class _BatchNormTrain(torch.autograd.Function):
    """Autograd of ``normlab::batch_norm_train``. torch.library refuses autograd formulas for mutating ops, so this
    Function wraps it; torch.compile traces it into one forward and one backward op, saving the batch mean and rstd
    (never recomputing them from the updated running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, tracked, nonfinite, momentum, eps, act):
        train = _batch_norm_train if traced(x) else _train_forward
        y, mean, rstd = train(x, weight, bias, running_mean, running_var, tracked, nonfinite, momentum, eps, act)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps, ctx.act = eps, act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs_weight, needs_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        backward = _batch_norm_backward if traced(dy) else _backward
        dx, sums = backward(dy, x, mean, rstd, weight, bias, ctx.eps, ctx.act, True, True)
        dx = dx if ctx.needs_input_grad[0] else None
        return (dx, *_param_grads(sums, weight, bias, needs_weight, needs_bias), *(None,) * 7)


# ------------------------------------------------------------------------------------------ public functions


def _check_nan_guard(x, running_mean, running_var, training: bool, process_group, nan_guard) -> None:
    """nan_guard is (num_batches_tracked, num_nonfinite_batches) for a fused training update."""
    if not (training and running_mean is not None and running_var is not None):
        raise ValueError(
            f"batch_norm: nan_guard guards a training update of running statistics, got training={training} with "
            f"running_mean {'None' if running_mean is None else 'given'} and running_var "
            f"{'None' if running_var is None else 'given'}"
        )
    if process_group is not None:
        raise ValueError(
            "batch_norm: nan_guard cannot be combined with process_group (which runs the reference): guard the "
            "update around the call"
        )
    if not (isinstance(nan_guard, (tuple, list)) and len(nan_guard) == 2):
        raise ValueError(
            f"batch_norm: nan_guard must be (num_batches_tracked, num_nonfinite_batches), got {nan_guard!r}"
        )
    for name, t in zip(("num_batches_tracked", "num_nonfinite_batches"), nan_guard):
        if not (isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == torch.int64 and t.device == x.device):
            got = (
                f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else repr(t)
            )
            raise ValueError(f"batch_norm: nan_guard's {name} must be a 0-dim int64 tensor on {x.device}, got {got}")


def _activate(y: torch.Tensor, act: int) -> torch.Tensor:
    if act == 1:
        return torch.relu(y)
    if act == 2:
        return torch.nn.functional.silu(y)
    return y


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    process_group=None,
    act: str | None = None,
    nan_guard: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Batch normalization (Ioffe & Szegedy, 2015, arXiv 1502.03167) with fused Triton kernels.

    .. math:: y = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta\right)

    The semantics of :func:`normlab.functional.batch_norm` (and torch.nn.functional.batch_norm): in training, or
    without running statistics, the statistics are the batch's per channel over (N, \*) with the biased variance;
    running statistics, when given in training, are updated in place with the unbiased variance,
    ``running = (1 - momentum) * running + momentum * batch``, in the same launch that merges the statistics.
    Otherwise the running statistics normalize (one elementwise pass). Statistics accumulate in float32 (float64
    for float64 input); y has x's dtype and memory format.

    Args:
        x: input (N, C, \*), on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
        running_mean, running_var: (C,) buffers or None. No gradient flows to them.
        weight, bias: optional (C,) affine parameters (may be float32 for half-precision x).
        training: use (and record) batch statistics.
        momentum: PyTorch convention, weight of the new batch (Keras' 0.9 is PyTorch's 0.1). A number: for a
            cumulative average (``momentum=None`` in the layers) pass ``1 / (num_batches_tracked + 1)``, as
            :class:`normlab.layers.BatchNorm2d` does.
        eps: added to the variance.
        process_group: synchronize the batch statistics over this torch.distributed group. Not fused: the call
            falls back to the reference (and applies ``act`` after it).
        act: fused activation after the affine: None, "relu" or "silu".
        nan_guard: ``(num_batches_tracked, num_nonfinite_batches)``, 0-dim int64 counters on x's device, for a
            training update of running statistics (the layers' ``nan_guard=True``): the update is committed only
            if every channel's new running variance is finite, and then num_batches_tracked is incremented;
            otherwise the running statistics are left unchanged and num_nonfinite_batches is incremented. Done by
            one program of the normalizing pass, without a launch or a host synchronization of its own.

    Raises:
        ValueError: on an input with fewer than 2 dims, a per-channel tensor whose shape is not (C,), an unknown
            ``act``, ``momentum=None`` when running statistics would be updated, (like the reference) a batch
            with one value per channel when batch statistics are used, or a ``nan_guard`` without a training
            update of running statistics, with ``process_group``, or whose counters are not 0-dim int64 tensors on
            x's device.

    Note:
        Training (or no running statistics) normalizes with the batch statistics; eval with running statistics is
        the fixed per-channel affine of :func:`frozen_batch_norm`.

    Example::

        x = torch.randn(8, 16, 32, 32, device="cuda")
        running_mean, running_var = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
        y = batch_norm(x, running_mean, running_var, training=True, momentum=0.1)
    """
    code = act_code("batch_norm", act)
    if nan_guard is not None:
        _check_nan_guard(x, running_mean, running_var, training, process_group, nan_guard)
    if process_group is not None:
        y = reference.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum, eps, process_group=process_group
        )
        return _activate(y, code)
    check_kernel_input("batch_norm", x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    x = flat(x).tensor
    if training or running_mean is None:
        check_batch_has_values("batch_norm", x)
        update = training and running_mean is not None and running_var is not None
        if update and momentum is None:
            raise ValueError(
                "batch_norm: momentum=None is the layers' cumulative average; pass the factor "
                "1 / (num_batches_tracked + 1) as momentum"
            )
        if not update:
            running_mean = running_var = None
        counters = nan_guard if nan_guard is not None else (None, None)
        momentum = float(momentum) if update else 0.0
        args = (x, weight, bias, running_mean, running_var, *counters, momentum, float(eps), code)
        if not traced(x) and not needs_grad(args):  # inference-style call: no autograd.Function overhead
            return _train_forward(*args)[0]
        return _BatchNormTrain.apply(*args)
    if running_var is None:
        raise ValueError("batch_norm: running_mean is given but running_var=None; pass both or neither")
    return _affine(x, running_mean, running_var, weight, bias, float(eps), code)


@on_input_device
def commit_if_finite(
    new_mean: torch.Tensor,
    new_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    num_nonfinite_batches: torch.Tensor,
) -> None:
    """The batch-norm layers' NaN guard in one launch: if every value of ``new_var`` is finite, copy ``new_mean`` /
    ``new_var`` into ``running_mean`` / ``running_var`` and add 1 to ``num_batches_tracked``; otherwise leave them and
    add 1 to ``num_nonfinite_batches``. No host synchronization; the torch ops that do the same take about ten
    launches. For updates computed outside the fused training kernels (torch's batch norm, which the dispatch picks
    where it measured faster).

    Raises:
        ValueError: unless the four statistics are contiguous (C,) tensors of one dtype and the two counters 0-dim
            int64 tensors, all on one device where the kernels run.
    """
    stats = {"new_mean": new_mean, "new_var": new_var, "running_mean": running_mean, "running_var": running_var}
    tensors = _checked_commit("commit_if_finite", stats, num_batches_tracked, num_nonfinite_batches)
    c = running_mean.numel()
    _commit_kernel[(1,)](*tensors, c, BLOCK=_commit_block(c))


def _checked_commit(owner: str, stats: dict, num_batches_tracked, num_nonfinite_batches) -> tuple[torch.Tensor, ...]:
    """The arguments of a commit kernel, (*stats, num_batches_tracked, num_nonfinite_batches), after checking that the
    statistics are contiguous (C,) tensors of running_mean's dtype and the counters 0-dim int64 tensors, all on one
    device where the kernels run (ValueError naming ``owner`` and the tensor otherwise)."""
    running_mean = stats["running_mean"]
    c = running_mean.numel()
    for name, t in stats.items():
        if t.dim() != 1 or t.numel() != c or not t.is_contiguous() or t.dtype != running_mean.dtype:
            raise ValueError(
                f"{owner}: {name} must be a contiguous ({c},) {running_mean.dtype} tensor, got "
                f"{t.dtype} of shape {tuple(t.shape)}"
            )
    for name, t in (("num_batches_tracked", num_batches_tracked), ("num_nonfinite_batches", num_nonfinite_batches)):
        if t.dim() != 0 or t.dtype != torch.int64:
            raise ValueError(f"{owner}: {name} must be a 0-dim int64 tensor, got {t.dtype} {tuple(t.shape)}")
    tensors = (*stats.values(), num_batches_tracked, num_nonfinite_batches)
    if any(t.device != running_mean.device for t in tensors):
        raise ValueError(f"{owner}: every tensor must be on running_mean's device")
    check_kernel_dtype_device(owner, running_mean)  # no view made: this runs at every guarded training step
    return tensors


@on_input_device
def commit_batch_stats(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    num_nonfinite_batches: torch.Tensor,
    momentum: float | None,
) -> None:
    """The batch-norm layers' NaN guard for a batch whose mean and unbiased variance torch's batch norm wrote to
    ``batch_mean`` / ``batch_var`` (passed as its running statistics, zeros, with momentum 1): in one launch, if every
    value of ``batch_var`` is finite, ``running = momentum * batch + (1 - momentum) * running`` and
    ``num_batches_tracked`` + 1, else ``num_nonfinite_batches`` + 1 and nothing else; then ``batch_mean`` and
    ``batch_var`` are zeroed for the next step. ``momentum=None`` is the cumulative average, 1 / (batches tracked + 1),
    read on the device (no host synchronization). The writes bypass autograd's version counters, as torch's own
    running-statistics updates do.

    Raises:
        ValueError: unless the four statistics are contiguous (C,) tensors of one dtype and the two counters 0-dim
            int64 tensors, all on one device where the kernels run.
    """
    stats = {"batch_mean": batch_mean, "batch_var": batch_var, "running_mean": running_mean, "running_var": running_var}
    tensors = _checked_commit("commit_batch_stats", stats, num_batches_tracked, num_nonfinite_batches)
    c = running_mean.numel()
    hi = 0.0 if momentum is None else float(np.float32(momentum))
    lo = 0.0 if momentum is None else float(momentum) - hi  # what float32 drops of it: kept for float64 statistics
    _commit_batch_stats_kernel[(1,)](
        *tensors, c, hi, lo, CUMULATIVE=momentum is None, ACC=_tl_acc(running_mean.dtype), BLOCK=_commit_block(c)
    )  # fmt: skip


def frozen_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str | None = None,
) -> torch.Tensor:
    r"""Batch normalization with fixed statistics, one fused elementwise pass (see
    :func:`normlab.functional.frozen_batch_norm`).

    .. math:: y = \mathrm{act}\left(\frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}}
        \gamma + \beta\right)

    torch.nn.BatchNorm in eval mode (Ioffe & Szegedy, 2015, arXiv 1502.03167), as used by detection backbones
    (torchvision.ops.FrozenBatchNorm2d). Computed in float32 (float64 for float64 input); y has x's dtype and
    memory format. Gradients flow to x, weight and bias; weight and bias gradients cost one extra reduction pass
    and are computed only when asked for.

    Args:
        x: input (N, C, \*), on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
        running_mean, running_var: (C,) statistics. No gradient flows to them.
        weight, bias: optional (C,) scale and shift (None: 1 and 0).
        eps: added to the variance.
        act: fused activation after the affine: None, "relu" or "silu".

    Raises:
        ValueError: on an input with fewer than 2 dims, a per-channel tensor whose shape is not (C,), or an unknown
            ``act``.

    Note:
        There is no training mode: the statistics never come from the batch and are never updated.

    Example::

        x = torch.randn(2, 64, 56, 56, device="cuda", dtype=torch.bfloat16)
        y = frozen_batch_norm(x, running_mean, running_var, weight, bias, act="relu")
    """
    code = act_code("frozen_batch_norm", act)
    check_kernel_input(
        "frozen_batch_norm", x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    return _affine(flat(x).tensor, running_mean, running_var, weight, bias, float(eps), code)
