"""MovingAverageBatchNorm2d and CenteredConv2d: against the float64 reference of MABN's equations and the
functional, torch.nn.BatchNorm2d during warm-up, train/eval behaviour, gradient noise at batch size 2, checkpoints,
torch.compile and bad input."""

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from normlab.functional import moving_average_batch_norm
from normlab.layers import CenteredConv2d, MovingAverageBatchNorm2d
from tests.functional.test_mabn import PaperMABN
from tests.helpers import output_and_input_grad, randomize_weight_and_bias
from tests.tolerances import assert_close

SMALL = dict(buffer_size=3, warmup_iters=2, renorm_after=4, r_max=1.5, momentum=0.2)


def _mabn(c=4, **kw):
    return randomize_weight_and_bias(MovingAverageBatchNorm2d(c, **{**SMALL, **kw}))


def test_defaults_follow_the_reference_implementation():
    m = MovingAverageBatchNorm2d(8)
    assert (m.eps, m.momentum, m.buffer_size, m.warmup_iters, m.r_max, m.renorm_after) == (
        1e-5,
        0.02,
        16,
        100,
        5.0,
        1000,
    )
    assert m.x2_window.shape == m.psi_window.shape == (16, 8)
    assert torch.equal(m.running_var, torch.ones(8)) and int(m.num_batches_tracked) == 0
    assert set(m.state_dict()) == {"weight", "bias", "running_var", "num_batches_tracked", "x2_window", "psi_window"}
    assert "buffer_size=16" in repr(m) and "momentum=0.02" in repr(m)
    none = MovingAverageBatchNorm2d(8, affine=False)
    assert none.weight is None and none.bias is None


def test_training_matches_float64_reference_and_functional():
    module = _mabn(dtype=torch.float64, eps=1e-3)
    ref = PaperMABN(4, eps=1e-3, **SMALL)
    state = {k: v.clone() for k, v in module.state_dict().items() if k not in ("weight", "bias")}
    for step in range(8):
        x = torch.randn(2, 4, 3, 5, dtype=torch.float64) * (1 + 0.4 * step) + 0.3
        g = torch.randn(2, 4, 3, 5, dtype=torch.float64)
        module.zero_grad(set_to_none=True)
        y, gx = output_and_input_grad(module, x, g)
        y_ref, gx_ref, gw_ref, gb_ref, _ = ref.step(x, module.weight.detach(), module.bias.detach(), g)
        for a, e in [(y, y_ref), (gx, gx_ref), (module.weight.grad, gw_ref), (module.bias.grad, gb_ref)]:
            assert_close(a, e)
        assert_close(module.running_var, ref.ema)
        # the functional with its own copy of the state gives the same step
        xf = x.clone().requires_grad_()
        yf = moving_average_batch_norm(
            xf,
            state["running_var"],
            state["x2_window"],
            state["psi_window"],
            state["num_batches_tracked"],
            module.weight.detach(),
            module.bias.detach(),
            True,
            SMALL["momentum"],
            1e-3,
            warmup_iters=SMALL["warmup_iters"],
            r_max=SMALL["r_max"],
            renorm_after=SMALL["renorm_after"],
        )
        yf.backward(g)
        assert_close(yf, y)
        assert_close(xf.grad, gx)
        for name, buffer in module.named_buffers():
            assert torch.equal(buffer, state[name]), name
    assert int(module.num_batches_tracked) == 8


def test_warmup_equals_torch_batch_norm_on_zero_mean_batches():
    """During warm-up MABN is batch norm without centering; on batches with zero per-channel mean that is
    torch.nn.BatchNorm2d's output, and its input gradient too when the output gradient has zero batch mean."""
    ours = _mabn(3, warmup_iters=5)
    torch_bn = nn.BatchNorm2d(3)
    torch_bn.load_state_dict({"weight": ours.weight.detach(), "bias": ours.bias.detach()}, strict=False)
    for _ in range(5):
        x, g = torch.randn(2, 3, 4, 5) * 2, torch.randn(2, 3, 4, 5)
        x, g = x - x.mean((0, 2, 3), keepdim=True), g - g.mean((0, 2, 3), keepdim=True)
        for a, b in zip(output_and_input_grad(ours, x, g), output_and_input_grad(torch_bn, x, g), strict=True):
            assert_close(a, b)
    assert_close(ours.weight.grad, torch_bn.weight.grad)
    assert_close(ours.bias.grad, torch_bn.bias.grad)


