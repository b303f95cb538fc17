"""Fused Triton kernels for the per-sample group-statistics family: group norm, instance norm, layer norm over
(C, *), RMS norm over (C, *) and EvoNorm-S0.

Every member normalizes each sample n over a group of ``CG = C / G`` consecutive channels and all S positions, then
applies a per-channel affine and optionally a fused activation (ReLU or SiLU):

================  ======  =====================================================================================
op                G       per-element pre-activation z (``rstd = 1 / sqrt(var_{n,g} + eps)``)
================  ======  =====================================================================================
group_norm        G       (x - mean) rstd w + b
instance_norm     C       (x - mean) rstd w + b; in eval the running statistics stand for mean/var (an affine)
layer_norm        1       (x - mean) rstd w + b
rms_norm          1       x rstd w, with var replaced by the mean of squares (mean taken as 0)
evonorm_s0        G       x sigmoid(v x) rstd w + b (v=None: group norm)
================  ======  =====================================================================================

LayerNorm and RMSNorm of an (N, C) input (transformer rows, no positions) run the per-position kernels of
:mod:`normlab.kernels.channel_norm` instead, which take tiles of whole rows.

One set of kernels serves all five; constexpr flags select the variant (RMS statistics, the sigmoid GATE, the
CENTER term of the input gradient, the activation ACT, present parameters, the layout).

Organization. A program owns sample n, a split k of the positions (``span`` consecutive positions, so that
``N * splits * group_blocks`` is about twice the SM count) and a block of whole groups. It walks its positions in
tiles ``[BLOCK_S, BLOCK_G, BLOCK_CG]`` (positions x groups x channels of a group); channels are the contiguous axis
for channels_last inputs (a tile spans up to 512 channels, e.g. all 256 of a ResNet stage: 32 groups of 8) and
positions for NCHW inputs (a tile spans up to 1024 positions of a few channels). Groups wider than BLOCK_CG are
walked in channel chunks. NCHW rows whose length is not a multiple of 16 positions get their power-of-2 factor as a
constexpr (S_DIV, see ``_triton_utils.with_factor``), so that they load the widest vectors their alignment allows.
Channels-last groups of 2 or 4 channels (GroupNorm(32) over 64 or 128 channels) are loaded and stored as
[BLOCK_S, BLOCK_G * BLOCK_CG] rows of contiguous channels and reshaped to the 3-D tile in registers (the ROWS flag):
Triton vectorizes memory accesses along a tile's innermost axis only, and along an axis of 2 channels the accesses
were 4-byte scalars (compiled for sm_90: 16-byte vectors with ROWS, no shared-memory round-trip in the loops).

Forward (3 launches; 2 when one split covers all positions, or when few splits let the normalizing kernel merge
them, ``_FUSE_SPLITS``):
  1. ``_stats_kernel``: per-lane Welford over the program's positions (no reduction inside the loop), merged per
     group with Chan's formula into (mean, M2) partials in an fp32 workspace (2, N * splits, G);
  2. ``_merge_stats_kernel``: Chan's formula over the splits -> mean, var (N, G);
  3. ``_normalize_kernel``: y = act(z) (with FUSED_MERGE it does step 2 itself first).
  Traffic: x read twice, y written once; the workspace is N * splits * G * 8 bytes.

Backward (3 launches plus one torch.sum; 2 when few splits let the dx kernel do step 2):
  1. ``_bwd_reduce_kernel``: per-channel partial sums over the program's positions of dz * xhat and dz (and the
     EvoNorm v term), dz the gradient of z (the activation's gradient recomputed from x), in (parts, C, N * splits);
  2. ``_bwd_group_sums_kernel``: per (n, g) means c1 = E_g[dz w] and c2 = E_g[dz w xhat] from those partials;
     weight / bias / v gradients are one deterministic torch.sum of the same partials over (n, split), along their
     contiguous last dimension;
  3. ``_bwd_dx_kernel``: dx = rstd (dz w h' - c1 - (x - mean) rstd c2) (h' the gate's derivative, 1 without it;
     c1 only where the mean is subtracted; with FUSED_SUMS it does step 2 itself first).
  Traffic: x and dy read twice, dx written once. Only (mean, var) per (n, g) are saved for the backward.

Statistics accumulate in float32 (float64 for float64 input); the output has x's dtype and layout. The ops are
registered as ``normlab::group_stats_norm`` and ``normlab::group_stats_norm_backward`` (torch.library custom ops
with fake and autograd registrations), so torch.compile(fullgraph=True) traces through them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..functional._checks import check_divides, check_input, check_positive_int, check_spatial_has_values
from ..functional._stats import accumulation_dtype
from ..functional.batch_norm import update_running_stats
from . import channel_norm
from ._triton_utils import (
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
    pow2_factor,
    sm_count,
    traced,
    with_factor,
)

__all__ = ["Blocks", "blocks", "group_norm", "instance_norm", "layer_norm", "rms_norm", "evonorm_s0"]


# ---- launch configuration (tuned on an H100 with benchmarks/gpu_tune.py) -----------------------------------------

_TILE = 4096
"""Elements a program loads per loop step of the main kernels."""
_TILE_CHANNELS = 512
"""channels_last: channels one tile spans (whole groups)."""
_TILE_POSITIONS = 1024
"""NCHW: positions one tile spans."""
_PROGRAMS_PER_SM = 2
"""Programs per SM the position splits aim for. Measured on an H100 (benchmarks/gpu_tune.py, CUDA-graph times of
forward+backward at (32, 256, 56, 56) bf16): 2 instead of 4 made channels-last GroupNorm 15% and InstanceNorm 14%
faster, and changed the other cases by at most 3%."""
_SM_COUNT_WITHOUT_CUDA = 132
"""The H100's SM count, so that the interpreter on CPU runs the same launch configuration as the GPU would."""
_NUM_WARPS = 8
"""Warps of the main kernels for channels-last inputs (a 4096-element tile is 16 values a thread)."""
_NUM_WARPS_NCHW = 4
"""Warps of the main kernels for NCHW inputs: 4 made NCHW GroupNorm 13% faster than 8 on an H100 (bf16; fp32 3%)."""
_STAGE2_TILE = 4096
"""Elements a second-stage program (merging the per-split partials) loads per step."""
_STAGE2_CHANNELS = 64
"""Channels a second-stage program covers: small, so that the (N, G / groups-per-program) grid has many programs."""
_FUSE_SPLITS = 16
"""At most this many position splits per sample, the normalizing and dx kernels merge the splits' partials
themselves (the statistics, the gradient's group terms) instead of a launch of its own doing it first: one launch
fewer in the forward and in the backward at batch sizes that need few splits. The partials are small and read from
L2. 0 never fuses (tests force either way; ``benchmarks/gpu_tune.py`` times 0 against this). On an H100 (run 4,
CUDA-graph times of forward+backward at (32, 256, 56, 56) bf16) fusing was 0.9% faster for channels-last GroupNorm
and 1.6% for NCHW, and 3.7% slower for InstanceNorm; it also saves a launch's host time in eager calls."""
_FUSED_TILE = 1024
"""Values per loop step of the partials a fusing main kernel merges (see ``_cached_plan``)."""
_FUSE_READS = 16
"""...and only where the partials each program then reads, about 2 splits^2 values per position of a sample's
group, are at most 2 / _FUSE_READS of the tensor's values (1/8). 0 drops this condition."""


