"""moving_average_batch_norm and center_weight against a float64 step-by-step reference of MABN's equations (Yan et
al., 2020, arXiv 2001.06838, as the authors' code github.com/megvii-model/MABN computes them), batch norm during
warm-up, closed-form statistics, low precision and bad arguments."""

import math
from collections import deque

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from normlab.functional import center_weight, moving_average_batch_norm
from tests.helpers import assert_same_memory_format, in_format, seeded_randn
from tests.tolerances import assert_close

DIMS = (0, 2, 3)


class PaperMABN:
    """MABN's training step written out literally in float64, with its own state: a history of the last m batches'
    second moments and Psi, the EMA of the second moment and the step count t (1-based).

    Forward:  chi2_B = E_B[x^2];  chi2_bar = mean of the last m chi2_B if t > max(warmup, m) else chi2_B;
              r = clip(sqrt((chi2_bar + eps) / (ema + eps)), 1/r_max, r_max) if t > max(renorm_after, warmup) else 1;
              x_hat = r x / sqrt(chi2_bar + eps);  y = gamma x_hat + beta;
              ema <- (1 - momentum) ema + momentum chi2_bar.
    Backward: G = gamma dL/dy;  Psi_B = E_B[x_hat G];  Psi_bar = mean of the last m Psi_B (same switch);
              dL/dx = (r G - x / sqrt(chi2_bar + eps) Psi_bar) / sqrt(chi2_bar + eps);
              dL/dgamma = sum(dL/dy x_hat);  dL/dbeta = sum(dL/dy).
    """

    def __init__(self, c, *, buffer_size, momentum, eps, warmup_iters, r_max, renorm_after):
        self.m, self.momentum, self.eps = buffer_size, momentum, eps
        self.warmup_iters, self.r_max, self.renorm_after = warmup_iters, r_max, renorm_after
        self.chi2_history = deque(maxlen=buffer_size)
        self.psi_history = deque(maxlen=buffer_size)
        self.slots = deque(maxlen=buffer_size)
        self.ema = torch.ones(c, dtype=torch.float64)
        self.t = 0

    def step(self, x, gamma, beta, dy):
        x, gamma, beta, dy = (t.double() for t in (x, gamma, beta, dy))
        view = lambda v: v.view(1, -1, 1, 1)
        self.t += 1
        self.slots.append((self.t - 1) % self.m)
        moving = self.t > max(self.warmup_iters, self.m)
        renormalize = self.t > max(self.renorm_after, self.warmup_iters)

        chi2_batch = (x * x).mean(DIMS)
        self.chi2_history.append(chi2_batch)
        chi2_bar = torch.stack(list(self.chi2_history)).mean(0) if moving else chi2_batch
        sigma = torch.sqrt(chi2_bar + self.eps)
        if renormalize:
            r = torch.clamp(sigma / torch.sqrt(self.ema + self.eps), 1 / self.r_max, self.r_max)
        else:
            r = torch.ones_like(sigma)
        x_hat = view(r) * x / view(sigma)
        y = view(gamma) * x_hat + view(beta)
        self.ema = (1 - self.momentum) * self.ema + self.momentum * chi2_bar

        grad_x_hat = dy * view(gamma)
        psi_batch = (x_hat * grad_x_hat).mean(DIMS)
        self.psi_history.append(psi_batch)
        psi_bar = torch.stack(list(self.psi_history)).mean(0) if moving else psi_batch
        grad_x = (view(r) * grad_x_hat - x / view(sigma) * view(psi_bar)) / view(sigma)
        return y, grad_x, (dy * x_hat).sum(DIMS), dy.sum(DIMS), r

    def window(self, history):
        """The history laid out as the functional's (m, C) ring buffer: batch t in slot (t - 1) % m."""
        out = torch.zeros(self.m, history[0].numel(), dtype=torch.float64)
        for slot, value in zip(self.slots, history, strict=True):
            out[slot] = value
        return out


