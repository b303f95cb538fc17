"""online_norm against an independent float64 sample-by-sample transcription of the paper's equations, closed-form
exponential statistics, the control process's limit properties, and numerical robustness."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab.functional import layer_scale, online_norm
from tests.helpers import assert_same_memory_format, in_format, seeded_randn
from tests.tolerances import assert_close

# ---- the reference: Chiley et al. 2019 (arXiv 1905.05894), Eq. for forward and backward, one sample at a time ------


class StepwiseOnlineNorm:
    """A literal transcription: a Python loop over samples, each sample (C, *) processed with the state as it
    stands, the mini-batch being the samples in batch order (the authors' rule). float64 throughout."""

    def __init__(self, c, alpha_fwd, alpha_bkw, eps, weight=None, bias=None, layer_scaling=True):
        self.mu = torch.zeros(c, dtype=torch.float64)
        self.var = torch.ones(c, dtype=torch.float64)
        self.eps_1 = torch.zeros(c, dtype=torch.float64)  # epsilon^(1): the gradient-mean accumulator
        self.eps_y = torch.zeros(c, dtype=torch.float64)  # epsilon^(y): the projection-on-y accumulator
        self.af, self.ab, self.eps = alpha_fwd, alpha_bkw, eps
        self.weight, self.bias, self.layer_scaling = weight, bias, layer_scaling

    def _expand(self, v, like):
        return v.reshape((-1,) + (1,) * (like.dim() - 1))

    def forward(self, x):
        """x: (N, C, *) float64. Returns z and keeps what the backward needs."""
        self.cache = []
        outs = []
        for xt in x:
            spatial = tuple(range(1, xt.dim()))
            m = xt.mean(spatial) if spatial else xt.clone()
            s = ((xt - self._expand(m, xt)) ** 2).mean(spatial) if spatial else torch.zeros_like(xt)
            sigma = torch.sqrt(self.var + self.eps)
            y = (xt - self._expand(self.mu, xt)) / self._expand(sigma, xt)
            # the variance update uses mu_{t-1}, so it comes first
            self.var = self.af * self.var + (1 - self.af) * s + self.af * (1 - self.af) * (m - self.mu) ** 2
            self.mu = self.af * self.mu + (1 - self.af) * m
            h = y
            if self.weight is not None:
                h = h * self._expand(self.weight, y) + self._expand(self.bias, y)
            rms = torch.sqrt((h**2).mean() + self.eps) if self.layer_scaling else None
            z = h / rms if self.layer_scaling else h
            self.cache.append((y, sigma, z, rms))
            outs.append(z)
        return torch.stack(outs)

    def backward(self, dz):
        """dz: (N, C, *). Returns dx, dweight, dbias (the latter None without affine)."""
        dxs = []
        dw = torch.zeros_like(self.mu)
        db = torch.zeros_like(self.mu)
        for (y, sigma, z, rms), dzt in zip(self.cache, dz):
            spatial = tuple(range(1, y.dim()))

            def smean(t, spatial=spatial):
                return t.mean(spatial) if spatial else t

            dh = (dzt - z * (dzt * z).mean()) / rms if self.layer_scaling else dzt
            dy = dh
            if self.weight is not None:
                dw += (dh * y).sum(spatial) if spatial else dh * y
                db += dh.sum(spatial) if spatial else dh
                dy = dh * self._expand(self.weight, y)
            # the control process, Chiley et al. section 3 (the authors' u = eps^(1), v = eps^(y))
            dx_tilde = dy - (1 - self.ab) * self._expand(self.eps_y, y) * y
            self.eps_y = self.eps_y + smean(dx_tilde * y)
            dx = dx_tilde / self._expand(sigma, y) - (1 - self.ab) * self._expand(self.eps_1, y)
            self.eps_1 = self.eps_1 + smean(dx)
            dxs.append(dx)
        return torch.stack(dxs), dw, db


def fresh_state(c, dtype=torch.float64):
    return [torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype),
            torch.zeros(c, dtype=dtype)]  # fmt: skip


