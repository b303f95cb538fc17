"""StdConv2d and ScaledStdConv2d against F.conv2d with a float64-standardized weight, the NF-Net weight norm,
gradients and bad arguments."""

import pytest
import torch
import torch.nn.functional as F

from normlab import kernels
from normlab.layers import ScaledStdConv2d, StdConv2d
from tests.tolerances import assert_close


def standardized64(weight, eps, factor=None):
    w = weight.double()
    var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), correction=0, keepdim=True)
    w = (w - mean) / torch.sqrt(var + eps)
    if factor is not None:
        w = w * factor.double().view(-1, 1, 1, 1)
    return w


def conv64(conv, x, weight):
    bias = conv.bias.double() if conv.bias is not None else None
    if conv.padding_mode != "zeros":
        pad = [p for p in reversed(conv.padding) for _ in range(2)]
        x = F.pad(x.double(), pad, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    return F.conv2d(x.double(), weight, bias, conv.stride, padding, conv.dilation, conv.groups)


CONFIGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=6, out_channels=4, kernel_size=(3, 1), stride=2, padding=1, bias=False),
    dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, dilation=2, padding="same"),
    dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
def test_std_conv_equals_conv_with_float64_standardized_weight(config, training):
    conv = StdConv2d(**config).train(training)
    x = torch.randn(2, config["in_channels"], 7, 6, requires_grad=True)
    y = conv(x)
    assert isinstance(conv, torch.nn.Conv2d)
    w64 = conv.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    expected = conv64(conv, x64, standardized64(w64, conv.eps))
    assert_close(y, expected)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g.double()).sum().backward()
    assert_close(x.grad, x64.grad)
    assert_close(conv.weight.grad, w64.grad)


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_scaled_std_conv_matches_the_nf_net_formula(config):
    conv = ScaledStdConv2d(**config, gamma=1.7, gain_init=0.5)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2.0)
    fan_in = config["in_channels"] // config.get("groups", 1) * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.scale == pytest.approx(1.7 / fan_in**0.5)
    x = torch.randn(2, config["in_channels"], 7, 6)
    factor = conv.gain.detach() * 1.7 / fan_in**0.5
    expected = conv64(conv, x, standardized64(conv.weight.detach(), conv.eps, factor))
    assert_close(conv(x), expected)


def test_scaled_std_conv_weight_norm_is_gamma_times_gain():
    conv = ScaledStdConv2d(8, 6, 3, gamma=2.5, dtype=torch.float64)
    with torch.no_grad():
        conv.gain.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1, 1.0]))
    w = conv.standardized_weight()
    var = conv.weight.detach().var((1, 2, 3), unbiased=False)
    # sqrt(fan_in * var / (var + eps)) * gamma / sqrt(fan_in) * gain
    expected = 2.5 * conv.gain.detach() * torch.sqrt(var / (var + conv.eps))
    assert_close(torch.linalg.vector_norm(w, dim=(1, 2, 3)), expected)
    assert (torch.linalg.vector_norm(w, dim=(1, 2, 3)) - 2.5 * conv.gain.detach()).abs().max() < 1e-3


def test_std_conv_weight_has_zero_mean_unit_var_per_output_channel():
    conv = StdConv2d(5, 7, 3)
    with torch.no_grad():
        conv.weight.mul_(40).add_(3)
    var, mean = torch.var_mean(conv.standardized_weight().double(), dim=(1, 2, 3), correction=0)
    assert mean.abs().max() < 1e-6
    assert (var - 1).abs().max() < 1e-4


def test_scaled_std_conv_gain_is_learned_and_reset():
    conv = ScaledStdConv2d(3, 4, 3, gain_init=0.25)
    assert torch.equal(conv.gain, torch.full((4,), 0.25))
    conv(torch.randn(2, 3, 5, 5)).square().sum().backward()
    assert conv.gain.grad is not None and (conv.gain.grad != 0).all()
    assert "gain" in conv.state_dict()
    with torch.no_grad():
        conv.gain.fill_(5.0)
    conv.reset_parameters()
    assert torch.equal(conv.gain, torch.full((4,), 0.25))
    assert "eps=1e-06, gamma=1.0" in repr(conv)


def test_forward_standardizes_through_kernels(monkeypatch):
    calls = []
    original = kernels.call

    def spy(op, x, *args, **kwargs):
        calls.append((op, x.shape))
        return original(op, x, *args, **kwargs)

    monkeypatch.setattr(kernels, "call", spy)
    StdConv2d(3, 4, 3)(torch.randn(1, 3, 5, 5))
    ScaledStdConv2d(3, 4, 3)(torch.randn(1, 3, 5, 5))
    assert calls == [("standardize_weight", (4, 3, 3, 3))] * 2


def test_channels_last_is_preserved():
    conv = StdConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    expected = conv(x)
    conv = conv.to(memory_format=torch.channels_last)
    assert conv.standardized_weight().is_contiguous(memory_format=torch.channels_last)
    y = conv(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: StdConv2d(3, 4, 3, eps=0.0), r"StdConv2d: eps=0.0 must be a finite number > 0"),
        (lambda: StdConv2d(3, 4, 3, eps=-1e-5), r"StdConv2d: eps=-1e-05 must be a finite number > 0"),
        (lambda: ScaledStdConv2d(3, 4, 3, eps=0), r"ScaledStdConv2d: eps=0 must be a finite number > 0"),
        (lambda: ScaledStdConv2d(3, 4, 3, gamma=0.0), r"ScaledStdConv2d: gamma=0.0 must be a finite number > 0"),
        (lambda: ScaledStdConv2d(3, 4, 3, gain_init=float("nan")), r"gain_init=nan must be a finite number"),
    ],
)
def test_bad_args_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