def test_eval_uses_running_var_and_leaves_every_buffer_alone():
    m = _mabn()
    for _ in range(6):
        output_and_input_grad(m, torch.randn(2, 4, 3, 3) * 2, torch.randn(2, 4, 3, 3))
    assert not torch.equal(m.running_var, torch.ones(4))
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, g = torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1)  # one value per channel is fine in eval
    y, gx = output_and_input_grad(m, x, g)
    scale = (m.weight / torch.sqrt(m.running_var + m.eps)).detach().view(1, -1, 1, 1)
    assert_close(y, x * scale + m.bias.detach().view(1, -1, 1, 1))
    assert_close(gx, g * scale)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m.train()
    output_and_input_grad(m, torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    assert int(m.num_batches_tracked) == 7


def test_renormalized_training_forward_equals_eval_forward():
    """Once r is in force and unclipped, training normalizes by the EMA, exactly as eval does (with the EMA before
    the step's update)."""
    m = _mabn(r_max=100.0)
    for _ in range(5):
        output_and_input_grad(m, torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    x = torch.randn(2, 4, 3, 3)
    y_eval = m.eval()(x)
    y_train = m.train()(x)
    assert_close(y_train, y_eval)
    # without renormalization the training forward uses the moving average itself, which differs from the EMA
    plain = MovingAverageBatchNorm2d(4, **{**SMALL, "r_max": 1.0})
    plain.load_state_dict(m.state_dict())
    assert (plain(x) - m.eval()(x)).abs().max() > 1e-3


def test_resumes_exactly_from_a_state_dict():
    a = _mabn()
    for _ in range(4):
        output_and_input_grad(a, torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    b = MovingAverageBatchNorm2d(4, **SMALL)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        x, g = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
        for u, v in zip(output_and_input_grad(a, x, g), output_and_input_grad(b, x, g), strict=True):
            assert torch.equal(u, v)
    for (name, u), v in zip(a.named_buffers(), b.buffers(), strict=True):
        assert torch.equal(u, v), name
    a.reset_running_stats()
    assert int(a.num_batches_tracked) == 0 and not a.x2_window.any() and not a.psi_window.any()
    assert torch.equal(a.running_var, torch.ones(4))


def _weight_gradients(norm, conv, data, targets, batches):
    grads = []
    for idx in batches:
        conv.zero_grad(set_to_none=True)
        (norm(conv(data[idx])) * targets[idx]).sum().backward()
        grads.append(conv.weight.grad.flatten().clone())
    return torch.stack(grads)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_noise_at_batch_size_2_is_lower_than_torch_batch_norm(seed):
    """A fixed dataset of 32 samples, shuffled into mini-batches of 2 for 9 epochs; a fixed CenteredConv2d
    (unit-norm filters, never updated) feeds the norm and a fixed linear loss. Across the last 8 epochs' steps
    (after the first fills the window), the variance of the conv weight's gradient is measured.

    The features are dominated by a per-sample, per-channel level with little spatial variation (std 0.05), as deep,
    spatially smooth feature maps are. So a batch of 2 gives batch norm about two effective values per channel, and
    its four batch statistics swing with the pairing. MABN's moving averages over 16 batches do not. When the
    spatial variation dominates instead (std >= 0.5 here), each batch already holds many effective values per
    channel, and the two noise levels are about equal (ratio 0.8 to 1.3 in this setup): MABN targets the first
    regime."""
    g = torch.Generator().manual_seed(seed)
    n, c, hw = 32, 4, 4
    data = torch.randn(n, c, 1, 1, generator=g) + 0.05 * torch.randn(n, c, hw, hw, generator=g)
    targets = torch.randn(n, c, hw, hw, generator=g)
    conv = CenteredConv2d(c, c, 1, bias=False)
    with torch.no_grad():
        w = torch.randn(c, c, 1, 1, generator=g)
        w -= w.mean(1, keepdim=True)
        conv.weight.copy_(w / w.norm(dim=1, keepdim=True))
    batches = [b for _ in range(9) for b in torch.randperm(n, generator=g).view(-1, 2)]
    mabn = MovingAverageBatchNorm2d(c, warmup_iters=0)  # batch statistics only until the window is full
    noise_mabn = _weight_gradients(mabn, conv, data, targets, batches)[16:].var(0).sum()
    noise_bn = _weight_gradients(nn.BatchNorm2d(c), conv, data, targets, batches)[16:].var(0).sum()
    assert int(mabn.num_batches_tracked) == 144
    assert noise_mabn < 0.5 * noise_bn, (noise_mabn, noise_bn)


@pytest.mark.slow
def test_centered_conv_and_mabn_compile_fullgraph_and_match_eager_through_every_phase():
    """Warm-up, moving averages, renormalization with r clipped in some channels and steps and not in others:
    outputs, gradients and every buffer (the backward writes psi_window) agree with eager, then in eval."""
    torch._dynamo.reset()
    eager = nn.Sequential(CenteredConv2d(3, 4, 3, padding=1, bias=False), _mabn(r_max=1.3))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(8):
        x, g = torch.randn(2, 3, 4, 4) * (1 + 0.3 * step), torch.randn(2, 4, 4, 4)
        for a, b in zip(output_and_input_grad(compiled, x, g), output_and_input_grad(eager, x, g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)
    eager.eval()
    compiled_model.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(compiled(x), eager(x))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(buffer_size=0), r"MovingAverageBatchNorm2d: buffer_size=0 must be a positive integer"),
        (dict(eps=0.0), r"MovingAverageBatchNorm2d: eps=0.0 must be a finite number > 0"),
        (dict(momentum=None), r"momentum=None"),
        (dict(momentum=-0.1), r"momentum=-0.1"),
        (dict(warmup_iters=-1), r"warmup_iters=-1"),
        (dict(r_max=0.9), r"r_max=0.9"),
        (dict(renorm_after=-5), r"renorm_after=-5"),
        (dict(num_features=0), r"num_features=0"),
    ],
)
def test_bad_constructor_arguments_raise(kw, match):
    kw = {"num_features": 3, **kw}
    with pytest.raises(ValueError, match=match):
        MovingAverageBatchNorm2d(kw.pop("num_features"), **kw)


def test_bad_input_raises():
    m = MovingAverageBatchNorm2d(3)
    with pytest.raises(ValueError, match=r"expected 4D input.*got input of shape \(2, 3, 5\)"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"input has 4 channels \(shape \(2, 4, 3, 3\)\), expected num_features=3"):
        m(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"more than 1 value per channel when training.*\(1, 3, 1, 1\)"):
        m(torch.randn(1, 3, 1, 1))
    assert int(m.num_batches_tracked) == 0


# ---------------------------------------------------------------------------------------------- CenteredConv2d

CONV_CASES = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, dilation=(1, 2), groups=2, bias=True),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("kw", CONV_CASES)
def test_centered_conv_equals_conv2d_with_the_centered_weight(kw):
    conv = CenteredConv2d(**kw, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.add_(1.0)  # a clear per-channel mean to remove
    effective = conv.centered_weight()
    assert effective.mean((1, 2, 3)).abs().max() < 1e-12
    plain = nn.Conv2d(**kw, dtype=torch.float64)
    plain.load_state_dict(conv.state_dict())
    with torch.no_grad():
        plain.weight.sub_(plain.weight.mean((1, 2, 3), keepdim=True))
    x = torch.randn(2, kw["in_channels"], 7, 8, dtype=torch.float64)
    assert_close(conv(x), plain(x))
    if kw.get("padding_mode", "zeros") == "zeros":
        w = conv.weight - conv.weight.mean((1, 2, 3), keepdim=True)
        expected = F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        assert_close(conv(x), expected)


def test_centered_conv_gradient_flows_through_the_centering():
    conv = CenteredConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    conv(x).square().sum().backward()
    # d/dW of f(W - mean W) is the centered gradient: zero mean per output channel
    assert conv.weight.grad.abs().sum() > 1e-3
    assert conv.weight.grad.mean((1, 2, 3)).abs().max() < 1e-10
    params = (conv.weight.detach().clone().requires_grad_(), conv.bias.detach().clone().requires_grad_())

    def fn(x, w, b):
        return torch.func.functional_call(conv, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