def run_stream(batches, grads, c, *, alpha_fwd, alpha_bkw, eps, weight, bias, layer_scaling, state=None):
    """online_norm over the stream, one backward per step: (outputs, input grads, weight grads, bias grads, state)."""
    state = fresh_state(c) if state is None else state
    outs, dxs, dws, dbs = [], [], [], []
    for x, g in zip(batches, grads):
        x = x.clone().requires_grad_()
        w = None if weight is None else weight.clone().requires_grad_()
        b = None if bias is None else bias.clone().requires_grad_()
        y = online_norm(x, *state, w, b, alpha_fwd, alpha_bkw, eps, True, layer_scaling)
        y.backward(g)
        outs.append(y.detach())
        dxs.append(x.grad)
        if w is not None:
            dws.append(w.grad)
            dbs.append(b.grad)
    return outs, dxs, dws, dbs, state


def run_reference(batches, grads, c, *, alpha_fwd, alpha_bkw, eps, weight, bias, layer_scaling):
    ref = StepwiseOnlineNorm(c, alpha_fwd, alpha_bkw, eps, weight, bias, layer_scaling)
    outs, dxs, dws, dbs = [], [], [], []
    for x, g in zip(batches, grads):
        outs.append(ref.forward(x))
        dx, dw, db = ref.backward(g)
        dxs.append(dx)
        dws.append(dw)
        dbs.append(db)
    return outs, dxs, dws, dbs, [ref.mu, ref.var, ref.eps_1, ref.eps_y]


SPATIAL = {"NC": (), "NCL": (5,), "NCHW": (3, 4)}


def make_stream(batch_sizes, c, spatial, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batches, grads = [], []
    for step, n in enumerate(batch_sizes):
        # a drifting, non-standard stream so that every term of the recurrences matters
        x = torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64) * 1.7 + 0.8 + 0.05 * step
        batches.append(x)
        grads.append(torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64) + 0.3)
    return batches, grads


def compare_with_reference(batch_sizes, layout, affine, layer_scaling, alpha_fwd=0.8, alpha_bkw=0.7, eps=1e-3):
    c = 3
    batches, grads = make_stream(batch_sizes, c, SPATIAL[layout])
    weight = torch.tensor([0.7, 1.3, -0.9], dtype=torch.float64) if affine else None
    bias = torch.tensor([0.2, -0.4, 0.1], dtype=torch.float64) if affine else None
    kw = dict(alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw, eps=eps, weight=weight, bias=bias, layer_scaling=layer_scaling)
    actual = run_stream(batches, grads, c, **kw)
    expected = run_reference(batches, grads, c, **kw)
    for name, a_list, e_list in zip(("output", "input grad", "weight grad", "bias grad"), actual, expected):
        for step, (a, e) in enumerate(zip(a_list, e_list)):
            assert_close(a, e, msg=f"{name}, step {step}")
    for name, a, e in zip(("running_mean", "running_var", "control_mean", "control_proj"), actual[4], expected[4]):
        assert_close(a, e, msg=name)


@pytest.mark.parametrize("layout", list(SPATIAL))
@pytest.mark.parametrize(("affine", "layer_scaling"), [(False, False), (True, True), (False, True)])
def test_batch_size_one_stream_matches_stepwise_reference(layout, affine, layer_scaling):
    compare_with_reference([1] * 20, layout, affine, layer_scaling)


@pytest.mark.parametrize("layout", list(SPATIAL))
@pytest.mark.parametrize(("affine", "layer_scaling"), [(False, False), (True, True)])
def test_minibatch_stream_matches_stepwise_reference(layout, affine, layer_scaling):
    compare_with_reference([4, 1, 3, 17, 2, 8, 5], layout, affine, layer_scaling)


def test_paper_default_decays_match_reference():
    compare_with_reference([5, 1, 9], "NCHW", True, True, alpha_fwd=0.999, alpha_bkw=0.99, eps=1e-5)


def test_decay_zero_tracks_the_last_sample():
    # alpha_fwd = 0: the state is the last sample's mean and variance; alpha_bkw = 0: plain accumulators
    compare_with_reference([3, 2], "NCL", False, False, alpha_fwd=0.0, alpha_bkw=0.0)