@dataclass(frozen=True)
class Blocks:
    """Launch configuration of the main kernels: tile sizes, position splits and warps.

    A program covers positions ``[k * span, min((k + 1) * span, S))`` of one sample for ``block_g`` groups;
    ``splits = ceil(S / span)``.
    """

    block_s: int
    block_g: int
    block_cg: int
    splits: int
    span: int
    num_warps: int
    rows: bool = False
    """Channels-last tiles of whole groups of 2-4 channels, loaded and stored as rows of contiguous channels (the
    kernels' ROWS flag, see ``_load_tile``)."""


@functools.lru_cache(maxsize=4096)
def blocks(n: int, groups: int, group_size: int, positions: int, channels_last: bool, sm_count: int) -> Blocks:
    """The :class:`Blocks` for an input of n samples, ``groups`` groups of ``group_size`` channels and ``positions``
    positions per channel. Tests replace this function to force loops and splits on small shapes."""
    np2 = next_power_of_2
    block_cg = min(np2(group_size), _TILE)
    if channels_last:
        block_g = min(np2(groups), max(1, _TILE_CHANNELS // block_cg))
        block_s = min(np2(positions), max(1, _TILE // (block_g * block_cg)))
    else:
        block_s = min(np2(positions), _TILE_POSITIONS)
        block_cg = min(block_cg, max(1, _TILE // block_s))
        block_g = min(np2(groups), max(1, _TILE // (block_s * block_cg)))
    tiles = cdiv(positions, block_s)
    wanted = cdiv(_PROGRAMS_PER_SM * sm_count, n * cdiv(groups, block_g))
    span = max(1, tiles // wanted) * block_s
    # NCHW rows of a position count not divisible by 4 load (nearly) element by element, each with its own address: 4
    # warps then spilled registers on sm_90 (the dx kernel at (1, 512, 7, 7) InstanceNorm: 255 registers, 88-128 bytes)
    warps = _NUM_WARPS if channels_last or positions % 4 else _NUM_WARPS_NCHW
    rows = channels_last and block_cg == group_size and 1 < group_size < 8
    return Blocks(block_s, block_g, block_cg, cdiv(positions, span), span, warps, rows)


@functools.lru_cache(maxsize=4096)
def _stage2_blocks(splits: int, groups: int, group_size: int) -> tuple[int, int, int]:
    """(block_k, block_g, block_cg) of the kernels that reduce the per-split partials (split x group x channel)."""
    np2 = next_power_of_2
    block_cg = min(np2(group_size), _STAGE2_CHANNELS)
    block_g = min(np2(groups), max(1, _STAGE2_CHANNELS // block_cg))
    block_k = min(np2(splits), max(1, _STAGE2_TILE // (block_g * block_cg)))
    return block_k, block_g, block_cg


# ---- Triton helpers -----------------------------------------------------------------------------------------------


@triton.jit
def _program(splits, span, S, BLOCK_G: tl.constexpr):
    """(row = n * splits + k, n, first position, end position, group indices) of this program."""
    row = tl.program_id(0)
    n = row // splits
    s_lo = (row % splits) * span
    s_hi = tl.minimum(s_lo + span, S)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    return row, n, s_lo, s_hi, groups


@triton.jit
def _tile_offsets(s, chan, S, C, CHANNELS_LAST: tl.constexpr):
    """Offsets within a sample of positions ``s`` [BS] x channels ``chan`` [BG, BCG] -> [BS, BG, BCG]."""
    if CHANNELS_LAST:
        offs = s[:, None, None] * C + chan[None, :, :]
    else:
        offs = chan[None, :, :] * S + s[:, None, None]
    return offs


@triton.jit
def _row_tile(s, s_hi, C, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    """ROWS layout (channels-last, whole narrow groups): offsets within a sample and mask of the tile as
    [BLOCK_S, BLOCK_G * BLOCK_CG] rows of contiguous channels."""
    chan = tl.program_id(1) * (BLOCK_G * BLOCK_CG) + tl.arange(0, BLOCK_G * BLOCK_CG)
    offs = s[:, None] * C + chan[None, :]
    mask = (s < s_hi)[:, None] & (chan < C)[None, :]
    return offs, mask


@triton.jit
def _load_tile(ptr, offs, mask, s, s_hi, C, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
               BLOCK_CG: tl.constexpr):  # fmt: skip
    """The [BLOCK_S, BLOCK_G, BLOCK_CG] tile at ``offs`` (``mask``). ROWS loads it as rows of contiguous channels,
    then splits the channels into groups: a group of 2 or 4 channels is too narrow for vector loads along its own
    axis (Triton vectorizes along the innermost axis of the tile only). Without ROWS, GroupNorm over groups of 2
    channels ran 4x slower than over groups of 8 on an H100, with 4-byte loads where 8 channels get 16-byte ones."""
    if ROWS:
        row_offs, row_mask = _row_tile(s, s_hi, C, BLOCK_S, BLOCK_G, BLOCK_CG)
        t = tl.reshape(tl.load(ptr + row_offs, mask=row_mask, other=0.0), (BLOCK_S, BLOCK_G, BLOCK_CG))
    else:
        t = tl.load(ptr + offs, mask=mask, other=0.0)
    return t


@triton.jit
def _store_tile(ptr, offs, mask, value, s, s_hi, C, ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):  # fmt: skip
    """Store a [BLOCK_S, BLOCK_G, BLOCK_CG] tile, as :func:`_load_tile` loads it."""
    if ROWS:
        row_offs, row_mask = _row_tile(s, s_hi, C, BLOCK_S, BLOCK_G, BLOCK_CG)
        tl.store(ptr + row_offs, tl.reshape(value, (BLOCK_S, BLOCK_G * BLOCK_CG)), mask=row_mask)
    else:
        tl.store(ptr + offs, value, mask=mask)


@triton.jit
def _channel_param(ptr, chan, mask, PRESENT: tl.constexpr, default, dtype: tl.constexpr):
    """A per-channel parameter at ``chan`` as ``dtype``, or ``default`` everywhere when the parameter is absent."""
    if PRESENT:
        p = tl.load(ptr + chan, mask=mask, other=default).to(dtype)
    else:
        p = tl.full(chan.shape, default, dtype)
    return p


@triton.jit
def _group_stats(mean_ptr, var_ptr, n, stat_stride_n, groups, g_ok, eps):
    """(mean, rstd) of this program's groups (per channel given ``stat_stride_n`` 0 and running statistics)."""
    mean = tl.load(mean_ptr + n * stat_stride_n + groups, mask=g_ok, other=0.0)
    rstd = tl.rsqrt(tl.load(var_ptr + n * stat_stride_n + groups, mask=g_ok, other=1.0) + eps)
    return mean, rstd


@triton.jit
def _chunk(groups, g_ok, c0, CG: tl.constexpr, BLOCK_CG: tl.constexpr):
    """(mask, channel indices) [BLOCK_G, BLOCK_CG] of channels ``c0 ..`` of each group."""
    cg = c0 + tl.arange(0, BLOCK_CG)
    return g_ok[:, None] & (cg < CG)[None, :], groups[:, None] * CG + cg[None, :]


@triton.jit
def _chunk_params(w_ptr, b_ptr, v_ptr, chan, c_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr, GATE: tl.constexpr,
                  dtype: tl.constexpr):  # fmt: skip
    """The weight (1 when absent), bias and v (0 when absent) of the chunk's channels."""
    w = _channel_param(w_ptr, chan, c_ok, HAS_W, 1.0, dtype)
    b = _channel_param(b_ptr, chan, c_ok, HAS_B, 0.0, dtype)
    v = _channel_param(v_ptr, chan, c_ok, GATE, 0.0, dtype)
    return w, b, v


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s parallel merge of two (count, mean, M2) summaries."""
    count = count_a + count_b
    delta = mean_b - mean_a
    frac = count_b / tl.maximum(count, 1.0)
    return count, mean_a + delta * frac, m2_a + m2_b + delta * delta * count_a * frac


@triton.jit
def _finalize(mean, var, RMS: tl.constexpr):
    """The (mean, var) the normalization uses: RMS norm subtracts nothing and divides by the mean square."""
    if RMS:
        var = var + mean * mean
        mean = mean * 0.0
    return mean, var


# ---- forward kernels ----------------------------------------------------------------------------------------------


@triton.jit
def _stats_kernel(
    x_ptr,
    out_mean_ptr,
    out_b_ptr,
    S,
    C,
    G,
    splits,
    span,
    stride_n,
    CG: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FINAL: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    ROWS: tl.constexpr,
    S_DIV: tl.constexpr,
):
    """(mean, M2) of each group over this program's positions; with FINAL (one split) the finished (mean, var)."""
    S = with_factor(S, S_DIV)
    acc: tl.constexpr = out_mean_ptr.dtype.element_ty
    row, n, s_lo, s_hi, groups = _program(splits, span, S, BLOCK_G)
    g_ok = groups < G
    x_base = x_ptr + n.to(tl.int64) * stride_n
    count = tl.zeros([BLOCK_G], acc)
    mean = tl.zeros([BLOCK_G], acc)
    m2 = tl.zeros([BLOCK_G], acc)
    for c0 in range(0, CG, BLOCK_CG):
        c_ok, chan = _chunk(groups, g_ok, c0, CG, BLOCK_CG)
        # Welford per tile lane: the loop body is elementwise; lanes are merged once per channel chunk.
        lane_count = tl.zeros([BLOCK_S], acc)
        lane_mean = tl.zeros([BLOCK_S, BLOCK_G, BLOCK_CG], acc)
        lane_m2 = tl.zeros([BLOCK_S, BLOCK_G, BLOCK_CG], acc)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < s_hi
            mask = s_ok[:, None, None] & c_ok[None, :, :]
            offs = _tile_offsets(s, chan, S, C, CHANNELS_LAST)
            x = _load_tile(x_base, offs, mask, s, s_hi, C, ROWS, BLOCK_S, BLOCK_G, BLOCK_CG).to(acc)
            lane_count += s_ok.to(acc)
            inv_count = 1.0 / tl.maximum(lane_count, 1.0)
            delta = tl.where(mask, x - lane_mean, 0.0)
            lane_mean += delta * inv_count[:, None, None]
            lane_m2 += delta * (x - lane_mean)
        lane_weight = tl.where(c_ok[None, :, :], lane_count[:, None, None], 0.0)
        chunk_count = tl.sum(tl.sum(lane_weight, 2), 0)
        chunk_mean = tl.sum(tl.sum(lane_weight * lane_mean, 2), 0) / tl.maximum(chunk_count, 1.0)
        dev = lane_mean - chunk_mean[None, :, None]
        chunk_m2 = tl.sum(tl.sum(lane_m2 + lane_weight * dev * dev, 2), 0)
        count, mean, m2 = _chan_merge(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    if FINAL:
        mean, m2 = _finalize(mean, m2 / tl.maximum(count, 1.0), RMS)
    tl.store(out_mean_ptr + row * G + groups, mean, mask=g_ok)
    tl.store(out_b_ptr + row * G + groups, m2, mask=g_ok)


@triton.jit
def _merged_stats(part_mean_ptr, part_m2_ptr, n, groups, g_ok, S, G, splits, span, CG: tl.constexpr,
                  RMS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, acc: tl.constexpr):  # fmt: skip
    """(mean, var) [BLOCK_G] of sample n's ``groups`` from the (mean, M2) partials of its splits, by Chan's formula
    one block of splits at a time."""
    count = tl.zeros([BLOCK_G], acc)
    mean = tl.zeros([BLOCK_G], acc)
    m2 = tl.zeros([BLOCK_G], acc)
    for k0 in range(0, splits, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = (ks < splits)[:, None] & g_ok[None, :]
        idx = (n * splits + ks)[:, None] * G + groups[None, :]
        part_mean = tl.load(part_mean_ptr + idx, mask=mask, other=0.0)
        part_m2 = tl.load(part_m2_ptr + idx, mask=mask, other=0.0)
        part_count = tl.where(mask, (tl.minimum(S - ks * span, span) * CG).to(acc)[:, None], 0.0)
        block_count = tl.sum(part_count, 0)
        block_mean = tl.sum(part_count * part_mean, 0) / tl.maximum(block_count, 1.0)
        dev = part_mean - block_mean[None, :]
        block_m2 = tl.sum(part_m2 + part_count * dev * dev, 0)
        count, mean, m2 = _chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    return _finalize(mean, m2 / tl.maximum(count, 1.0), RMS)


@triton.jit
def _merge_stats_kernel(
    part_mean_ptr,
    part_m2_ptr,
    mean_ptr,
    var_ptr,
    S,
    G,
    splits,
    span,
    CG: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """mean, var (N, G) from the (mean, M2) partials of the splits (:func:`_merged_stats`)."""
    acc: tl.constexpr = mean_ptr.dtype.element_ty
    n = tl.program_id(0)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = groups < G
    mean, var = _merged_stats(part_mean_ptr, part_m2_ptr, n, groups, g_ok, S, G, splits, span, CG, RMS, BLOCK_K,
                              BLOCK_G, acc)  # fmt: skip
    tl.store(mean_ptr + n * G + groups, mean, mask=g_ok)
    tl.store(var_ptr + n * G + groups, var, mask=g_ok)


@triton.jit
def _normalize_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    v_ptr,
    mean_ptr,
    var_ptr,
    part_mean_ptr,
    part_m2_ptr,
    eps,
    S,
    C,
    G,
    splits,
    span,
    stride_n,
    stat_stride_n,
    CG: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    GATE: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    ROWS: tl.constexpr,
    S_DIV: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = act(xhat w + b) for this program's positions and groups. FUSED_MERGE: the statistics come from merging the
    splits' partials here (:func:`_merged_stats`, in place of a merge launch), and each sample's first split writes
    them to mean / var for the backward."""
    S = with_factor(S, S_DIV)
    acc: tl.constexpr = mean_ptr.dtype.element_ty
    row, n, s_lo, s_hi, groups = _program(splits, span, S, BLOCK_G)
    g_ok = groups < G
    if FUSED_MERGE:
        mean, var = _merged_stats(part_mean_ptr, part_m2_ptr, n, groups, g_ok, S, G, splits, span, CG, RMS, BLOCK_K,
                                  BLOCK_G, acc)  # fmt: skip
        if row % splits == 0:  # the sample's first split keeps the statistics for the backward
            tl.store(mean_ptr + n * G + groups, mean, mask=g_ok)
            tl.store(var_ptr + n * G + groups, var, mask=g_ok)
        rstd = tl.rsqrt(var + eps)
    else:
        mean, rstd = _group_stats(mean_ptr, var_ptr, n, stat_stride_n, groups, g_ok, eps)
    base = n.to(tl.int64) * stride_n
    for c0 in range(0, CG, BLOCK_CG):
        c_ok, chan = _chunk(groups, g_ok, c0, CG, BLOCK_CG)
        w, b, v = _chunk_params(w_ptr, b_ptr, v_ptr, chan, c_ok, HAS_W, HAS_B, GATE, acc)
        scale = (rstd[:, None] * w)[None, :, :]
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < s_hi)[:, None, None] & c_ok[None, :, :]
            offs = _tile_offsets(s, chan, S, C, CHANNELS_LAST)
            x = _load_tile(x_ptr + base, offs, mask, s, s_hi, C, ROWS, BLOCK_S, BLOCK_G, BLOCK_CG).to(acc)
            if GATE:
                u = x * tl.sigmoid(v[None, :, :] * x)
            else:
                u = x - mean[None, :, None]
            y = activation(u * scale + b[None, :, :], ACT)
            _store_tile(
                y_ptr + base, offs, mask, y.to(y_ptr.dtype.element_ty), s, s_hi, C, ROWS, BLOCK_S, BLOCK_G, BLOCK_CG
            )


# ---- backward kernels ---------------------------------------------------------------------------------------------


@triton.jit
def _bwd_reduce_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    v_ptr,
    mean_ptr,
    var_ptr,
    part_ptr,
    eps,
    S,
    C,
    G,
    splits,
    span,
    stride_n,
    stat_stride_n,
    part_stride,
    CG: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    GATE: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    ROWS: tl.constexpr,
    S_DIV: tl.constexpr,
):
    """Per-channel sums over this program's positions of dz xhat, dz and (GATE) dz dz/dv, into row n * splits + k."""
    S = with_factor(S, S_DIV)
    acc: tl.constexpr = mean_ptr.dtype.element_ty
    row, n, s_lo, s_hi, groups = _program(splits, span, S, BLOCK_G)
    g_ok = groups < G
    mean, rstd = _group_stats(mean_ptr, var_ptr, n, stat_stride_n, groups, g_ok, eps)
    base = n.to(tl.int64) * stride_n
    for c0 in range(0, CG, BLOCK_CG):
        c_ok, chan = _chunk(groups, g_ok, c0, CG, BLOCK_CG)
        w, b, v = _chunk_params(w_ptr, b_ptr, v_ptr, chan, c_ok, HAS_W, HAS_B, GATE, acc)
        sum_a = tl.zeros([BLOCK_S, BLOCK_G, BLOCK_CG], acc)
        sum_b = tl.zeros([BLOCK_S, BLOCK_G, BLOCK_CG], acc)
        sum_v = tl.zeros([BLOCK_S, BLOCK_G, BLOCK_CG], acc)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < s_hi)[:, None, None] & c_ok[None, :, :]
            offs = _tile_offsets(s, chan, S, C, CHANNELS_LAST)
            x = _load_tile(x_ptr + base, offs, mask, s, s_hi, C, ROWS, BLOCK_S, BLOCK_G, BLOCK_CG).to(acc)
            dy = _load_tile(dy_ptr + base, offs, mask, s, s_hi, C, ROWS, BLOCK_S, BLOCK_G, BLOCK_CG).to(acc)
            if GATE:
                sig = tl.sigmoid(v[None, :, :] * x)
                xhat = x * sig * rstd[None, :, None]
            else:
                xhat = (x - mean[None, :, None]) * rstd[None, :, None]
            dz = activation_grad(dy, xhat * w[None, :, :] + b[None, :, :], ACT)
            sum_a += dz * xhat
            sum_b += dz
            if GATE:
                sum_v += dz * x * x * sig * (1.0 - sig)
        # partials are stored channel-major, (parts, C, N * splits): torch's sum over their last, contiguous dim (the
        # parameter gradients) is then several times faster than over a middle dim (21 us, 8% of GroupNorm's GPU
        # time at (32, 256, 56, 56) on an H100, where (parts, N * splits, C) had few threads per output)
        out = part_ptr + chan * (part_stride // C) + row
        tl.store(out, tl.sum(sum_a, 0), mask=c_ok)
        tl.store(out + part_stride, tl.sum(sum_b, 0), mask=c_ok)
        if GATE:
            tl.store(out + 2 * part_stride, tl.sum(sum_v, 0) * w * rstd[:, None], mask=c_ok)


@triton.jit
def _group_grad_sums(part_ptr, w_ptr, part_stride, n, groups, g_ok, C, splits, inv_count, CG: tl.constexpr,
                     HAS_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
                     acc: tl.constexpr):  # fmt: skip
    """(c1, c2) [BLOCK_G] = (E_g[dz w], E_g[dz w xhat]) of sample n's ``groups`` from the per-channel partials of
    every split (``part`` (parts, C, N * splits): dz xhat, then dz at ``part_stride``; sample n's splits are
    contiguous in a channel's row, the tile's innermost axis)."""
    rows = part_stride // C
    sum_a = tl.zeros([BLOCK_G], acc)
    sum_b = tl.zeros([BLOCK_G], acc)
    for c0 in range(0, CG, BLOCK_CG):
        c_ok, chan = _chunk(groups, g_ok, c0, CG, BLOCK_CG)
        total_a = tl.zeros([BLOCK_G, BLOCK_CG], acc)
        total_b = tl.zeros([BLOCK_G, BLOCK_CG], acc)
        for k0 in range(0, splits, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = c_ok[:, :, None] & (ks < splits)[None, None, :]
            idx = chan[:, :, None] * rows + (n * splits + ks)[None, None, :]
            total_a += tl.sum(tl.load(part_ptr + idx, mask=mask, other=0.0), 2)
            total_b += tl.sum(tl.load(part_ptr + part_stride + idx, mask=mask, other=0.0), 2)
        w = _channel_param(w_ptr, chan, c_ok, HAS_W, 1.0, acc)
        sum_a += tl.sum(total_a * w, 1)
        sum_b += tl.sum(total_b * w, 1)
    return sum_b * inv_count, sum_a * inv_count


@triton.jit
def _bwd_group_sums_kernel(
    part_ptr,
    w_ptr,
    c1_ptr,
    c2_ptr,
    part_stride,
    C,
    G,
    splits,
    inv_count,
    CG: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    """c1, c2 (N, G) of :func:`_group_grad_sums`, stored for the dx kernel."""
    acc: tl.constexpr = c1_ptr.dtype.element_ty
    n = tl.program_id(0)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = groups < G
    c1, c2 = _group_grad_sums(part_ptr, w_ptr, part_stride, n, groups, g_ok, C, splits, inv_count, CG, HAS_W,
                              BLOCK_K, BLOCK_G, BLOCK_CG, acc)  # fmt: skip
    tl.store(c1_ptr + n * G + groups, c1, mask=g_ok)
    tl.store(c2_ptr + n * G + groups, c2, mask=g_ok)


@triton.jit
def _bwd_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    b_ptr,
    v_ptr,
    mean_ptr,
    var_ptr,
    c1_ptr,
    c2_ptr,
    part_ptr,
    eps,
    S,
    C,
    G,
    splits,
    span,
    stride_n,
    stat_stride_n,
    part_stride,
    inv_count,
    CG: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    GATE: tl.constexpr,
    CENTER: tl.constexpr,
    STATS_GRAD: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    ROWS: tl.constexpr,
    S_DIV: tl.constexpr,
    FUSED_SUMS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_CG_SUMS: tl.constexpr,
):
    """dx = rstd (dz w h' - c1 - (x - mean) rstd c2); without STATS_GRAD (fixed statistics) dx = rstd dz w h'.
    FUSED_SUMS: c1 and c2 come from the partials here (:func:`_group_grad_sums`, in place of a launch of their own)."""
    S = with_factor(S, S_DIV)
    acc: tl.constexpr = mean_ptr.dtype.element_ty
    row, n, s_lo, s_hi, groups = _program(splits, span, S, BLOCK_G)
    g_ok = groups < G
    mean, rstd = _group_stats(mean_ptr, var_ptr, n, stat_stride_n, groups, g_ok, eps)
    mean, rstd = mean[None, :, None], rstd[None, :, None]
    if STATS_GRAD:
        if FUSED_SUMS:
            c1, c2 = _group_grad_sums(part_ptr, w_ptr, part_stride, n, groups, g_ok, C, splits, inv_count, CG, HAS_W,
                                      BLOCK_K, BLOCK_G, BLOCK_CG_SUMS, acc)  # fmt: skip
            c1, c2 = c1[None, :, None], c2[None, :, None]
        else:
            c2 = tl.load(c2_ptr + n * G + groups, mask=g_ok, other=0.0)[None, :, None]
            if CENTER:
                c1 = tl.load(c1_ptr + n * G + groups, mask=g_ok, other=0.0)[None, :, None]
    base = n.to(tl.int64) * stride_n
    for c0 in range(0, CG, BLOCK_CG):
        c_ok, chan = _chunk(groups, g_ok, c0, CG, BLOCK_CG)
        w, b, v = _chunk_params(w_ptr, b_ptr, v_ptr, chan, c_ok, HAS_W, HAS_B, GATE, acc)
        w, b, v = w[None, :, :], b[None, :, :], v[None, :, :]
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < s_hi)[:, None, None] & c_ok[None, :, :]
            offs = _tile_offsets(s, chan, S, C, CHANNELS_LAST)
            x = _load_tile(x_ptr + base, offs, mask, s, s_hi, C, ROWS, BLOCK_S, BLOCK_G, BLOCK_CG).to(acc)
            dy = _load_tile(dy_ptr + base, offs, mask, s, s_hi, C, ROWS, BLOCK_S, BLOCK_G, BLOCK_CG).to(acc)
            if GATE:
                sig = tl.sigmoid(v * x)
                xhat = x * sig * rstd
            else:
                xhat = (x - mean) * rstd
            grad = activation_grad(dy, xhat * w + b, ACT) * w
            if GATE:
                grad = grad * (sig + v * x * sig * (1.0 - sig))
            if STATS_GRAD:
                grad -= (x - mean) * rstd * c2
                if CENTER:
                    grad -= c1
            _store_tile(
                dx_ptr + base,
                offs,
                mask,
                (grad * rstd).to(dx_ptr.dtype.element_ty),
                s,
                s_hi,
                C,
                ROWS,
                BLOCK_S,
                BLOCK_G,
                BLOCK_CG,
            )


# ---- host launchers -----------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """What the launches of one call need besides its tensors and eps, for one input signature (:func:`_plan`):
    grids, runtime sizes and the constexpr keyword arguments of each kernel, built once and reused, so that a call
    spends its host time on launching and not on working out the same configuration again."""

    cfg: Blocks
    grid: tuple[int, int]
    sizes: tuple[int, ...]
    """(S, C, G, splits, span, stride_n), the main kernels' runtime sizes."""
    stat_stride: int
    """Row stride of the (N, G) statistics; 0 for given per-channel statistics (one row)."""
    stats: dict
    merge: tuple[tuple[int, int], dict] | None
    """(grid, keywords) of the launch that merges per-split partial statistics; None when each program covers a
    whole sample, or when the normalizing kernel merges them itself (``normalize["FUSED_MERGE"]``)."""
    normalize: dict
    reduce: dict
    group_sums: tuple[tuple[int, int], dict] | None
    """(grid, keywords) of the launch that sums the gradient's group terms; None when the dx kernel sums them
    itself (``dx["FUSED_SUMS"]``) or the statistics are given (no such terms)."""
    dx: dict


def _plan(f, groups: int, device: torch.device, has_w, has_b, gate, center, act, given_stats) -> _Plan:
    """The :class:`_Plan` of a call on ``f`` (a :class:`Flat`) in ``groups`` groups with these parameter flags."""
    sm = sm_count(device, _SM_COUNT_WITHOUT_CUDA)
    tuning = (blocks, _FUSE_SPLITS, _FUSE_READS)  # tests replace these: part of the key
    return _cached_plan(
        tuning, f.n, f.c, f.s, f.channels_last, groups, sm, has_w, has_b, gate, center, act, given_stats
    )


def _fuses(splits: int, positions: int) -> bool:
    """Whether a kernel over ``positions`` positions per program row should merge the ``splits`` partials of its
    sample itself rather than leave them to a launch of its own (:data:`_FUSE_SPLITS`, :data:`_FUSE_READS`)."""
    return splits <= _FUSE_SPLITS and _FUSE_READS * splits * splits <= positions


@functools.lru_cache(maxsize=4096)
def _cached_plan(tuning, n, c, s, channels_last, g, sm, has_w, has_b, gate, center, act, given_stats) -> _Plan:
    choose_blocks = tuning[0]
    cg = c // g
    cfg = choose_blocks(n, g, cg, s, channels_last, sm)
    tiles = dict(
        CG=cg, CHANNELS_LAST=channels_last, BLOCK_S=cfg.block_s, BLOCK_G=cfg.block_g, BLOCK_CG=cfg.block_cg,
        ROWS=cfg.rows, S_DIV=pow2_factor(s), num_warps=cfg.num_warps,
    )  # fmt: skip
    params = dict(HAS_W=has_w, HAS_B=has_b, GATE=gate)
    rms = not center and not gate
    # the fused merges' tiles ([BLOCK_K, BLOCK_G] partial statistics, [BLOCK_K, BLOCK_G, BLOCK_CG_SUMS] gradient
    # partials) hold at most _FUSED_TILE values, looping over the splits in blocks of BLOCK_K: the main kernels'
    # registers stay near those of their unfused versions
    block_k = min(next_power_of_2(cfg.splits), max(1, _FUSED_TILE // cfg.block_g))
    block_cg_sums = min(next_power_of_2(cg), max(1, _FUSED_TILE // (block_k * cfg.block_g)))
    fused_merge = cfg.splits > 1 and not given_stats and _fuses(cfg.splits, cg * s)
    merge = None
    if cfg.splits > 1 and not fused_merge:
        merge_k, merge_g, _ = _stage2_blocks(cfg.splits, g, 1)
        merge = ((n, cdiv(g, merge_g)), dict(CG=cg, RMS=rms, BLOCK_K=merge_k, BLOCK_G=merge_g, num_warps=4))
    fused_sums = not given_stats and _fuses(cfg.splits, s)
    group_sums = None
    if not given_stats and not fused_sums:
        sums_k, sums_g, sums_cg = _stage2_blocks(cfg.splits, g, cg)
        kw = dict(CG=cg, HAS_W=has_w, BLOCK_K=sums_k, BLOCK_G=sums_g, BLOCK_CG=sums_cg, num_warps=4)
        group_sums = ((n, cdiv(g, sums_g)), kw)
    return _Plan(
        cfg=cfg,
        grid=(n * cfg.splits, cdiv(g, cfg.block_g)),
        sizes=(s, c, g, cfg.splits, cfg.span, c * s),
        stat_stride=0 if given_stats else g,
        stats=dict(FINAL=cfg.splits == 1, RMS=rms, **tiles),
        merge=merge,
        normalize=dict(ACT=act, FUSED_MERGE=fused_merge, RMS=rms, BLOCK_K=block_k, **params, **tiles),
        reduce=dict(ACT=act, **params, **tiles),
        group_sums=group_sums,
        dx=dict(
            CENTER=center and not gate,
            STATS_GRAD=not given_stats,
            ACT=act,
            FUSED_SUMS=fused_sums,
            BLOCK_K=block_k,
            BLOCK_CG_SUMS=block_cg_sums,
            **params,
            **tiles,
        ),  # fmt: skip
    )


@on_input_device
def _forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    mean_in: torch.Tensor | None,
    var_in: torch.Tensor | None,
    num_groups: int,
    eps: float,
    center: bool,
    act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f = flat(x)
    acc = accumulation_dtype(x.dtype)
    y = torch.empty_like(f.tensor)
    g = num_groups
    if mean_in is not None:
        mean, var = mean_in.to(acc, copy=True).reshape(1, g), var_in.to(acc, copy=True).reshape(1, g)
    else:
        mean = torch.empty((f.n, g), dtype=acc, device=x.device)
        var = torch.empty_like(mean)  # not a view of one buffer with mean: a custom op's outputs may not alias
    if x.numel() == 0:
        if mean_in is None:  # no values: undefined statistics, as torch gives
            mean.fill_(math.nan), var.fill_(math.nan)
        return y, mean, var
    p = _plan(f, g, x.device, weight is not None, bias is not None, v is not None, center, act, mean_in is not None)
    part_mean, part_m2 = mean, var  # read only where the partials are merged in the normalizing kernel
    if mean_in is None:
        if p.cfg.splits == 1:
            _stats_kernel[p.grid](f.tensor, mean, var, *p.sizes, **p.stats)
        else:
            part_mean, part_m2 = torch.empty((2, f.n * p.cfg.splits, g), dtype=acc, device=x.device).unbind(0)
            _stats_kernel[p.grid](f.tensor, part_mean, part_m2, *p.sizes, **p.stats)
            if p.merge is not None:
                grid, kw = p.merge
                _merge_stats_kernel[grid](part_mean, part_m2, mean, var, f.s, g, p.cfg.splits, p.cfg.span, **kw)
    _normalize_kernel[p.grid](
        f.tensor, y, weight, bias, v, mean, var, part_mean, part_m2, eps, *p.sizes, p.stat_stride, **p.normalize
    )  # fmt: skip
    return y, mean, var


@on_input_device
def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    num_groups: int,
    eps: float,
    center: bool,
    act: int,
    stats_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    f = flat(x)  # x was saved in the layout the forward ran on (flat's), so f.tensor is x
    if dy.stride() != f.tensor.stride():
        dy = torch.empty_like(f.tensor).copy_(dy)
    acc = mean.dtype
    g = num_groups
    parts = 2 if v is None else 3
    dx = torch.empty_like(f.tensor)
    if x.numel() == 0:
        return dx, torch.zeros((parts, f.c), dtype=acc, device=x.device)
    p = _plan(f, g, x.device, weight is not None, bias is not None, v is not None, center, act, not stats_grad)
    part = torch.empty((parts, f.c, f.n * p.cfg.splits), dtype=acc, device=x.device)  # channel-major
    _bwd_reduce_kernel[p.grid](
        f.tensor, dy, weight, bias, v, mean, var, part, eps, *p.sizes, p.stat_stride, part.stride(0), **p.reduce
    )  # fmt: skip
    c1, c2 = mean, var  # read only where a launch of their own sums the group terms
    inv_count = 1.0 / (f.c // g * f.s)
    if p.group_sums is not None:
        c1, c2 = torch.empty((2, f.n, g), dtype=acc, device=x.device).unbind(0)
        grid, kw = p.group_sums
        _bwd_group_sums_kernel[grid](part, weight, c1, c2, part.stride(0), f.c, g, p.cfg.splits, inv_count, **kw)
    _bwd_dx_kernel[p.grid](
        f.tensor, dy, dx, weight, bias, v, mean, var, c1, c2, part, eps, *p.sizes, p.stat_stride, part.stride(0),
        inv_count, **p.dx,
    )  # fmt: skip
    return dx, part.sum(2)


# ---- custom ops ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("normlab::group_stats_norm", mutates_args=())
def _group_stats_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    mean_in: torch.Tensor | None,
    var_in: torch.Tensor | None,
    num_groups: int,
    eps: float,
    center: bool,
    act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): the normalized output and the (N, G) statistics it used ((1, C) given ``mean_in``/``var_in``,
    which are then the per-channel statistics; x must be NCHW-contiguous or channels-last)."""
    return _forward(x, weight, bias, v, mean_in, var_in, num_groups, eps, center, act)


@_group_stats_norm.register_fake
def _(x, weight, bias, v, mean_in, var_in, num_groups, eps, center, act):
    rows = x.shape[0] if mean_in is None else 1
    stats = x.new_empty((rows, num_groups), dtype=accumulation_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("normlab::group_stats_norm_backward", mutates_args=())
def _group_stats_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    num_groups: int,
    eps: float,
    center: bool,
    act: int,
    stats_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, param_grads): param_grads (2 or 3, C) holds the weight, bias (and v) gradients in the statistics dtype."""
    return _backward(dy, x, weight, bias, v, mean, var, num_groups, eps, center, act, stats_grad)


@_group_stats_norm_backward.register_fake
def _(dy, x, weight, bias, v, mean, var, num_groups, eps, center, act, stats_grad):
    return torch.empty_like(x), mean.new_empty((2 if v is None else 3, x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, v, mean_in, _, num_groups, eps, center, act = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled gradients (two launches) for the statistics
    ctx.save_for_backward(x, weight, bias, v, mean, var)
    ctx.args = (num_groups, eps, center, act, mean_in is None)


def _autograd_backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, v, mean, var = ctx.saved_tensors
    backward = _group_stats_norm_backward if traced(dy) else _backward
    dx, grads = backward(dy, x, weight, bias, v, mean, var, *ctx.args)
    dweight, dbias, dv = grads_as_params(grads, (weight, bias, v))
    return dx, dweight, dbias, dv, None, None, None, None, None, None


_group_stats_norm.register_autograd(_autograd_backward, setup_context=_setup_context)
_GroupStatsNorm = eager_function("_GroupStatsNorm", _forward, _setup_context, _autograd_backward)


# ---- public functions ---------------------------------------------------------------------------------------------


def _normalize(
    owner: str,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    eps: float,
    center: bool,
    act: str | None,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the per-channel tensors and run the op; ``running`` = (mean, var) normalizes with given statistics."""
    code = act_code(owner, act)
    check_kernel_input(owner, x, weight=weight, bias=bias, v=v)
    weight, bias, v = (None if p is None else p.contiguous() for p in (weight, bias, v))
    mean_in, var_in = (None, None) if running is None else running
    x = flat(x).tensor
    op = _group_stats_norm if traced(x) else _GroupStatsNorm.call
    return op(x, weight, bias, v, mean_in, var_in, num_groups, float(eps), center, code)


def _rows(owner: str, x, weight, bias, eps: float, center: bool, act: str | None) -> torch.Tensor:
    """LayerNorm / RMSNorm of (N, C) rows (transformer activations): one statistic per row over its C contiguous
    values, which is what the per-position kernels of :mod:`normlab.kernels.channel_norm` compute for an input
    without positions (a tile of rows per program, a persistent backward). This module's kernels split work by
    sample and position, and a row has no positions to split."""
    code = act_code(owner, act)
    check_kernel_input(owner, x, weight=weight, bias=bias)
    return channel_norm.unchecked_channel_norm(x, weight, bias, float(eps), center, code)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str | None = None,
) -> torch.Tensor:
    r"""Group normalization (Wu & He, 2018, arXiv 1803.08494) as fused Triton kernels, optionally followed by an
    activation: :func:`normlab.functional.group_norm` then ``act``.

    .. math:: y = \mathrm{act}\left(\frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \gamma_c
        + \beta_c\right)

    Args:
        x: input (N, C, *) on CUDA (or CPU under ``TRITON_INTERPRET=1``), float16/bfloat16/float32/float64.
        num_groups: number of groups; must divide C.
        weight, bias: optional (C,) affine parameters.
        eps: added to the variance.
        act: fused activation, None / "none", "relu" or "silu".

    Raises:
        ValueError: for fewer than 2 dims, a non-float input, ``num_groups`` not a positive divisor of C, a
            parameter without C values, an unknown ``act``.

    Note:
        Training and eval compute the same.

    Example::

        y = group_norm(x.cuda(), 32, weight, bias, act="relu")  # == F.relu(F.group_norm(x, 32, weight, bias))
    """
    check_kernel_input("group_norm", x)
    check_positive_int("group_norm", "num_groups", num_groups)
    check_divides("group_norm", "num_groups", num_groups, "num_channels", x.shape[1])
    return _normalize("group_norm", x, num_groups, weight, bias, None, eps, True, act)[0]


def instance_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    act: str | None = None,
) -> torch.Tensor:
    r"""Instance normalization (Ulyanov et al., 2016, arXiv 1607.08022) as fused Triton kernels, optionally followed
    by an activation: :func:`normlab.functional.instance_norm` then ``act``.

    .. math:: y = \mathrm{act}\left(\frac{x - \mathrm{E}_{n,c}[x]}{\sqrt{\mathrm{Var}_{n,c}[x] + \epsilon}}
        \gamma_c + \beta_c\right)

    With ``use_input_stats`` the kernels compute the per-(n, c) statistics, and the running statistics, when given,
    are updated in place from them exactly as the reference does (batch average of the per-instance mean and
    unbiased variance). Otherwise the running statistics normalize: a per-channel affine.

    Args:
        x: input (N, C, *) on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        running_mean, running_var: (C,) buffers, both or neither.
        weight, bias: optional (C,) affine parameters.
        use_input_stats: normalize with (and record) the per-instance statistics.
        momentum: PyTorch convention, weight of the new batch (Keras' 0.9 is PyTorch's 0.1).
        eps: added to the variance.
        act: fused activation, None / "none", "relu" or "silu".

    Raises:
        ValueError: as the reference (one spatial value with ``use_input_stats``, one running buffer without the
            other, none without ``use_input_stats``), and for the input and parameter checks of :func:`group_norm`.

    Note:
        Training (``use_input_stats``) normalizes each instance by its own statistics; eval with running statistics
        uses those.

    Example::

        y = instance_norm(x.cuda(), running_mean, running_var, use_input_stats=True)
    """
    owner = "instance_norm"
    check_kernel_input(owner, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "instance_norm: running_mean and running_var must both be tensors or both be None, got "
            f"running_mean={type(running_mean).__name__}, running_var={type(running_var).__name__}"
        )
    if use_input_stats:
        check_spatial_has_values(owner, x)
    elif running_mean is None:
        raise ValueError("instance_norm: use_input_stats=False normalizes with running_mean and running_var, got None")
    check_kernel_input(owner, x, running_mean=running_mean, running_var=running_var)
    running = None if use_input_stats else (running_mean.reshape(-1), running_var.reshape(-1))
    y, mean, var = _normalize(owner, x, x.shape[1], weight, bias, None, eps, True, act, running)
    if use_input_stats and running_mean is not None:
        count = torch.tensor(math.prod(x.shape[2:]), dtype=mean.dtype, device=x.device)
        update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0), count, momentum)
    return y


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str | None = None,
) -> torch.Tensor:
    r"""Layer normalization over C and all positions (Ba, Kiros & Hinton, 2016, arXiv 1607.06450) as fused Triton
    kernels: group normalization with one group, :func:`normlab.functional.layer_norm` then ``act``.

    .. math:: y = \mathrm{act}\left(\frac{x - \mathrm{E}_n[x]}{\sqrt{\mathrm{Var}_n[x] + \epsilon}} \gamma_c
        + \beta_c\right)

    Args:
        x: input (N, C, *) on CUDA (or CPU under ``TRITON_INTERPRET=1``); an (N, C) input normalizes each row.
        weight, bias: optional (C,) affine parameters.
        eps: added to the variance.
        act: fused activation, None / "none", "relu" or "silu".

    Raises:
        ValueError: for the input and parameter checks of :func:`group_norm`.

    Note:
        Training and eval compute the same.

    Example::

        y = layer_norm(x.cuda(), weight, bias)
    """
    check_kernel_input("layer_norm", x)
    if x.dim() == 2:
        return _rows("layer_norm", x, weight, bias, eps, True, act)
    return _normalize("layer_norm", x, 1, weight, bias, None, eps, True, act)[0]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, act: str | None = None
) -> torch.Tensor:
    r"""RMS normalization over C and all positions (Zhang & Sennrich, 2019, arXiv 1910.07467) as fused Triton
    kernels: :func:`normlab.functional.rms_norm` then ``act``.

    .. math:: y = \mathrm{act}\left(\frac{x}{\sqrt{\mathrm{E}_n[x^2] + \epsilon}} \gamma_c\right)

    The mean square is accumulated as mean and centered sum of squares (``E[x^2] = Var[x] + E[x]^2``).

    Args:
        x: input (N, C, *) on CUDA (or CPU under ``TRITON_INTERPRET=1``); an (N, C) input normalizes each row.
        weight: optional (C,) scale.
        eps: added to the mean of squares.
        act: fused activation, None / "none", "relu" or "silu".

    Raises:
        ValueError: for the input and parameter checks of :func:`group_norm`.

    Note:
        Training and eval compute the same.

    Example::

        y = rms_norm(x.cuda(), weight)
    """
    check_kernel_input("rms_norm", x)
    if x.dim() == 2:
        return _rows("rms_norm", x, weight, None, eps, False, act)
    return _normalize("rms_norm", x, 1, weight, None, None, eps, False, act)[0]


def evonorm_s0(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""EvoNorm-S0 (Liu, Brock, Simonyan & Le, 2020, arXiv 2004.02967) as fused Triton kernels:
    :func:`normlab.functional.evonorm_s0`.

    .. math:: y = \frac{x \, \sigma(v x)}{\sqrt{s^2_g + \epsilon}} \gamma + \beta

    With ``v=None`` it is group normalization.

    Args:
        x: input (N, C, *) with 1 to 3 spatial dimensions, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        num_groups: number of channel groups; must divide C.
        weight, bias: optional (C,) affine parameters.
        v: optional (C,) nonlinearity parameter; None selects the plain group norm.
        eps: added to the group variance.

    Raises:
        ValueError: if ``x`` is not 3D, 4D or 5D, ``num_groups`` is not a positive divisor of C, or for the input and
            parameter checks of :func:`group_norm`.

    Note:
        There are no running statistics: training and eval compute the same thing.

    Example::

        y = evonorm_s0(x.cuda(), 8, weight, bias, v)
    """
    owner = "evonorm_s0"
    check_input(owner, x, (3, 4, 5), None)
    check_kernel_input(owner, x)
    check_positive_int(owner, "num_groups", num_groups)
    check_divides(owner, "num_groups", num_groups, "channels", x.shape[1])
    return _normalize(owner, x, num_groups, weight, bias, v, eps, True, None)[0]