def _state(c, m, dtype=torch.float64):
    return {
        "running_var": torch.ones(c, dtype=dtype),
        "x2_window": torch.zeros(m, c, dtype=dtype),
        "psi_window": torch.zeros(m, c, dtype=dtype),
        "num_batches_tracked": torch.zeros((), dtype=torch.long),
    }


def _train_step(x, state, weight, bias, g, **kw):
    """One functional training step with fresh leaves: (y, x.grad, weight.grad, bias.grad)."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = moving_average_batch_norm(x, *state.values(), weight, bias, training=True, **kw)
    y.backward(g.to(y.dtype))
    return y.detach(), x.grad, weight.grad, bias.grad


# Every phase within ten steps: batch statistics for t <= max(warmup, m) = 3, moving averages from t = 4, r from t = 6.
# Shapes and scales change across steps, so that r is sometimes clipped (r_max = 1.3) and sometimes not.
SCHEDULE = dict(buffer_size=3, momentum=0.3, eps=1e-3, warmup_iters=2, r_max=1.3, renorm_after=5)
STEPS = [
    ((2, 4, 3, 5), 1.0),
    ((1, 4, 6, 2), 1.5),
    ((3, 4, 2, 2), 0.7),
    ((2, 4, 3, 5), 1.2),
    ((2, 4, 1, 7), 2.5),
    ((2, 4, 3, 3), 0.5),
    ((4, 4, 2, 3), 1.1),
    ((2, 4, 3, 5), 0.9),
    ((2, 4, 5, 1), 3.0),
    ((1, 4, 4, 4), 1.0),
]


def test_training_steps_match_float64_reference_of_the_equations():
    kw = {k: v for k, v in SCHEDULE.items() if k != "buffer_size"}
    ref = PaperMABN(4, **SCHEDULE)
    state = _state(4, SCHEDULE["buffer_size"])
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    bias = torch.rand(4, dtype=torch.float64) - 0.5
    rs = []
    for shape, scale in STEPS:
        x = torch.randn(shape, dtype=torch.float64) * scale + 0.2
        g = torch.randn(shape, dtype=torch.float64)
        actual = _train_step(x, state, weight, bias, g, **kw)
        *expected, r = ref.step(x, weight, bias, g)
        rs.append(r)
        for name, a, e in zip(["y", "grad_x", "grad_weight", "grad_bias"], actual, expected, strict=True):
            assert_close(a, e, msg=f"t={ref.t} {name}")
        assert_close(state["running_var"], ref.ema, msg=f"t={ref.t} running_var")
        assert_close(state["x2_window"], ref.window(ref.chi2_history), msg=f"t={ref.t} x2_window")
        assert_close(state["psi_window"], ref.window(ref.psi_history), msg=f"t={ref.t} psi_window")
        assert int(state["num_batches_tracked"]) == ref.t
    # the schedule really went through every regime: r = 1, r clipped at both ends or one, and r strictly inside
    late = torch.stack(rs[SCHEDULE["renorm_after"] :])
    assert torch.equal(torch.stack(rs[: SCHEDULE["renorm_after"]]), torch.ones(5, 4, dtype=torch.float64))
    assert bool(((late - 1.3).abs() < 1e-12).any() | ((late - 1 / 1.3).abs() < 1e-12).any())
    assert bool(((late > 1 / 1.3 + 1e-6) & (late < 1.3 - 1e-6) & ((late - 1).abs() > 1e-3)).any())


def _uncentered_batch_norm(x, weight, bias, eps):
    """Batch norm without centering, in plain autograd ops: what MABN computes during warm-up."""
    x2 = x.square().mean(DIMS, keepdim=True)
    return (x / torch.sqrt(x2 + eps)) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_warmup_is_batch_norm_without_centering_with_its_exact_gradient():
    state = _state(3, 4)
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    for step in range(6):  # t <= max(warmup_iters=6, m=4)
        x, g = torch.randn(2, 3, 4, 5, dtype=torch.float64) * (1 + step) + 0.5, torch.randn(2, 3, 4, 5)
        actual = _train_step(x, state, weight, bias, g, warmup_iters=6, eps=1e-4)
        xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
        y = _uncentered_batch_norm(xr, wr, br, 1e-4)
        y.backward(g.double())
        for a, e in zip(actual, [y.detach(), xr.grad, wr.grad, br.grad], strict=True):
            assert_close(a, e)


def test_warmup_equals_torch_batch_norm_for_zero_mean_batches():
    """With zero batch mean the second moment is the variance, so forward is torch's batch norm; the input gradients
    agree when the output gradient has zero batch mean too (batch norm's extra term is that mean, g_B)."""
    state = _state(3, 16)
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2
    x = x - x.mean(DIMS, keepdim=True)
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    g = g - g.mean(DIMS, keepdim=True)
    actual = _train_step(x, state, weight, bias, g)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = F.batch_norm(xr, None, None, wr, br, training=True, eps=1e-5)
    y.backward(g)
    for a, e in zip(actual, [y.detach(), xr.grad, wr.grad, br.grad], strict=True):
        assert_close(a, e)


def test_eval_uses_running_var_and_changes_no_state():
    state = _state(3, 4)
    state["running_var"].uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in state.items()}
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 3 + 1
    y = moving_average_batch_norm(x, *state.values(), weight, bias, training=False, eps=1e-5)
    expected = x / torch.sqrt(state["running_var"] + 1e-5).view(1, -1, 1, 1) * weight.view(1, -1, 1, 1)
    assert_close(y, expected + bias.view(1, -1, 1, 1))
    for k, v in state.items():
        assert torch.equal(v, before[k]), k
    # without running statistics, eval normalizes with the batch's second moment (as batch_norm does)
    assert_close(moving_average_batch_norm(x, None, eps=1e-5), _uncentered_batch_norm(x, torch.ones(3), 0 * bias, 1e-5))