# ---- the mini-batch rule ------------------------------------------------------------------------------------------


@given(
    n=st.sampled_from([1, 2, 3, 7, 13]),
    spatial=st.sampled_from([(), (3,), (2, 5)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layer_scaling=st.booleans(),
)
def test_batch_of_n_equals_n_single_sample_steps(n, spatial, dtype, layer_scaling):
    c = 5
    x = seeded_randn((n, c, *spatial), dtype) * 2 + 1
    g = seeded_randn((n, c, *spatial), dtype).flip(0)
    w, b = torch.linspace(0.5, 1.5, c, dtype=dtype), torch.linspace(-0.3, 0.3, c, dtype=dtype)
    batched = fresh_state(c, dtype)
    x1 = x.clone().requires_grad_()
    y_batch = online_norm(x1, *batched, w, b, 0.9, 0.8, 1e-5, True, layer_scaling)
    y_batch.backward(g)
    single = fresh_state(c, dtype)
    ys, dxs = [], []
    for i in range(n):
        xi = x[i : i + 1].clone().requires_grad_()
        yi = online_norm(xi, *single, w, b, 0.9, 0.8, 1e-5, True, layer_scaling)
        yi.backward(g[i : i + 1])
        ys.append(yi.detach())
        dxs.append(xi.grad)
    scale = 10.0 if dtype == torch.float32 else 1.0  # the scan sums in another order than the loop
    assert_close(y_batch.detach(), torch.cat(ys), scale=scale)
    assert_close(x1.grad, torch.cat(dxs), scale=scale)
    for a, e in zip(batched, single):
        assert_close(a, e, scale=scale)


# ---- eval ---------------------------------------------------------------------------------------------------------


def test_eval_normalizes_with_the_state_and_leaves_it_alone():
    c = 4
    state = [torch.randn(c).double(), torch.rand(c).double() + 0.5, torch.randn(c).double(), torch.randn(c).double()]
    before = [s.clone() for s in state]
    x = torch.randn(6, c, 3, 3, dtype=torch.float64, requires_grad=True)
    y = online_norm(x, *state, alpha_fwd=0.9, eps=1e-3, training=False, layer_scaling=False)
    expected = (x - state[0].view(1, c, 1, 1)) / torch.sqrt(state[1].view(1, c, 1, 1) + 1e-3)
    assert_close(y, expected)
    y.backward(torch.randn_like(y))
    for a, e in zip(state, before):
        assert torch.equal(a, e)


def test_eval_gradient_is_the_plain_derivative():
    state = [torch.randn(3).double(), torch.rand(3).double() + 0.5, torch.zeros(3).double(), torch.zeros(3).double()]
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: online_norm(x, *state, w, b, training=False), (x, w, b))


def test_train_and_eval_outputs_agree_for_one_sample():
    c = 3
    x = torch.randn(1, c, 4, dtype=torch.float64) * 3 + 2
    state = [torch.randn(c).double(), torch.rand(c).double() + 0.5, torch.zeros(c).double(), torch.zeros(c).double()]
    y_eval = online_norm(x, *[s.clone() for s in state], training=False)
    y_train = online_norm(x, *state, training=True)
    assert_close(y_train, y_eval)


def test_training_gradient_is_the_plain_derivative_only_while_the_accumulators_are_zero():
    c = 2
    state = fresh_state(c)
    grads, sigmas = [], []
    for _ in range(2):
        x = torch.randn(1, c, 3, dtype=torch.float64, requires_grad=True)
        sigmas.append(torch.sqrt(state[1] + 1e-5).view(1, c, 1))
        online_norm(x, *state, layer_scaling=False).backward(torch.ones(1, c, 3, dtype=torch.float64))
        grads.append(x.grad)
    assert state[2].abs().min() > 0 and state[3].abs().min() > 0
    assert_close(grads[0], 1 / sigmas[0].expand(1, c, 3))  # first step: both accumulators start at 0
    assert (grads[1] - 1 / sigmas[1]).abs().min() > 1e-3


# ---- closed forms -------------------------------------------------------------------------------------------------


@given(
    n=st.sampled_from([1, 2, 5, 11]),
    steps=st.integers(1, 4),
    spatial=st.sampled_from([(), (4,), (3, 2)]),
    alpha=st.sampled_from([0.0, 0.5, 0.9, 0.999]),
)
def test_state_is_the_exponentially_weighted_mixture_of_the_samples(n, steps, spatial, alpha):
    """After T samples with means m_j and variances s_j: mu_T = a^T mu_0 + sum_j w_j m_j and
    var_T = a^T (var_0 + (mu_0 - mu_T)^2) + sum_j w_j (s_j + (m_j - mu_T)^2), w_j = (1 - a) a^(T - 1 - j):
    the variance of the mixture that weights the initial state a^T and sample j w_j."""
    c = 3
    gen = torch.Generator().manual_seed(n * 31 + steps)
    mu0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    var0 = torch.tensor([1.5, 0.3, 2.0], dtype=torch.float64)
    state = [mu0.clone(), var0.clone(), torch.zeros(c).double(), torch.zeros(c).double()]
    xs = [torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(steps)]
    for x in xs:
        online_norm(x, *state, alpha_fwd=alpha)
    samples = torch.cat(xs).reshape(n * steps, c, -1)  # (T, C, S)
    m = samples.mean(-1)
    s = samples.var(-1, correction=0)
    t = m.shape[0]
    w = (1 - alpha) * alpha ** torch.arange(t - 1, -1, -1, dtype=torch.float64)
    mu_t = alpha**t * mu0 + (w[:, None] * m).sum(0)
    var_t = alpha**t * (var0 + (mu0 - mu_t) ** 2) + (w[:, None] * (s + (m - mu_t) ** 2)).sum(0)
    assert_close(state[0], mu_t, scale=100)
    assert_close(state[1], var_t, scale=100)


def test_state_approaches_the_true_statistics_of_a_long_stationary_stream():
    c, true_mean, true_std = 2, torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5])
    state = fresh_state(c, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):  # 3000 samples of 64 values; alpha 0.99 averages over ~200 samples
        x = torch.randn(100, c, 8, 8, generator=gen) * true_std.view(1, c, 1, 1) + true_mean.view(1, c, 1, 1)
        online_norm(x, *state, alpha_fwd=0.99)
    torch.testing.assert_close(state[0], true_mean, rtol=0, atol=0.05)
    torch.testing.assert_close(state[1], true_std**2, rtol=0.05, atol=0)


