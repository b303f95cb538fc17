r"""Normalized recurrent cells and sequence modules: LSTM and GRU with layer, batch or online normalization.

The norm acts on the input-to-hidden pre-activation :math:`W_{ih} x_t`, on the hidden-to-hidden pre-activation
:math:`W_{hh} h_{t-1}` and (LSTM) on the cell state before its tanh, as in the LN-LSTM of Ba, Kiros & Hinton (2016,
"Layer Normalization", arXiv 1607.06450) and the BN-LSTM of Cooijmans et al. (2017, "Recurrent Batch
Normalization", arXiv 1603.09025). Normalizing the two projections separately lets the learnt scales weigh input
against recurrence; the carried cell state itself stays unnormalized, so the LSTM's gradient path through
:math:`c_t` is intact. Biases are added after the norm (before it, the mean subtraction would cancel them).

``norm`` is one of:

===============  ====================================================================================================
``"none"``       no normalization: exactly torch.nn.LSTMCell / GRUCell / LSTM / GRU.
``"ln"``         normlab.LayerNorm per sample. LSTM: over all 4H features of each projection and over the H features
                 of the cell state, as in Ba et al.'s LN-LSTM equations (not per gate). GRU: separately over the
                 [r, z] block (2H) and the candidate block n (H) of each projection, as in the layer-normalized GRU
                 of Ba et al.'s released code (github.com/ryankiros/layer-norm, ``lngru_layer``).
``"bn_step"``    RecurrentBatchNorm1d: batch statistics per time step, running statistics per step (Cooijmans et
                 al.), gamma initialised to 0.1.
``"bn_shared"``  ONE normlab.BatchNorm1d per site reused at every step: the naive recurrent BN whose statistics mix
                 the initial transient with the steady state (kept on purpose, so its failure can be measured); gamma
                 initialised to 0.1 as for ``"bn_step"``, so the two differ only in how statistics are kept.
``"online"``     normlab.layers.OnlineNorm1d (Chiley et al., 2019, "Online Normalization", arXiv 1905.05894): running
                 estimates instead of batch statistics, so batch size 1 works; called at every step. LSTM: the
                 authors' arrangement (below), not the per-site one of the other norms. GRU: per site (ih, hh), with
                 OnlineNorm1d's defaults and layer scaling over the 3H features of a site.
===============  ====================================================================================================

The batch norms are per feature, so normalizing the 4H/3H features of a site at once equals normalizing each gate.

Online Normalization in the LSTM follows the authors' PTB language model (Cerebras ``online-normalization``,
``experiments/recurrent/model/lstm.py`` and the LSTM command of its README): ONE OnlineNorm1d over the whole
pre-activation :math:`W_{ih} x_t + W_{hh} h_{t-1}` of each gate (per-feature statistics, so per gate), layer scaling
over the H features of each gate, no norm on the cell state, and the decays they used for the LSTM,
``alpha_fwd = 8191/8192``, ``alpha_bkw = 31/32``. The submodule is ``norm_gates``; ``norm_ih``, ``norm_hh`` and
``norm_c`` are None. The per-site arrangement of the other norms (two projections and the cell state normalized
separately, decays 0.999/0.99) is unstable with Online Normalization's backward pass: its control process subtracts
running averages of the gradient, a correction that does not come from the loss, and in a recurrence that
correction re-enters the same layer's gradient stream at earlier time steps (through :math:`W_{hh}` and, worst,
through the cell state's additive path). Its accumulators then grow by one to two orders of magnitude per training
step: the global gradient norm of a 2-layer LSTM (hidden 32, 40 steps, batch 64, random data) went from 2e3 to 1e11
in 6 SGD steps (and on to inf), while with the plain derivative of the same forward pass it stayed at 1e2-1e3; with
the authors' arrangement it peaks at 3e1-8e3 (three seeds) within the first 10 steps, then falls to 1e0-1e1. In the
lab's ``rnn`` study (quick) the first epoch's mean gradient norm before clipping fell from 4e7 to 3e3 and test
accuracy rose from 13% to 25%. What remains is early-training behaviour of the method itself: while the forward
estimates are still far from the data (they start at mean 0, variance 1) the control process still amplifies the
gradient for a few steps (there up to 4e4, versus 40 with the plain derivative of the same forward pass, and 2e2
once the statistics are warmed up), then it settles to the other norms' scale; clip gradients.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..functional._checks import check_positive_int, unknown_name_error
from ..functional._stats import accumulation_dtype
from ..functional.online_norm import layer_scale
from ..functional.recurrent_batch_norm import check_step
from .batch_norm import BatchNorm1d
from .layer_norm import LayerNorm
from .recurrent_batch_norm import RecurrentBatchNorm1d

__all__ = ["NORMS", "NormLSTMCell", "NormGRUCell", "NormLSTM", "NormGRU"]

NORMS = ("none", "ln", "bn_step", "bn_shared", "online")

# norms whose statistics are per (sample, step) and hold no state: they can normalize a whole sequence in one call
_STATELESS_NORMS = ("none", "ln")

# the paper's initial scale for batch-normalized recurrent pre-activations (Cooijmans et al., Section 4)
_BN_WEIGHT_INIT = 0.1


def _check_norm(owner: str, norm) -> str:
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"{owner}: {unknown_name_error('norm', str(norm), NORMS)} (got norm={norm!r})")
    return norm


class _ChunkedLayerNorm(nn.Module):
    """normlab.LayerNorm applied separately to consecutive blocks of the features of an (N, C) input."""

    def __init__(self, sizes: tuple[int, ...], device=None, dtype=None) -> None:
        super().__init__()
        self.sizes = tuple(sizes)
        self.chunks = nn.ModuleList(LayerNorm(s, device=device, dtype=dtype) for s in self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.sizes, dim=1)
        return torch.cat([norm(part) for norm, part in zip(self.chunks, parts)], dim=1)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


def _online_norm_class() -> type[nn.Module]:
    try:
        from .online_norm import OnlineNorm1d
    except ImportError as e:  # another part of normlab; imported lazily so that this module never depends on it
        raise ImportError("norm='online' needs normlab.layers.online_norm.OnlineNorm1d, which is not available") from e
    return OnlineNorm1d


def _online_norm(num_features: int, device, dtype) -> nn.Module:
    return _online_norm_class()(num_features, device=device, dtype=dtype)


# the decays of the Online Normalization authors' LSTM language model (their README's LSTM command:
# --afwd 0.9998779297 --abkw 0.96875)
ONLINE_LSTM_ALPHA_FWD = 8191 / 8192
ONLINE_LSTM_ALPHA_BKW = 31 / 32


class _OnlineGateNorm(nn.Module):
    """The Online Normalization authors' LSTM norm: OnlineNorm1d over all G * H features of the summed
    pre-activation (per-feature statistics), then layer scaling separately over each gate's H features.

    The authors use one OnlineNorm1d(H) per gate, each with its own layer scaling; since the statistics and the
    control process are per feature, one module over G * H features with layer scaling per gate computes the same.
    """

    def __init__(self, num_gates: int, hidden_size: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_gates, self.hidden_size = num_gates, hidden_size
        self.online = _online_norm_class()(
            num_gates * hidden_size,
            alpha_fwd=ONLINE_LSTM_ALPHA_FWD,
            alpha_bkw=ONLINE_LSTM_ALPHA_BKW,
            layer_scaling=False,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.online(x)
        per_gate = h.reshape(-1, self.hidden_size).to(accumulation_dtype(h.dtype))
        return layer_scale(per_gate, self.online.eps).to(h.dtype).view_as(h)

    def extra_repr(self) -> str:
        return f"num_gates={self.num_gates}, hidden_size={self.hidden_size}, layer scaling per gate"


def _build_norm(
    norm: str, num_features: int, *, max_steps: int, ln_chunks: tuple[int, ...] | None, device, dtype
) -> nn.Module | None:
    """The norm of one site (None for ``"none"``); ``ln_chunks`` splits the features into separate LayerNorms."""
    factory = {"device": device, "dtype": dtype}
    if norm == "none":
        return None
    if norm == "ln":
        if ln_chunks is not None and len(ln_chunks) > 1:
            return _ChunkedLayerNorm(ln_chunks, **factory)
        return LayerNorm(num_features, **factory)
    if norm == "bn_step":
        return RecurrentBatchNorm1d(num_features, max_steps=max_steps, weight_init=_BN_WEIGHT_INIT, **factory)
    if norm == "bn_shared":
        bn = BatchNorm1d(num_features, **factory)
        nn.init.constant_(bn.weight, _BN_WEIGHT_INIT)
        return bn
    return _online_norm(num_features, device, dtype)


def _normalize(norm: nn.Module | None, x: torch.Tensor, step: int) -> torch.Tensor:
    """Apply one site's norm to the activations of time step ``step``."""
    if norm is None:
        return x
    if isinstance(norm, RecurrentBatchNorm1d):
        return norm(x, step)
    return norm(x)


