"""OnlineNorm1d/2d: module against the functional reference, stream state (buffers, checkpoints, eval), training at
any batch size, torch.compile, and bad input."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab.functional import online_norm
from normlab.layers import OnlineNorm1d, OnlineNorm2d
from tests.helpers import in_format, randomize_affine, seeded_randn
from tests.tolerances import assert_close

C = 5
STATE = ("running_mean", "running_var", "control_mean", "control_proj")
LAYOUTS = [(OnlineNorm1d, ()), (OnlineNorm1d, (7,)), (OnlineNorm2d, (3, 4))]


def stream_input(cls_spatial, n, step, dtype=torch.float32):
    return torch.randn((n, C, *cls_spatial), dtype=torch.float64).mul(1.5).add(0.5 + 0.1 * step).to(dtype)


def functional_step(module, state, x, g):
    """The same step through online_norm directly, on copies of the parameters and the given state."""
    x = x.clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_() for p in (module.weight, module.bias)]
    y = online_norm(
        x, *state, *params, module.alpha_fwd, module.alpha_bkw, module.eps, module.training, module.layer_scaling
    )
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in params if p is not None]


def module_step(module, x, g):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize(("cls", "spatial"), LAYOUTS)
@pytest.mark.parametrize(("affine", "layer_scaling"), [(True, True), (False, True), (True, False)])
def test_module_matches_functional_over_a_stream(cls, spatial, affine, layer_scaling):
    module = randomize_affine(cls(C, alpha_fwd=0.9, alpha_bkw=0.8, affine=affine, layer_scaling=layer_scaling))
    state = [torch.zeros(C), torch.ones(C), torch.zeros(C), torch.zeros(C)]
    for step, (n, training) in enumerate([(1, True), (3, True), (17, True), (4, False), (2, True)]):
        module.train(training)
        x = stream_input(spatial, n, step)
        g = torch.randn_like(x)
        actual, expected = module_step(module, x, g), functional_step(module, state, x, g)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, msg=f"step {step}, tensor {i}")
        for name, e in zip(STATE, state):
            assert_close(getattr(module, name), e, msg=f"step {step}, {name}")


def test_buffers_are_persistent_and_keep_full_precision():
    module = OnlineNorm2d(C)
    assert set(STATE) <= set(module.state_dict())
    assert all(getattr(OnlineNorm1d(C, dtype=torch.bfloat16), n).dtype == torch.float32 for n in STATE)
    assert all(getattr(OnlineNorm1d(C, dtype=torch.float64), n).dtype == torch.float64 for n in STATE)
    assert OnlineNorm1d(C, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


def test_bfloat16_module_tracks_the_stream_like_float32():
    ref, low = OnlineNorm2d(C), OnlineNorm2d(C, dtype=torch.bfloat16)
    for step in range(5):
        x = stream_input((3, 3), 4, step, torch.bfloat16)
        y_low, y_ref = low(x.requires_grad_()), ref(x.float())
        assert y_low.dtype == torch.bfloat16
        assert_close(y_low, y_ref, dtype=torch.bfloat16)
    for name in STATE[:2]:
        assert_close(getattr(low, name), getattr(ref, name))


@pytest.mark.parametrize(("cls", "spatial"), LAYOUTS)
def test_checkpoint_resumes_the_stream(cls, spatial):
    module = randomize_affine(cls(C, alpha_fwd=0.8, alpha_bkw=0.7))
    for step in range(3):
        module_step(module, stream_input(spatial, 3, step), torch.randn(3, C, *spatial))
    restored = cls(C, alpha_fwd=0.8, alpha_bkw=0.7)
    restored.load_state_dict(copy.deepcopy(module.state_dict()))
    x, g = stream_input(spatial, 4, 3), torch.randn(4, C, *spatial)
    for a, e in zip(module_step(restored, x, g), module_step(module, x, g)):
        assert torch.equal(a, e)
    for name in STATE:
        assert torch.equal(getattr(restored, name), getattr(module, name))


def test_reset_running_stats_restarts_the_stream():
    module = OnlineNorm1d(C)
    module_step(module, stream_input((), 6, 0), torch.randn(6, C))
    assert all(not torch.equal(getattr(module, n), getattr(OnlineNorm1d(C), n)) for n in STATE)
    module.reset_running_stats()
    for name in STATE:
        assert torch.equal(getattr(module, name), getattr(OnlineNorm1d(C), name))


# ---- training and eval --------------------------------------------------------------------------------------------


def test_batch_size_one_training_reduces_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), OnlineNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    data = torch.randn(32, 4)
    target = data @ torch.tensor([1.0, -2.0, 0.5, 1.5]) + 0.3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_over_data():
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(data).squeeze(1), target).item()

    before = loss_over_data()
    model.train()
    for _ in range(4):
        for i in torch.randperm(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(data[i : i + 1]).squeeze(1), target[i : i + 1])
            loss.backward()
            optimizer.step()
    after = loss_over_data()
    assert after < 0.5 * before
    assert all(torch.isfinite(b).all() for b in model.buffers())


@pytest.mark.parametrize(("cls", "spatial"), LAYOUTS)
def test_changing_batch_sizes_keep_the_state_finite(cls, spatial):
    module = randomize_affine(cls(C))
    for step, n in enumerate([1, 3, 17, 1, 17, 3, 1]):
        y, dx, *grads = module_step(module, stream_input(spatial, n, step), torch.randn(n, C, *spatial))
        assert y.shape == (n, C, *spatial) and torch.isfinite(y).all() and torch.isfinite(dx).all()
        assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(getattr(module, n)).all() for n in STATE)
    assert module.running_var.min() > 0


@pytest.mark.parametrize(("cls", "spatial"), LAYOUTS)
def test_eval_does_not_change_the_state(cls, spatial):
    module = cls(C)
    module_step(module, stream_input(spatial, 3, 0), torch.randn(3, C, *spatial))
    before = {n: getattr(module, n).clone() for n in STATE}
    module.eval()
    module_step(module, stream_input(spatial, 5, 1), torch.randn(5, C, *spatial))
    for name in STATE:
        assert torch.equal(getattr(module, name), before[name])


@pytest.mark.parametrize(("cls", "spatial"), LAYOUTS)
def test_train_and_eval_outputs_agree_for_the_same_state(cls, spatial):
    module = randomize_affine(cls(C, alpha_fwd=0.7))
    module_step(module, stream_input(spatial, 6, 0), torch.randn(6, C, *spatial))
    evaluating = copy.deepcopy(module).eval()
    x = stream_input(spatial, 4, 1)
    y_eval, y_train = evaluating(x), module(x)
    # one sample sees the same state in both modes; within a training batch later samples see it updated
    assert_close(y_train[:1], y_eval[:1])
    assert (y_train[1:] - y_eval[1:]).abs().max() > 1e-3
    y_eval = copy.deepcopy(module).eval()(x[:1])
    assert_close(module(x[:1]), y_eval)


@given(
    n=st.sampled_from([1, 2, 3, 13]),
    hw=st.sampled_from([(1, 1), (3, 5), (4, 4)]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    channels_last=st.booleans(),
)
def test_state_equal_to_the_data_statistics_standardizes_it(n, hw, dtype, channels_last):
    x = seeded_randn((n, C, *hw), torch.float64) * 3 + 2
    module = OnlineNorm2d(C, affine=False, layer_scaling=False, dtype=dtype).eval()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    module.running_mean.copy_(mean)
    module.running_var.copy_(var)
    y = module(in_format(x.to(dtype), channels_last))
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if n * hw[0] * hw[1] > 1:
        out_var, out_mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
        tol = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]  # eps = 1e-5 shrinks var
        assert out_mean.abs().max() < tol and (out_var - 1).abs().max() < tol


@pytest.mark.parametrize(("cls", "spatial"), LAYOUTS)
def test_layer_scaling_gives_each_sample_unit_rms(cls, spatial):
    module = randomize_affine(cls(C))
    y = module(stream_input(spatial, 3, 0) * 10)
    rms = y.double().square().mean(tuple(range(1, y.dim()))).sqrt()
    assert_close(rms, torch.ones(3, dtype=torch.float64), scale=1e5)  # up to eps = 1e-5 in the mean square


# ---- torch.compile ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "spatial"), [(OnlineNorm1d, (7,)), (OnlineNorm2d, (3, 4))])
def test_compiled_training_matches_eager_including_the_backward_state(cls, spatial):
    # aot_eager runs the same partitioner as inductor: a recomputation that read the state after its in-place update
    # would give wrong input gradients here (see _forward_states)
    torch._dynamo.reset()
    eager = randomize_affine(cls(C, alpha_fwd=0.8, alpha_bkw=0.7))
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for step, (n, training) in enumerate([(3, True), (5, True), (6, True), (2, False)]):
        eager.train(training)
        compiled_module.train(training)
        x, g = stream_input(spatial, n, step), torch.randn(n, C, *spatial)
        compiled_module.zero_grad(set_to_none=True)
        xc = x.clone().requires_grad_()
        yc = compiled(xc)
        yc.backward(g)
        actual = [yc.detach(), xc.grad] + [p.grad for p in compiled_module.parameters()]
        for i, (a, e) in enumerate(zip(actual, module_step(eager, x, g))):
            assert_close(a, e, scale=10, msg=f"step {step}, tensor {i}")
        for name in STATE:
            assert_close(getattr(compiled_module, name), getattr(eager, name), scale=10, msg=name)


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [OnlineNorm1d, OnlineNorm2d])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha_fwd": 1.0}, r"alpha_fwd=1\.0 must be a decay factor in \[0, 1\)"),
        ({"alpha_fwd": -0.5}, r"alpha_fwd=-0\.5"),
        ({"alpha_bkw": 1.0}, r"alpha_bkw=1\.0"),
        ({"alpha_bkw": "0.9"}, r"alpha_bkw='0\.9'"),
        ({"eps": 0.0}, r"eps=0\.0"),
    ],
)
def test_bad_arguments_raise(cls, kwargs, message):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {message}"):
        cls(C, **kwargs)


@pytest.mark.parametrize(
    ("cls", "shape", "message"),
    [
        (OnlineNorm1d, (2, C, 3, 3), r"OnlineNorm1d: expected 2D or 3D input .*got input of shape \(2, 5, 3, 3\)"),
        (OnlineNorm1d, (C,), r"expected 2D or 3D input"),
        (OnlineNorm2d, (2, C), r"OnlineNorm2d: expected 4D input .*got input of shape \(2, 5\)"),
        (OnlineNorm2d, (2, C + 1, 3, 3), r"input has 6 channels .*expected num_features=5"),
        (OnlineNorm1d, (2, C - 1), r"input has 4 channels .*expected num_features=5"),
    ],
)
def test_bad_input_raises(cls, shape, message):
    with pytest.raises(ValueError, match=message):
        cls(C)(torch.randn(shape))


def test_extra_repr_names_the_settings():
    text = repr(OnlineNorm2d(C, alpha_fwd=0.99, layer_scaling=False))
    assert "alpha_fwd=0.99" in text and "alpha_bkw=0.99" in text and "layer_scaling=False" in text