def test_two_calls_in_one_graph_each_record_their_psi():
    state = _state(3, 2, torch.float32)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    kw = dict(training=True, warmup_iters=0)
    y1 = moving_average_batch_norm(x, *state.values(), **kw)
    y2 = moving_average_batch_norm(2 * x, *state.values(), **kw)
    (y1.sum() + y2.square().sum()).backward()
    assert int(state["num_batches_tracked"]) == 2
    assert_close(state["psi_window"][0], y1.detach().mean(DIMS))  # Psi = E[x_hat * 1]
    assert_close(state["psi_window"][1], 2 * y2.detach().square().mean(DIMS))  # Psi = E[x_hat * 2 x_hat]


@given(
    n=st.sampled_from([1, 2, 3]),
    c=st.sampled_from([1, 3, 5]),
    hw=st.sampled_from([(1, 2), (3, 5), (7, 7)]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    channels_last=st.booleans(),
    moving=st.booleans(),
)
def test_normalized_output_has_unit_second_moment(n, c, hw, dtype, channels_last, moving):
    """With identity affine, each channel's output has mean square 1 over (N, H, W) in warm-up, and the ratio of the
    batch's to the moving second moment once the moving average is in use."""
    state = _state(c, 2, dtype)
    state["x2_window"].fill_(4.0)
    state["num_batches_tracked"].fill_(5 if moving else 0)
    x = in_format(seeded_randn((n, c) + hw, dtype) * 2 + 0.5, channels_last)
    y = moving_average_batch_norm(x, *state.values(), training=True, warmup_iters=0, eps=1e-6)
    assert y.dtype == dtype
    assert_same_memory_format(y, x)
    x2 = x.double().square().mean(DIMS)
    expected = x2 / ((x2 + 4.0) / 2) if moving else torch.ones(c, dtype=torch.float64)
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(y.double().square().mean(DIMS), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)])
def test_large_offset_normalizes_to_unit_second_moment(dtype, offset):
    """MABN does not center (by design: the preceding centered conv does), so the check is on the second moment,
    which a mean of squares computes without cancellation."""
    x = (torch.randn(4, 3, 8, 8, dtype=torch.float64) + offset).to(dtype)
    state = _state(3, 4, dtype)
    y = moving_average_batch_norm(x, *state.values(), training=True)
    assert (y.double().square().mean(DIMS) - 1).abs().max() < 1e-2
    assert (state["x2_window"][0].double() / offset**2 - 1).abs().max() < 1e-2