def _add(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


def _input_side(x, weight_ih, bias, norm_ih, step) -> torch.Tensor:
    """``norm(W_ih x) + bias`` of one step (a single matmul with the bias folded in when there is no norm)."""
    if norm_ih is None:
        return F.linear(x, weight_ih, bias)
    return _add(_normalize(norm_ih, F.linear(x, weight_ih), step), bias)


# The step functions take W_hh transposed once per sequence, and use few, large ops: in a Python time loop the cost
# is mostly per-op overhead (forward dispatch and one autograd node each), not arithmetic.


def _lstm_step(gi, h, c, weight_hh_t, norm_hh, norm_c, step):
    """One LSTM step from ``gi`` = the input side of the pre-activation with both biases already added."""
    if norm_hh is None:
        gates = torch.addmm(gi, h, weight_hh_t)
    else:
        gates = gi + _normalize(norm_hh, h.mm(weight_hh_t), step)
    return _lstm_update(gates, c, norm_c, step)


def _lstm_step_joint(projected, h, c, weight_hh_t, norm_gates, bias):
    """One LSTM step with one norm over the whole pre-activation ``W_ih x + W_hh h`` (``projected`` = ``W_ih x``),
    the biases added after it: Online Normalization's arrangement."""
    gates = _add(norm_gates(torch.addmm(projected, h, weight_hh_t)), bias)
    return _lstm_update(gates, c, None, 0)


def _lstm_update(gates, c, norm_c, step):
    """(h, c) of an LSTM step from its (N, 4H) pre-activation ``gates``."""
    hs = c.shape[-1]
    i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # one sigmoid over all gates beats three (g's quarter is unused)
    g = torch.tanh(gates[:, 2 * hs : 3 * hs])
    c = torch.addcmul(f * c, i, g)
    h = o * torch.tanh(_normalize(norm_c, c, step))
    return h, c


def _gru_step(gi, h, weight_hh_t, bias_hh, norm_hh, step):
    """One GRU step from ``gi`` = the input side of the pre-activation with bias_ih added."""
    hs = h.shape[-1]
    if norm_hh is None:
        gh = h.mm(weight_hh_t) if bias_hh is None else torch.addmm(bias_hh, h, weight_hh_t)
    else:
        gh = _add(_normalize(norm_hh, h.mm(weight_hh_t), step), bias_hh)
    r, z = torch.sigmoid(gi[:, : 2 * hs] + gh[:, : 2 * hs]).chunk(2, 1)
    n = torch.tanh(torch.addcmul(gi[:, 2 * hs :], r, gh[:, 2 * hs :]))
    return torch.lerp(n, h, z)  # (1 - z) * n + z * h


def _check_dropout(owner: str, dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"{owner}: dropout={dropout!r} must be a number in [0, 1]")
    return float(dropout)


def _copy_from_torch(ours: nn.Module, theirs: nn.Module) -> None:
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            getattr(ours, name).copy_(p)
    ours.train(theirs.training)


# ---- cells -------------------------------------------------------------------------------------------------------


class _NormCellBase(nn.Module):
    """Parameters named, shaped, ordered and initialised like torch.nn.LSTMCell / GRUCell, plus the norms."""

    _num_gates: int
    _torch_class: type[nn.Module]
    _joint_online = False  # norm="online" is one norm over the summed pre-activation (``norm_gates``)

    def __init__(self, input_size, hidden_size, bias, norm, max_steps, device, dtype) -> None:
        super().__init__()
        owner = type(self).__name__
        self.input_size = check_positive_int(owner, "input_size", input_size)
        self.hidden_size = check_positive_int(owner, "hidden_size", hidden_size)
        self.norm = _check_norm(owner, norm)
        self.max_steps = check_positive_int(owner, "max_steps", max_steps)
        self.bias = bool(bias)
        factory = {"device": device, "dtype": dtype}
        gh = self._num_gates * self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gh, self.input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gh, self.hidden_size, **factory))
        if self.bias:
            self.bias_ih = nn.Parameter(torch.empty(gh, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gh, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()
        if self._joint_online and self.norm == "online":
            self.norm_ih = self.norm_hh = None
            self.norm_gates = _OnlineGateNorm(self._num_gates, self.hidden_size, **factory)
            return
        chunks = self._ln_chunks()
        build = lambda c, ch: _build_norm(norm, c, max_steps=self.max_steps, ln_chunks=ch, **factory)
        self.norm_ih = build(gh, chunks)
        self.norm_hh = build(gh, chunks)
        self.norm_gates = None

    def _ln_chunks(self) -> tuple[int, ...] | None:
        return None

    def reset_parameters(self) -> None:
        """Uniform in [-1/sqrt(hidden_size), 1/sqrt(hidden_size)], in torch's order (same seed, same weights).

        The norms keep their own initialisation.
        """
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            if p is not None:
                nn.init.uniform_(p, -stdv, stdv)

    @classmethod
    def from_torch(cls, cell: nn.Module, norm: str = "none", **kwargs):
        """A cell with ``cell``'s weights (a torch.nn.LSTMCell / GRUCell), device, dtype and training flag.

        With ``norm="none"`` it computes exactly what ``cell`` does. (Equivalently, ``load_state_dict`` of the torch
        cell's state_dict works: strict for ``"none"``, ``strict=False`` otherwise, the norms' keys being missing.)
        """
        owner = f"{cls.__name__}.from_torch"
        if not isinstance(cell, cls._torch_class):
            raise ValueError(f"{owner}: expected a torch.nn.{cls._torch_class.__name__}, got {type(cell).__name__}")
        w = cell.weight_ih
        args = {"bias": cell.bias, "norm": norm, "device": w.device, "dtype": w.dtype, **kwargs}
        ours = cls(cell.input_size, cell.hidden_size, **args)
        _copy_from_torch(ours, cell)
        return ours

    def _check_cell_input(self, x: torch.Tensor, step: int) -> None:
        owner = type(self).__name__
        if x.dim() not in (1, 2):
            raise ValueError(
                f"{owner}: expected input (N, input_size) or unbatched (input_size,), got input of shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{owner}: input has {x.shape[-1]} features (shape {tuple(x.shape)}), expected "
                f"input_size={self.input_size}"
            )
        check_step(owner, step)

    def _state(self, s: torch.Tensor | None, x: torch.Tensor, name: str) -> torch.Tensor:
        """The (N, H) state ``s`` checked against the (N, input_size) input; zeros when None."""
        if s is None:
            return x.new_zeros(x.shape[0], self.hidden_size)
        if s.shape != (x.shape[0], self.hidden_size):
            raise ValueError(
                f"{type(self).__name__}: {name} has shape {tuple(s.shape)}, expected "
                f"{(x.shape[0], self.hidden_size)} for input of shape {tuple(x.shape)}"
            )
        return s

    def extra_repr(self) -> str:
        extra = f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}"
        if not self.bias:
            extra += ", bias=False"
        if self.norm == "bn_step":
            extra += f", max_steps={self.max_steps}"
        return extra


class NormLSTMCell(_NormCellBase):
    r"""An LSTM cell with normalized pre-activations and cell state: torch.nn.LSTMCell when ``norm="none"``.

    .. math::
        (i, f, g, o) &= \mathrm{N}_{ih}(W_{ih} x_t) + \mathrm{N}_{hh}(W_{hh} h_{t-1}) + b_{ih} + b_{hh} \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
        h_t &= \sigma(o) \odot \tanh(\mathrm{N}_c(c_t))

    The LN-LSTM of Ba, Kiros & Hinton (2016, arXiv 1607.06450) with ``norm="ln"`` (LayerNorm over all 4H features
    of each projection, not per gate), the BN-LSTM of Cooijmans et al. (2017, arXiv 1603.09025) with
    ``norm="bn_step"``; see :mod:`normlab.layers.rnn` for every option. The carried :math:`c_t` is unnormalized.
    ``weight_ih`` (4H, input_size), ``weight_hh`` (4H, H), ``bias_ih``, ``bias_hh`` (4H) have torch's names, gate
    order (i, f, g, o) and initialisation, so a torch.nn.LSTMCell's state_dict loads (see :meth:`from_torch`). The
    norms are submodules ``norm_ih``, ``norm_hh``, ``norm_c`` (None for ``"none"``).

    With ``norm="online"`` the cell is the Online Normalization authors' LSTM instead (see :mod:`normlab.layers.rnn`):

    .. math::
        (i, f, g, o) = \mathrm{LS}_{gate}(\mathrm{ON}(W_{ih} x_t + W_{hh} h_{t-1})) + b_{ih} + b_{hh}, \qquad
        h_t = \sigma(o) \odot \tanh(c_t)

    with ONE OnlineNorm1d (``norm_gates``; decays 8191/8192 forward, 31/32 backward), layer scaling per gate and no
    cell-state norm; ``norm_ih``, ``norm_hh``, ``norm_c`` are None. Normalizing the two projections and the cell
    state separately makes Online Normalization's backward control process feed back on itself through time and
    the gradients grow without bound.

    Args:
        input_size: features of x.
        hidden_size: H, features of h and c.
        bias: learn ``bias_ih`` and ``bias_hh``.
        norm: "none", "ln", "bn_step", "bn_shared" or "online".
        max_steps: per-step statistics rows of ``"bn_step"`` (longer sequences reuse the last row).
        device, dtype: of the parameters and buffers.

    Shape:
        x: (N, input_size) or unbatched (input_size,); state: a tuple (h, c) of (N, H) (or (H,)), default zeros;
        ``step``: the time step, a Python int >= 0 (used by ``"bn_step"``). Returns (h', c'), shaped like the state.

    Raises:
        ValueError: on an input of the wrong rank or feature count, a state of the wrong shape, a negative or
            non-int step, an unknown ``norm`` (the message lists the valid names) or a size that is not positive.

    Note:
        Training vs eval is the norm's: ``"ln"`` computes the same in both; ``"bn_step"``/``"bn_shared"`` use batch
        statistics in training (so N > 1) and running statistics in eval; ``"online"`` follows OnlineNorm1d.

    Example:
        >>> import torch
        >>> from normlab.layers.rnn import NormLSTMCell
        >>> cell = NormLSTMCell(3, 5, norm="ln")
        >>> state = None
        >>> for t, x in enumerate(torch.randn(4, 2, 3)):
        ...     state = cell(x, state, step=t)
        >>> tuple(state[0].shape), tuple(state[1].shape)
        ((2, 5), (2, 5))
    """

    _num_gates = 4
    _torch_class = nn.LSTMCell
    _joint_online = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        norm: str = "ln",
        max_steps: int = 100,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, norm, max_steps, device, dtype)
        self.norm_c = (
            None
            if self.norm_gates is not None
            else _build_norm(
                self.norm, self.hidden_size, max_steps=self.max_steps, ln_chunks=None, device=device, dtype=dtype
            )
        )

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_cell_input(x, step)
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
            state = None if state is None else (state[0].unsqueeze(0), state[1].unsqueeze(0))
        h, c = (None, None) if state is None else state
        h, c = self._state(h, x, "state[0] (h)"), self._state(c, x, "state[1] (c)")
        bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh
        if self.norm_gates is not None:
            h, c = _lstm_step_joint(F.linear(x, self.weight_ih), h, c, self.weight_hh.t(), self.norm_gates, bias)
        else:
            gi = _input_side(x, self.weight_ih, bias, self.norm_ih, step)
            h, c = _lstm_step(gi, h, c, self.weight_hh.t(), self.norm_hh, self.norm_c, step)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class NormGRUCell(_NormCellBase):
    r"""A GRU cell with normalized pre-activations: torch.nn.GRUCell when ``norm="none"``.

    .. math::
        (r_i, z_i, n_i) &= \mathrm{N}_{ih}(W_{ih} x_t) + b_{ih}, \quad
        (r_h, z_h, n_h) = \mathrm{N}_{hh}(W_{hh} h_{t-1}) + b_{hh} \\
        r &= \sigma(r_i + r_h), \quad z = \sigma(z_i + z_h) \\
        n &= \tanh(n_i + r \odot n_h) \\
        h_t &= (1 - z) \odot n + z \odot h_{t-1}

    With ``norm="none"`` this is exactly torch's GRU, :math:`n = \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h +
    b_{hn}))`. With ``norm="ln"`` it is the layer-normalized GRU of Ba, Kiros & Hinton's released code
    (github.com/ryankiros/layer-norm, ``lngru_layer``, for arXiv 1607.06450): LayerNorm separately over the gate
    block [r, z] (2H) and the candidate block n (H) of each projection, the reset gate multiplying the normalized
    recurrent candidate term. The batch norms are per feature, so blocks do not matter for them. See
    :mod:`normlab.layers.rnn` for every option. ``weight_ih`` (3H, input_size), ``weight_hh`` (3H, H),
    ``bias_ih``, ``bias_hh`` (3H) have torch's names, gate order (r, z, n) and initialisation.

    Args:
        input_size: features of x.
        hidden_size: H, features of h.
        bias: learn ``bias_ih`` and ``bias_hh``.
        norm: "none", "ln", "bn_step", "bn_shared" or "online".
        max_steps: per-step statistics rows of ``"bn_step"`` (longer sequences reuse the last row).
        device, dtype: of the parameters and buffers.

    Shape:
        x: (N, input_size) or unbatched (input_size,); state: h of (N, H) (or (H,)), default zeros; ``step``: the
        time step, a Python int >= 0 (used by ``"bn_step"``). Returns h', shaped like the state.

    Raises:
        ValueError: on an input of the wrong rank or feature count, a state of the wrong shape, a negative or
            non-int step, an unknown ``norm`` (the message lists the valid names) or a size that is not positive.

    Note:
        Training vs eval is the norm's: ``"ln"`` computes the same in both; ``"bn_step"``/``"bn_shared"`` use batch
        statistics in training (so N > 1) and running statistics in eval; ``"online"`` follows OnlineNorm1d.

    Example:
        >>> import torch
        >>> from normlab.layers.rnn import NormGRUCell
        >>> cell = NormGRUCell(3, 5, norm="bn_step", max_steps=4)
        >>> h = None
        >>> for t, x in enumerate(torch.randn(6, 8, 3)):
        ...     h = cell(x, h, step=t)
        >>> tuple(h.shape), cell.norm_ih.num_batches_tracked.tolist()
        ((8, 5), [1, 1, 1, 3])
    """

    _num_gates = 3
    _torch_class = nn.GRUCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        norm: str = "ln",
        max_steps: int = 100,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, norm, max_steps, device, dtype)

    def _ln_chunks(self) -> tuple[int, ...]:
        return (2 * self.hidden_size, self.hidden_size)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        self._check_cell_input(x, step)
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
            state = None if state is None else state.unsqueeze(0)
        h = self._state(state, x, "state (h)")
        gi = _input_side(x, self.weight_ih, self.bias_ih, self.norm_ih, step)
        h = _gru_step(gi, h, self.weight_hh.t(), self.bias_hh, self.norm_hh, step)
        return h if batched else h.squeeze(0)