def test_layer_scaling_divides_each_sample_by_its_rms_over_all_features():
    h = torch.randn(3, 4, 5, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]).double().view(3, 1, 1)
    z = layer_scale(h, eps=0.0)
    assert_close(z.square().mean((1, 2)), torch.ones(3, dtype=torch.float64))
    assert_close(z / h, 1 / h.square().mean((1, 2), keepdim=True).sqrt().expand_as(h))


# ---- the control process's limit (Chiley et al., section 3: orthogonal to y and zero-mean) ------------------------


def test_gradient_is_zero_mean_and_orthogonal_to_the_output_over_a_long_stream():
    """Summed over the stream, the control terms cancel the gradient's mean and its projection on y up to the
    bounded accumulators: sum_t mean(x'_t) = eps1_T - eps1_0 and sum_t mean(x~'_t y_t) = epsy_T - epsy_0, so the
    averages fall as 1 / T. A raw gradient with a large mean and y-component keeps both."""
    c, steps, n = 3, 100, 100
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 1.0, 0.5])
    state = [mean.double(), (std**2).double(), torch.zeros(c).double(), torch.zeros(c).double()]
    sum_g = sum_gy = sum_dx = sum_dxy = 0
    for _ in range(steps):
        x = (torch.randn(n, c, 4, generator=gen) * std.view(1, c, 1) + mean.view(1, c, 1)).double()
        y_exact = (x - mean.view(1, c, 1)) / std.view(1, c, 1)
        g = 0.7 + 0.9 * y_exact + 0.3 * torch.randn(x.shape, generator=gen).double()
        x.requires_grad_()
        y = online_norm(x, *state, alpha_fwd=0.999, alpha_bkw=0.99, layer_scaling=False)
        y.backward(g)
        sum_g += g.mean(2).sum(0)
        sum_gy += (g * y.detach()).mean(2).sum(0)
        sum_dx += x.grad.mean(2).sum(0)
        sum_dxy += (x.grad * y.detach()).mean(2).sum(0)
    samples = steps * n
    assert_close(sum_dx, state[2], scale=1e3)  # the accumulator is the running sum of the gradient's means
    # raw: mean 0.7 and projection ~0.9 per sample; after the control process both are 30x smaller or more
    assert (sum_g / samples).abs().min() > 0.6 and (sum_gy / samples).abs().min() > 0.8
    assert (sum_dx * std / samples).abs().max() < 0.02
    assert (sum_dxy * std / samples).abs().max() < 0.02
    # the accumulators settle at (mean or projection) / (1 - alpha_bkw), they do not grow with the stream
    assert state[2].abs().max() < 0.7 / 0.01 / 0.5 * 1.2 and state[3].abs().max() < 0.9 / 0.01 * 1.2