@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_matches_float32(channels_last):
    kw = dict(warmup_iters=1, renorm_after=0)
    s16, s32 = _state(3, 2, torch.bfloat16), _state(3, 2, torch.float32)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    for _ in range(4):
        x, g = in_format(torch.randn(2, 3, 5, 5), channels_last), torch.randn(2, 3, 5, 5)
        x16 = x.to(torch.bfloat16)
        low = _train_step(x16, s16, w.to(torch.bfloat16), b.to(torch.bfloat16), g.to(torch.bfloat16), **kw)
        high = _train_step(x16.float(), s32, w, b, g.to(torch.bfloat16).float(), **kw)
        assert low[0].dtype == low[1].dtype == torch.bfloat16
        assert_same_memory_format(low[1], x16)
        for a, e in zip(low, high, strict=True):
            assert_close(a, e, dtype=torch.bfloat16, scale=2)
    assert_close(s16["running_var"], s32["running_var"], dtype=torch.bfloat16)


def test_center_weight_has_zero_mean_per_output_channel():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * 2 + 7
    c = center_weight(w)
    assert c.abs().sum() > 1
    assert c.mean((1, 2, 3)).abs().max() < 1e-12
    assert_close(c, w - w.mean((1, 2, 3), keepdim=True))
    w16 = w.to(torch.bfloat16)
    assert center_weight(w16).dtype == torch.bfloat16
    assert_close(center_weight(w16), center_weight(w16.double()))
    assert torch.equal(center_weight(torch.randn(4, 1, 1, 1)), torch.zeros(4, 1, 1, 1))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(momentum=None), r"momentum=None"),
        (dict(momentum=1.5), r"momentum=1.5"),
        (dict(warmup_iters=-1), r"warmup_iters=-1"),
        (dict(warmup_iters=2.5), r"warmup_iters=2.5"),
        (dict(renorm_after=-3), r"renorm_after=-3"),
        (dict(r_max=0.5), r"r_max=0.5"),
        (dict(r_max=math.inf), r"r_max=inf"),
    ],
)
def test_bad_arguments_raise(kw, match):
    state = _state(3, 2, torch.float32)
    with pytest.raises(ValueError, match=match):
        moving_average_batch_norm(torch.randn(2, 3, 4, 4), *state.values(), training=True, **kw)


def test_bad_state_and_input_raise():
    x = torch.randn(2, 3, 4, 4)
    state = _state(3, 2, torch.float32)
    with pytest.raises(ValueError, match=r"got None for x2_window, psi_window, num_batches_tracked"):
        moving_average_batch_norm(x, state["running_var"], training=True)
    with pytest.raises(ValueError, match=r"running_var has shape \(4,\), expected \(3,\)"):
        moving_average_batch_norm(x, torch.ones(4), *list(state.values())[1:], training=True)
    with pytest.raises(ValueError, match=r"x2_window has shape \(2, 4\)"):
        moving_average_batch_norm(
            x, state["running_var"], torch.zeros(2, 4), torch.zeros(2, 4), state["num_batches_tracked"], training=True
        )
    with pytest.raises(ValueError, match=r"psi_window has shape \(3, 3\)"):
        moving_average_batch_norm(
            x, state["running_var"], state["x2_window"], torch.zeros(3, 3), state["num_batches_tracked"], training=True
        )
    with pytest.raises(ValueError, match=r"num_batches_tracked must be a one-element integer tensor"):
        moving_average_batch_norm(x, *list(state.values())[:3], torch.zeros(()), training=True)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3, 1, 1\)"):
        moving_average_batch_norm(torch.randn(1, 3, 1, 1), *state.values(), training=True)
    assert int(state["num_batches_tracked"]) == 0 and not state["x2_window"].any()
