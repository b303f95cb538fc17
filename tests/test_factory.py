import functools

import pytest
import torch
from torch import nn

import normlab
from normlab.factory import _ALIASES, _REGISTRY


@pytest.mark.parametrize(
    "spec,cls,attrs",
    [
        ("bn", normlab.BatchNorm2d, {}),
        ("BN", normlab.BatchNorm2d, {}),
        ("bn1d", normlab.BatchNorm1d, {}),
        ("bn3d", normlab.BatchNorm3d, {}),
        ("syncbn", normlab.BatchNorm2d, {"sync": True}),
        ("SyncBN", normlab.BatchNorm2d, {"sync": True}),
        ("naiveSyncBN", normlab.BatchNorm2d, {"sync": True}),
        ("frozen_bn", normlab.FrozenBatchNorm2d, {}),
        ("FrozenBN", normlab.FrozenBatchNorm2d, {}),
        ("ghost_bn:16", normlab.GhostBatchNorm2d, {"virtual_batch_size": 16}),
        ("brn", normlab.BatchRenorm2d, {}),
        ("gn32", normlab.GroupNorm, {"num_groups": 32}),
        ("gn", normlab.GroupNorm, {"num_groups": 32}),
        ("gn:8", normlab.GroupNorm, {"num_groups": 8}),
        ("gn:gs16", normlab.GroupNorm, {"num_groups": 4}),
        ("GN", normlab.GroupNorm, {"num_groups": 32}),
        ("groupnorm", normlab.GroupNorm, {}),
        ("groupnorm1", normlab.LayerNorm, {}),
        ("in", normlab.InstanceNorm2d, {}),
        ("IN", normlab.InstanceNorm2d, {}),
        ("ln", normlab.LayerNorm, {}),
        ("LN", normlab.LayerNorm, {}),
        ("ln2d", normlab.LayerNorm2d, {}),
        ("layernorm2d", normlab.LayerNorm2d, {}),
        ("rms", normlab.RMSNorm, {}),
        ("rms2d", normlab.RMSNorm2d, {}),
        ("rmsnorm2d", normlab.RMSNorm2d, {}),
        ("frn", normlab.FilterResponseNorm2d, {}),
        ("evo_b0", normlab.EvoNorm2dB0, {}),
        ("evonormb0", normlab.EvoNorm2dB0, {}),
        ("evo_s0", normlab.EvoNorm2dS0, {}),
        ("evo-s0:gs8", normlab.EvoNorm2dS0, {"num_groups": 8}),
        ("none", nn.Identity, {}),
    ],
)
def test_spec_strings_build_the_right_layer(spec, cls, attrs):
    layer = normlab.get_norm_layer(spec)(64)
    assert type(layer) is cls
    for k, v in attrs.items():
        assert getattr(layer, k) == v
    if cls is not nn.Identity:
        assert layer.num_features == 64


def test_timm_style_call_with_device_dtype_and_overrides():
    norm_layer = normlab.get_norm_layer("gn32", eps=1e-6)
    layer = norm_layer(64, device="cpu", dtype=torch.float64, eps=1e-3)
    assert layer.weight.dtype == torch.float64 and layer.eps == 1e-3
    assert norm_layer(64).eps == 1e-6
    assert normlab.get_norm_layer("none")(5, device="cpu", dtype=torch.float16)(torch.ones(2)).sum() == 2


def test_class_partial_and_callable_specs():
    assert type(normlab.get_norm_layer(normlab.LayerNorm2d)(8)) is normlab.LayerNorm2d
    layer = normlab.get_norm_layer(functools.partial(normlab.GroupNorm, num_groups=4))(8, dtype=torch.float64)
    assert layer.num_groups == 4 and layer.weight.dtype == torch.float64
    assert type(normlab.get_norm_layer(torch.nn.BatchNorm2d)(8)) is torch.nn.BatchNorm2d
    again = normlab.get_norm_layer(normlab.get_norm_layer("bn"), momentum=0.01)
    assert again(4).momentum == 0.01


def test_works_as_norm_layer_in_a_torchvision_style_block():
    class Block(nn.Module):
        def __init__(self, c, norm_layer):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.norm = norm_layer(c)

        def forward(self, x):
            return self.norm(self.conv(x))

    for spec in [s for s in normlab.list_norms() if "1d" not in s and "3d" not in s]:
        kw = {"num_groups": 4} if spec in ("gn", "evo_s0") else {}
        assert Block(8, normlab.get_norm_layer(spec, **kw))(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5), spec


def test_unknown_name_lists_valid_names_and_closest_match():
    with pytest.raises(ValueError, match=r"unknown norm spec 'grupnorm'.*Did you mean 'groupnorm'\?.*Valid names:.*gn"):
        normlab.get_norm_layer("grupnorm")
    with pytest.raises(ValueError, match=r"'xyz'"):
        normlab.create_norm_layer("xyz", 4)


@pytest.mark.parametrize(
    "spec,match", [("gn:abc", r"'abc'"), ("ghost_bn:x", r"virtual batch size"), ("ln:3", r"takes no")]
)
def test_bad_spec_arguments(spec, match):
    with pytest.raises(ValueError, match=match):
        normlab.get_norm_layer(spec)


def test_bad_spec_type():
    with pytest.raises(ValueError, match=r"spec=42 must be a string"):
        normlab.get_norm_layer(42)


def test_register_norm_and_list_norms():
    class MyNorm(nn.Module):
        def __init__(self, num_features, *, scale=1.0, device=None, dtype=None):
            super().__init__()
            self.num_features, self.scale = num_features, scale

        def forward(self, x):
            return x * self.scale

    try:
        normlab.register_norm("mynorm", MyNorm, aliases=("My-Norm",))
        assert "mynorm" in normlab.list_norms() and "my_norm" in normlab.list_norms(aliases=True)
        assert normlab.create_norm_layer("MY_NORM", 3, scale=2.0).scale == 2.0
        with pytest.raises(ValueError, match=r"name='mynorm' is already registered"):
            normlab.register_norm("mynorm", MyNorm)
        with pytest.raises(ValueError, match=r"name='bn' is already registered"):
            normlab.register_norm("bn", MyNorm)
        with pytest.raises(ValueError, match=r"factory=3 must be a class or callable"):
            normlab.register_norm("other", 3)
    finally:
        _REGISTRY.pop("mynorm", None)
        _ALIASES.pop("my_norm", None)
    assert "mynorm" not in normlab.list_norms()


def test_every_alias_resolves():
    for alias in normlab.list_norms(aliases=True):
        normlab.get_norm_layer(alias)
