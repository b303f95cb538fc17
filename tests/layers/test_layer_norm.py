"""normlab LayerNorm, LayerNorm2d, RMSNorm and RMSNorm2d against torch.nn and the functional references."""

import re

import pytest
import torch
import torch.nn.functional as F

from normlab import kernels
from normlab.functional import layer_norm, layer_norm2d, rms_norm, rms_norm2d
from normlab.layers.layer_norm import LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d
from tests.helpers import assert_all_close, randomize_affine, run
from tests.tolerances import assert_close

BACKENDS = ["reference", "native"]


class PermutedLayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm over dim 1 of (N, C, H, W), the way timm's LayerNorm2d does it."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PermutedRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm over dim 1 of (N, C, H, W)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PerChannelAffine(torch.nn.Module):
    """F.layer_norm / F.rms_norm over (C, *) followed by a per-channel scale and shift."""

    def __init__(self, c, rms, eps, bias=True):
        super().__init__()
        self.rms, self.eps = rms, eps
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.bias = torch.nn.Parameter(torch.zeros(c)) if bias else None

    def forward(self, x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.rms:
            return F.rms_norm(x, x.shape[1:], eps=self.eps) * self.weight.view(view)
        return F.layer_norm(x, x.shape[1:], eps=self.eps) * self.weight.view(view) + self.bias.view(view)


def paired(ours, ref):
    randomize_affine(ours)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


# ---- oracles: torch.nn --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_layer_norm_of_2d_input_is_torch_layer_norm(backend, affine, bias):
    ours, ref = paired(
        LayerNorm(6, eps=1e-4, affine=affine, bias=bias),
        torch.nn.LayerNorm(6, 1e-4, elementwise_affine=affine, bias=bias),
    )
    with kernels.use_backend(backend):
        x = torch.randn(7, 6) * 2 + 1
        assert_all_close(run(ours, x), run(ref, x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 6, 7), (3, 6, 5, 4), (2, 6, 3, 2, 5)])
def test_layer_norm_is_torch_layer_norm_over_chw_then_per_channel_affine(backend, shape):
    ours, ref = paired(LayerNorm(6, eps=1e-4), PerChannelAffine(6, rms=False, eps=1e-4))
    x = torch.randn(shape) * 2 + 1
    with kernels.use_backend(backend):
        assert_all_close(run(ours, x), run(ref, x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm2d_is_permuted_torch_layer_norm(backend, bias, channels_last):
    ours, ref = paired(LayerNorm2d(6, bias=bias), PermutedLayerNorm(6, eps=1e-6, bias=bias))
    x = torch.randn(3, 6, 5, 4) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with kernels.use_backend(backend):
        actual = run(ours, x)
    assert_all_close(actual, run(ref, x))
    assert actual[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_of_2d_input_is_torch_rms_norm(backend, affine):
    ours, ref = paired(RMSNorm(6, affine=affine), torch.nn.RMSNorm(6, eps=1e-6, elementwise_affine=affine))
    x = torch.randn(7, 6) * 2 + 1
    with kernels.use_backend(backend):
        assert_all_close(run(ours, x), run(ref, x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 6, 7), (3, 6, 5, 4), (2, 6, 3, 2, 5)])
def test_rms_norm_is_torch_rms_norm_over_chw_then_per_channel_scale(backend, shape):
    ours, ref = paired(RMSNorm(6, eps=1e-5), PerChannelAffine(6, rms=True, eps=1e-5, bias=False))
    x = torch.randn(shape) * 2 + 1
    with kernels.use_backend(backend):
        assert_all_close(run(ours, x), run(ref, x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_rms_norm2d_is_permuted_torch_rms_norm(backend, channels_last):
    ours, ref = paired(RMSNorm2d(6), PermutedRMSNorm(6, eps=1e-6))
    x = torch.randn(3, 6, 5, 4) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with kernels.use_backend(backend):
        actual = run(ours, x)
    assert_all_close(actual, run(ref, x))
    assert actual[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize(
    "module,reference",
    [
        (LayerNorm(6, eps=1e-3), lambda m, x: layer_norm(x, m.weight, m.bias, 1e-3)),
        (LayerNorm2d(6, eps=1e-3), lambda m, x: layer_norm2d(x, m.weight, m.bias, 1e-3)),
        (RMSNorm(6, eps=1e-3), lambda m, x: rms_norm(x, m.weight, 1e-3)),
        (RMSNorm2d(6, eps=1e-3), lambda m, x: rms_norm2d(x, m.weight, 1e-3)),
    ],
    ids=["LayerNorm", "LayerNorm2d", "RMSNorm", "RMSNorm2d"],
)
def test_module_matches_functional_reference_in_train_and_eval(module, reference):
    randomize_affine(module)
    x = torch.randn(2, 6, 4, 5) + 1
    for training in (True, False):
        module.train(training)
        assert_close(module(x), reference(module, x))


def test_parameters_and_repr():
    assert LayerNorm(4, bias=False).bias is None and "bias=False" in repr(LayerNorm(4, bias=False))
    assert RMSNorm(4).bias is None and RMSNorm2d(4).bias is None
    assert RMSNorm(4, affine=False).weight is None
    assert LayerNorm2d(4).eps == 1e-6 and RMSNorm(4).eps == 1e-6 and LayerNorm(4).eps == 1e-5


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,shape,expected",
    [
        (LayerNorm, (6,), "2D or 3D or 4D or 5D"),
        (RMSNorm, (2, 6, 1, 1, 1, 1), "2D or 3D or 4D or 5D"),
        (LayerNorm2d, (2, 6, 5), "4D"),
        (RMSNorm2d, (2, 6, 5, 5, 5), "4D"),
    ],
)
def test_rejects_wrong_rank(cls, shape, expected):
    message = f"{cls.__name__}: expected {expected} input (N, C, ...), got input of shape {shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(6)(torch.randn(shape))


@pytest.mark.parametrize("cls", [LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d])
def test_rejects_channel_mismatch(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: input has 5 channels.*num_features=6"):
        cls(6)(torch.randn(2, 5, 3, 3))


@pytest.mark.parametrize("cls", [LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d])
def test_rejects_bad_eps(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: eps=0"):
        cls(6, eps=0)


# ---- numerical robustness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "make,normalized_dims",
    [(lambda: LayerNorm(16), (1, 2, 3)), (lambda: LayerNorm2d(64), (1,))],
    ids=["LayerNorm", "LayerNorm2d"],
)
def test_large_offset_normalizes_to_zero_mean_unit_std(make, normalized_dims, channels_last, dtype, offset, backend):
    c = 64 if normalized_dims == (1,) else 16
    x = (torch.randn(4, c, 8, 8, dtype=torch.float64) + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    norm = make().to(dtype)
    with kernels.use_backend(backend):
        y = norm(x).double()
    std, mean = torch.std_mean(y, dim=normalized_dims, correction=0)
    assert mean.abs().max() < 1e-2
    assert (std - 1).abs().max() < 1e-2