# ---- numerical robustness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "offset"), [(torch.float32, 1e4), (torch.bfloat16, 100.0)])
def test_large_offset_normalizes_with_converged_state(dtype, offset):
    # values offset +- 1 are exact in both dtypes; each sample's own variance is 1 over its 4x4 positions, which a
    # naive E[x^2] - E[x]^2 would lose to cancellation (1e8 + 1 - 1e8 in float32)
    c = 3
    signs = torch.randint(0, 2, (64, c, 4, 4), generator=torch.Generator().manual_seed(0)) * 2 - 1
    signs = torch.cat([signs, -signs])  # exactly mean 0, variance 1 per channel over the batch and positions
    x = (offset + signs.double()).to(dtype)
    state = [torch.full((c,), offset), torch.ones(c), torch.zeros(c), torch.zeros(c)]
    y = online_norm(x, *state, alpha_fwd=0.999, layer_scaling=False).double()
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert mean.abs().max() < 1e-2
    assert (var.sqrt() - 1).abs().max() < 1e-2
    assert (state[0] - offset).abs().max() < 1e-2 and (state[1] - 1).abs().max() < 1e-2
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_float64_on_the_same_input(dtype):
    c = 4
    x = (seeded_randn((6, c, 3, 5), torch.float64) * 3 + 2).to(dtype)
    g = seeded_randn((6, c, 3, 5), torch.float64).flip(0).to(dtype)
    ours = fresh_state(c, torch.float32)
    ref = fresh_state(c, torch.float64)
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    ys = [online_norm(xs[0], *ours, alpha_fwd=0.9), online_norm(xs[1], *ref, alpha_fwd=0.9)]
    ys[0].backward(g)
    ys[1].backward(g.double())
    assert ys[0].dtype == dtype and xs[0].grad.dtype == dtype
    assert_close(ys[0], ys[1], scale=2)
    assert_close(xs[0].grad, xs[1].grad, scale=2)
    for a, e in zip(ours, ref):
        assert a.dtype == torch.float32
        assert_close(a, e, dtype=torch.float32, scale=10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_memory_format_is_preserved(channels_last):
    x = in_format(torch.randn(3, 4, 5, 6), channels_last).requires_grad_()
    y = online_norm(x, *fresh_state(4, torch.float32))
    y.backward(torch.ones_like(y))
    assert_same_memory_format(y, x)
    contiguous = online_norm(x.detach().contiguous(), *fresh_state(4, torch.float32))
    assert_close(y.detach(), contiguous)


# ---- bad arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha_fwd": 1.0}, r"alpha_fwd=1\.0 must be a decay factor in \[0, 1\)"),
        ({"alpha_fwd": -0.1}, r"alpha_fwd=-0\.1"),
        ({"alpha_bkw": 1.5}, r"alpha_bkw=1\.5"),
        ({"alpha_bkw": math.nan}, r"alpha_bkw=nan"),
        ({"eps": 0.0}, r"eps=0\.0"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        online_norm(torch.randn(2, 3), *fresh_state(3, torch.float32), **kwargs)