# ---- sequence modules --------------------------------------------------------------------------------------------


class _NormRNNBase(nn.Module):
    """Stacked normalized recurrent layers with torch.nn.LSTM / GRU's parameter names, shapes, order and init."""

    _num_gates: int
    _torch_class: type[nn.Module]
    _norm_sites: tuple[str, ...]
    _joint_online = False  # as for the cells: norm="online" is one norm per layer, ``norm_gates_l{k}``

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers,
        norm,
        bias,
        batch_first,
        dropout,
        norm_between_layers,
        max_steps,
        device,
        dtype,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.input_size = check_positive_int(owner, "input_size", input_size)
        self.hidden_size = check_positive_int(owner, "hidden_size", hidden_size)
        self.num_layers = check_positive_int(owner, "num_layers", num_layers)
        self.norm = _check_norm(owner, norm)
        self.max_steps = check_positive_int(owner, "max_steps", max_steps)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = _check_dropout(owner, dropout)
        self.norm_between_layers = norm_between_layers
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                f"{owner}: dropout={self.dropout} acts between layers only, and num_layers=1 has none",
                UserWarning,
                stacklevel=3,
            )
        factory = {"device": device, "dtype": dtype}
        gh = self._num_gates * self.hidden_size
        for k in range(self.num_layers):
            layer_in = self.input_size if k == 0 else self.hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gh, layer_in, **factory)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gh, self.hidden_size, **factory)))
            for name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
                self.register_parameter(name, nn.Parameter(torch.empty(gh, **factory)) if self.bias else None)
        self.reset_parameters()
        for k in range(self.num_layers):
            if self._is_joint():
                self.add_module(f"norm_gates_l{k}", _OnlineGateNorm(self._num_gates, self.hidden_size, **factory))
                continue
            for site in self._norm_sites:
                features = self.hidden_size if site == "c" else gh
                chunks = None if site == "c" else self._ln_chunks()
                module = _build_norm(self.norm, features, max_steps=self.max_steps, ln_chunks=chunks, **factory)
                self.add_module(f"norm_{site}_l{k}", module)
        self._build_between_layer_norms(norm_between_layers, factory)

    def _build_between_layer_norms(self, spec, factory) -> None:
        if spec is None:
            return
        from ..factory import get_norm_layer  # the factory sits above layers; import when used

        make = get_norm_layer(spec)
        for k in range(self.num_layers - 1):
            module = make(self.hidden_size, **factory)
            dims = getattr(module, "_input_dims", (2,))
            if 2 not in dims:
                raise ValueError(
                    f"{type(self).__name__}: norm_between_layers={spec!r} builds {type(module).__name__}, which "
                    f"takes {dims}-D input; it must normalize (samples * steps, hidden_size) input, e.g. 'bn1d' or "
                    "'ln'"
                )
            self.add_module(f"norm_between_l{k}", module)

    def _ln_chunks(self) -> tuple[int, ...] | None:
        return None

    def reset_parameters(self) -> None:
        """Uniform in [-1/sqrt(hidden_size), 1/sqrt(hidden_size)], in torch's order (same seed, same weights).

        The norms keep their own initialisation.
        """
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for k in range(self.num_layers):
            for p in self._layer_params(k):
                if p is not None:
                    nn.init.uniform_(p, -stdv, stdv)

    def _layer_params(self, k: int):
        """(weight_ih, weight_hh, bias_ih, bias_hh) of layer ``k``; the biases are None without ``bias``."""
        return tuple(getattr(self, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def _is_joint(self) -> bool:
        return self._joint_online and self.norm == "online"

    def _layer_norms(self, k: int) -> tuple[nn.Module | None, ...]:
        """Layer ``k``'s norm of each site in ``_norm_sites`` (all None with the joint online norm)."""
        return tuple(getattr(self, f"norm_{site}_l{k}", None) for site in self._norm_sites)

    @classmethod
    def from_torch(cls, module: nn.Module, norm: str = "none", **kwargs):
        """A module with ``module``'s weights (a torch.nn.LSTM / GRU), sizes, bias, batch_first, dropout, device,
        dtype and training flag; ``kwargs`` override any constructor argument.

        With ``norm="none"`` it computes exactly what ``module`` does. The parameter names are torch's
        (``weight_ih_l0``, ...), so ``load_state_dict(module.state_dict())`` works too: strict for ``"none"``,
        ``strict=False`` otherwise (the norms' keys are then missing). Bidirectional and projected (proj_size > 0)
        torch modules are refused.
        """
        owner = f"{cls.__name__}.from_torch"
        if not isinstance(module, cls._torch_class):
            raise ValueError(f"{owner}: expected a torch.nn.{cls._torch_class.__name__}, got {type(module).__name__}")
        if module.bidirectional:
            raise ValueError(f"{owner}: bidirectional=True is not supported")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"{owner}: proj_size={module.proj_size} is not supported (only proj_size=0)")
        w = module.weight_ih_l0
        args = {
            "norm": norm,
            "bias": module.bias,
            "batch_first": module.batch_first,
            "dropout": module.dropout,
            "device": w.device,
            "dtype": w.dtype,
            **kwargs,
        }
        ours = cls(module.input_size, module.hidden_size, module.num_layers, **args)
        _copy_from_torch(ours, module)
        return ours

    def _time_major(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Check ``x`` and return it as (T, N, input_size), with whether it was batched."""
        owner = type(self).__name__
        if x.dim() not in (2, 3):
            layout = "(N, T, input_size)" if self.batch_first else "(T, N, input_size)"
            raise ValueError(
                f"{owner}: expected input {layout} or unbatched (T, input_size), got input of shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{owner}: input has {x.shape[-1]} features (shape {tuple(x.shape)}), expected "
                f"input_size={self.input_size}"
            )
        batched = x.dim() == 3
        time_dim = 1 if batched and self.batch_first else 0
        if x.shape[time_dim] == 0:
            raise ValueError(f"{owner}: input of shape {tuple(x.shape)} has no time steps (T = 0)")
        if not batched:
            return x.unsqueeze(1), False
        return (x.transpose(0, 1) if self.batch_first else x), True

    def _initial(self, s: torch.Tensor | None, x: torch.Tensor, batched: bool, name: str) -> torch.Tensor:
        """An initial state as (num_layers, N, H) for the time-major input ``x``; zeros when None."""
        n = x.shape[1]
        if s is None:
            return x.new_zeros(self.num_layers, n, self.hidden_size)
        expected = (self.num_layers, n, self.hidden_size) if batched else (self.num_layers, self.hidden_size)
        if s.shape != expected:
            raise ValueError(f"{type(self).__name__}: {name} has shape {tuple(s.shape)}, expected {expected}")
        return s if batched else s.unsqueeze(1)

    def _input_sides(self, x: torch.Tensor, weight_ih, bias, norm_ih) -> torch.Tensor | None:
        """The input side ``norm(W_ih x_t) + bias`` of every step at once (T, N, G*H), where the norm allows it;
        else None (the loop then normalizes step by step)."""
        if self.norm not in _STATELESS_NORMS:
            return None
        if norm_ih is None:
            return F.linear(x, weight_ih, bias)
        projected = F.linear(x, weight_ih)
        return _add(norm_ih(projected.flatten(0, 1)).view_as(projected), bias)

    def _between_layers(self, k: int, out: torch.Tensor) -> torch.Tensor:
        """Vertical normalization of layer ``k``'s output sequence over the features of each (sample, step), then
        dropout, as between the layers of torch.nn.LSTM / GRU."""
        norm = getattr(self, f"norm_between_l{k}", None)
        if norm is not None:
            out = norm(out.flatten(0, 1)).view_as(out)
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return out

    def _finish(self, outputs: torch.Tensor, batched: bool) -> torch.Tensor:
        if not batched:
            return outputs.squeeze(1)
        return outputs.transpose(0, 1) if self.batch_first else outputs

    def extra_repr(self) -> str:
        extra = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, norm={self.norm!r}"
        if not self.bias:
            extra += ", bias=False"
        extra += f", batch_first={self.batch_first}"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.norm_between_layers is not None:
            extra += f", norm_between_layers={self.norm_between_layers!r}"
        if self.norm == "bn_step":
            extra += f", max_steps={self.max_steps}"
        return extra


_SEQUENCE_DOC_COMMON = """
    Speed: the input projections :math:`W_{ih} x_t` of all steps are one matmul before the time loop; with
    ``"none"`` and ``"ln"`` (per-sample statistics, no state) their norm and bias are applied to the whole sequence
    at once too, while ``"bn_step"``, ``"bn_shared"`` and ``"online"`` normalize them step by step. The loop is plain
    tensor code without data-dependent branches, so torch.compile(fullgraph=True) unrolls it (steps are constants).

    Args:
        input_size: features of x.
        hidden_size: H.
        num_layers: stacked layers; layer k > 0 takes layer k - 1's output sequence.
        norm: "none", "ln", "bn_step", "bn_shared" or "online" (see :mod:`normlab.layers.rnn`).
        bias: learn the ``bias_ih_l{k}``, ``bias_hh_l{k}`` vectors.
        batch_first: input and output are (N, T, features) (default True, unlike torch) instead of (T, N, features).
        dropout: probability of dropout on the output of every layer but the last (training only), as in torch.
        norm_between_layers: None, or a normlab factory spec ("bn1d", "ln", "rms", ...) for a norm applied to every
            layer's output sequence but the last, over the features of each (sample, step): "vertical"
            normalization. With "bn1d" the statistics are over batch and time together. Applied before dropout.
        max_steps: per-step statistics rows of ``"bn_step"`` (longer sequences reuse the last row).
        device, dtype: of the parameters and buffers.

    Raises:
        ValueError: on an input that is not 2-D/3-D, has T = 0 steps or the wrong feature count, an initial state
            of the wrong shape, an unknown ``norm`` (the message lists the valid names), a ``norm_between_layers``
            layer that does not take (N, C) input, dropout outside [0, 1] or a size that is not positive.

    Note:
        Training vs eval is the norm's: ``"ln"`` computes the same in both; ``"bn_step"``/``"bn_shared"`` use batch
        statistics in training (so N > 1) and running statistics in eval; ``"online"`` follows OnlineNorm1d.
        Dropout is active in training only.
"""


class NormLSTM(_NormRNNBase):
    __doc__ = (
        r"""A stack of normalized LSTM layers: torch.nn.LSTM (unidirectional, no projection) when ``norm="none"``.

    Each layer runs :class:`NormLSTMCell`'s step over the sequence. Parameters ``weight_ih_l{k}``,
    ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` have torch.nn.LSTM's names, shapes, gate order (i, f, g,
    o), order and initialisation, so its state_dict loads (see :meth:`from_torch`); the norms are submodules
    ``norm_ih_l{k}``, ``norm_hh_l{k}``, ``norm_c_l{k}`` (None for ``"none"``) and ``norm_between_l{k}``. With
    ``norm="online"`` each layer has instead ONE ``norm_gates_l{k}`` over the summed pre-activation, as in
    :class:`NormLSTMCell` (the Online Normalization authors' LSTM).

    Shape:
        input: (N, T, input_size) with ``batch_first`` (default), (T, N, input_size) without, or unbatched
        (T, input_size); hx: optional tuple (h_0, c_0) of (num_layers, N, H) ((num_layers, H) unbatched), default
        zeros. Returns ``(output, (h_n, c_n))``: output (N, T, H) / (T, N, H) / (T, H), the last layer's h at every
        step; h_n and c_n shaped like h_0.
"""
        + _SEQUENCE_DOC_COMMON
        + r"""
    Example:
        >>> import torch
        >>> from normlab.layers.rnn import NormLSTM
        >>> lstm = NormLSTM(8, 16, num_layers=2, norm="ln")
        >>> out, (h, c) = lstm(torch.randn(4, 10, 8))
        >>> tuple(out.shape), tuple(h.shape), tuple(c.shape)
        ((4, 10, 16), (2, 4, 16), (2, 4, 16))
    """
    )

    _num_gates = 4
    _torch_class = nn.LSTM
    _norm_sites = ("ih", "hh", "c")
    _joint_online = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        norm: str = "ln",
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        norm_between_layers=None,
        max_steps: int = 100,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            norm,
            bias,
            batch_first,
            dropout,
            norm_between_layers,
            max_steps,
            device,
            dtype,
        )

    def forward(
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x, batched = self._time_major(input)
        h0, c0 = (None, None) if hx is None else hx
        h0, c0 = self._initial(h0, x, batched, "hx[0] (h_0)"), self._initial(c0, x, batched, "hx[1] (c_0)")
        h_n, c_n = [], []
        for k in range(self.num_layers):
            if k > 0:
                x = self._between_layers(k - 1, x)
            x, (h, c) = self._layer(k, x, h0[k], c0[k])
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if not batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._finish(x, batched), (h_n, c_n)

    def _layer(self, k, x, h, c):
        weight_ih, weight_hh, bias_ih, bias_hh = self._layer_params(k)
        norm_ih, norm_hh, norm_c = self._layer_norms(k)
        bias = None if bias_ih is None else bias_ih + bias_hh
        sides = self._input_sides(x, weight_ih, bias, norm_ih)
        # unbind, not indexing: one backward node stacks the steps' gradients (x[t] would scatter each into zeros)
        steps = (sides if sides is not None else F.linear(x, weight_ih)).unbind(0)
        outputs = []
        weight_hh_t = weight_hh.t()
        norm_gates = getattr(self, f"norm_gates_l{k}", None)
        for t, projected in enumerate(steps):
            if norm_gates is not None:
                h, c = _lstm_step_joint(projected, h, c, weight_hh_t, norm_gates, bias)
            else:
                gi = projected if sides is not None else _add(_normalize(norm_ih, projected, t), bias)
                h, c = _lstm_step(gi, h, c, weight_hh_t, norm_hh, norm_c, t)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class NormGRU(_NormRNNBase):
    __doc__ = (
        r"""A stack of normalized GRU layers: torch.nn.GRU (unidirectional) when ``norm="none"``.

    Each layer runs :class:`NormGRUCell`'s step over the sequence (with ``"ln"``, LayerNorm separately over the
    [r, z] and n blocks, as in Ba et al.'s layer-normalized GRU). Parameters ``weight_ih_l{k}``, ``weight_hh_l{k}``,
    ``bias_ih_l{k}``, ``bias_hh_l{k}`` have torch.nn.GRU's names, shapes, gate order (r, z, n), order and
    initialisation, so its state_dict loads (see :meth:`from_torch`); the norms are submodules ``norm_ih_l{k}``,
    ``norm_hh_l{k}`` (None for ``"none"``) and ``norm_between_l{k}``.

    Shape:
        input: (N, T, input_size) with ``batch_first`` (default), (T, N, input_size) without, or unbatched
        (T, input_size); hx: optional h_0 of (num_layers, N, H) ((num_layers, H) unbatched), default zeros. Returns
        ``(output, h_n)``: output (N, T, H) / (T, N, H) / (T, H), the last layer's h at every step; h_n shaped like
        h_0.
"""
        + _SEQUENCE_DOC_COMMON
        + r"""
    Example:
        >>> import torch
        >>> from normlab.layers.rnn import NormGRU
        >>> gru = NormGRU(8, 16, num_layers=2, norm="ln", norm_between_layers="ln")
        >>> out, h = gru(torch.randn(4, 10, 8))
        >>> tuple(out.shape), tuple(h.shape)
        ((4, 10, 16), (2, 4, 16))
    """
    )

    _num_gates = 3
    _torch_class = nn.GRU
    _norm_sites = ("ih", "hh")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        norm: str = "ln",
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        norm_between_layers=None,
        max_steps: int = 100,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            norm,
            bias,
            batch_first,
            dropout,
            norm_between_layers,
            max_steps,
            device,
            dtype,
        )

    def _ln_chunks(self) -> tuple[int, ...]:
        return (2 * self.hidden_size, self.hidden_size)

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, batched = self._time_major(input)
        h0 = self._initial(hx, x, batched, "hx (h_0)")
        h_n = []
        for k in range(self.num_layers):
            if k > 0:
                x = self._between_layers(k - 1, x)
            x, h = self._layer(k, x, h0[k])
            h_n.append(h)
        h_n = torch.stack(h_n)
        return self._finish(x, batched), (h_n if batched else h_n.squeeze(1))

    def _layer(self, k, x, h):
        weight_ih, weight_hh, bias_ih, bias_hh = self._layer_params(k)
        norm_ih, norm_hh = self._layer_norms(k)
        sides = self._input_sides(x, weight_ih, bias_ih, norm_ih)
        steps = (sides if sides is not None else F.linear(x, weight_ih)).unbind(0)
        outputs = []
        weight_hh_t = weight_hh.t()
        for t, projected in enumerate(steps):
            gi = projected if sides is not None else _add(_normalize(norm_ih, projected, t), bias_ih)
            h = _gru_step(gi, h, weight_hh_t, bias_hh, norm_hh, t)
            outputs.append(h)
        return torch.stack(outputs), h
