import copy
import functools

import pytest
import torch
from torch import nn

import normlab
from normlab.surgery import swap_norm
from normlab.surgery._match import is_batch_norm
from tests.surgery.models import ZOO, FrozenBatchNorm2d, build, example_input, randomize_batch_norms
from tests.tolerances import assert_close

RANK_OF = {"mlp": "1d", "conv1d": "1d", "conv3d": "3d"}


def _norms(model, cls):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_model_swaps_to_group_norm_with_its_affine(name):
    model = randomize_batch_norms(build(name))
    old = {
        n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in model.named_modules() if is_batch_norm(m)
    }
    swapped, report = swap_norm(model, "gn:2")
    assert swapped is model and not any(is_batch_norm(m) for m in swapped.modules())
    new = dict(_norms(swapped, normlab.GroupNorm))
    assert new.keys() == old.keys() == {c.name for c in report.changed} and report.skipped == []
    for n, (weight, bias) in old.items():
        assert torch.equal(new[n].weight, weight) and torch.equal(new[n].bias, bias)
        assert new[n].num_groups == 2 and new[n].training
    assert {c.note for c in report.changed} == {"affine copied"}
    swapped(example_input(name)).sum().backward()


@pytest.mark.parametrize("name", list(ZOO))
def test_torch_batch_norm_to_normlab_bn_keeps_the_function_and_the_rank(name):
    model = randomize_batch_norms(build(name))
    swapped, report = swap_norm(copy.deepcopy(model), "bn")
    cls = getattr(normlab, f"BatchNorm{RANK_OF.get(name, '2d')}")
    assert len(_norms(swapped, cls)) == len(report.changed) == sum(map(is_batch_norm, model.modules()))
    assert report.changed[0].note == "affine copied; running statistics, eps, momentum copied"
    x = example_input(name)
    assert_close(swapped.eval()(x), model.eval()(x))
    model.train(), swapped.train()
    assert_close(swapped(x), model(x))  # training forward: batch statistics, then the same running update
    for (_, a), (_, b) in zip(_norms(swapped, cls), _norms(model, nn.modules.batchnorm._BatchNorm)):
        assert_close(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 4


def test_eps_and_momentum_carry_over_unless_the_spec_sets_them():
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=None)
    new, _ = swap_norm(copy.deepcopy(bn), "bn")
    assert (new.eps, new.momentum) == (1e-3, None)
    new, report = swap_norm(copy.deepcopy(bn), normlab.get_norm_layer("bn", eps=1e-4))
    assert (new.eps, new.momentum) == (1e-4, None)
    assert swap_norm(copy.deepcopy(bn), "gn:2")[0].eps == 1e-5  # not a batch norm: its own default


@pytest.mark.parametrize(
    "name, spec, expected",
    [
        ("mlp", "frozen_bn", normlab.FrozenBatchNorm1d),
        ("conv1d", "bn2d", normlab.BatchNorm1d),
        ("conv3d", "bn", normlab.BatchNorm3d),
        ("mlp", nn.BatchNorm2d, nn.BatchNorm1d),
        ("conv3d", functools.partial(nn.BatchNorm2d, momentum=0.5), nn.BatchNorm3d),
        ("conv1d", "in", normlab.InstanceNorm1d),
        ("conv3d", "gn:4", normlab.GroupNorm),
        ("mlp", "ln", normlab.LayerNorm),
        ("mlp", "none", nn.Identity),
    ],
)
def test_spec_family_takes_the_rank_of_the_replaced_module(name, spec, expected):
    model, report = swap_norm(randomize_batch_norms(build(name)), spec)
    assert {type(model.get_submodule(c.name)) for c in report.changed} == {expected}
    model.eval()(example_input(name))


def test_partial_spec_keeps_its_arguments_across_ranks():
    model, _ = swap_norm(build("conv3d"), functools.partial(nn.BatchNorm2d, momentum=0.5))
    assert model[1].momentum == 0.5  # the partial's argument, not the old module's momentum


def test_instance_norm_for_a_batch_norm_1d_notes_the_narrower_rank():
    _, report = swap_norm(build("mlp"), "in")
    assert "InstanceNorm1d takes only 3D input" in report.changed[0].note


@pytest.mark.parametrize(
    "name, spec, message",
    [
        ("mlp", "ln2d", "cannot replace 1 .BatchNorm1d. with 'ln2d': LayerNorm2d takes 4D input but BatchNorm1d"),
        ("conv3d", "ln2d", "LayerNorm2d takes 4D input but BatchNorm3d takes 5D input"),
        ("conv_bn_relu", "gn32", "building 'gn' for 8 channels failed: GroupNorm: num_groups=32 must divide"),
    ],
)
def test_incompatible_swap_raises_before_changing_anything_or_is_skipped(name, spec, message):
    model = build(name)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        swap_norm(model, spec)
    assert [type(m) for m in model.modules()] == before
    model, report = swap_norm(model, spec, strict=False)
    assert report.changed == [] and len(report.skipped) == 2
    assert [type(m) for m in model.modules()] == before


def test_unknown_spec_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="unknown norm spec 'grup_norm'"):
        swap_norm(build("conv_bn_relu"), "grup_norm")


def test_group_norm_back_to_batch_norm_with_source():
    model = build("resnet", functools.partial(normlab.GroupNorm, num_groups=2))
    for _, gn in _norms(model, normlab.GroupNorm):
        nn.init.uniform_(gn.weight, 0.5, 1.5)
    weights = {n: m.weight.detach().clone() for n, m in _norms(model, normlab.GroupNorm)}
    model, report = swap_norm(model, "bn", source=normlab.GroupNorm)
    assert len(report.changed) == 6 and not _norms(model, normlab.GroupNorm)
    for n, w in weights.items():
        assert type(model.get_submodule(n)) is normlab.BatchNorm2d
        assert torch.equal(model.get_submodule(n).weight, w)
    model(example_input("resnet"))


def test_source_predicate_and_tuple():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), normlab.LayerNorm(4), nn.BatchNorm2d(4))
    model, report = swap_norm(model, "bn", source=lambda m: "Norm" in type(m).__name__ and not is_batch_norm(m))
    assert [c.name for c in report.changed] == ["1", "2"] and type(model[1]) is normlab.BatchNorm2d
    assert type(model[3]) is nn.BatchNorm2d
    model, report = swap_norm(model, "gn:2", source=(normlab.BatchNorm2d, nn.BatchNorm2d))
    assert len(report.changed) == 3
    with pytest.raises(ValueError, match="swap_norm: source=3 must be None"):
        swap_norm(model, "bn", source=3)


@pytest.mark.parametrize(
    "make_frozen", [normlab.FrozenBatchNorm2d, FrozenBatchNorm2d], ids=["normlab", "torchvision-style"]
)
def test_frozen_batch_norm_buffers_become_the_new_parameters(make_frozen):
    frozen = randomize_batch_norms(make_frozen(4))
    model, report = swap_norm(nn.Sequential(nn.Conv2d(3, 4, 1), frozen), "bn")
    bn = model[1]
    assert isinstance(bn.weight, nn.Parameter) and bn.weight.requires_grad
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, k), getattr(frozen, k)), k
    x = torch.randn(2, 4, 3, 3)
    assert_close(bn.eval()(x), frozen(x))


def test_affine_not_copied_is_reported():
    bn = randomize_batch_norms(nn.BatchNorm2d(4))
    new, report = swap_norm(copy.deepcopy(bn), "gn:2", copy_affine=False)
    assert torch.equal(new.weight, torch.ones(4)) and report.changed[0].note == ""
    new, report = swap_norm(copy.deepcopy(bn), normlab.get_norm_layer("gn:2", affine=False))
    assert new.weight is None and report.changed[0].note == (
        "affine not copied: weight (target has none), bias (target has none)"
    )
    _, report = swap_norm(nn.BatchNorm2d(4, affine=False), "gn:2")
    assert "weight (source has none)" in report.changed[0].note
    new, report = swap_norm(copy.deepcopy(bn), normlab.get_norm_layer("ln", bias=False))
    assert torch.equal(new.weight, bn.weight)
    assert report.changed[0].note == "weight copied; not copied: bias (target has none)"

    class Broadcast(nn.Module):  # a per-channel affine stored as (1, C, 1, 1)
        def __init__(self, c, device=None, dtype=None):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, c, 1, 1, device=device, dtype=dtype))

    _, report = swap_norm(copy.deepcopy(bn), Broadcast)
    assert "weight (shape (4,) -> (1, 4, 1, 1), expected (4,))" in report.changed[0].note


def test_include_exclude():
    model = build("resnet")
    model, report = swap_norm(model, "gn:2", include="layer*", exclude=["*.downsample.*"])
    assert [c.name for c in report.changed] == ["layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2"]
    assert [(s.name, s.reason) for s in report.skipped] == [
        ("bn1", "not selected by include/exclude"),
        ("layer2.0.downsample.1", "not selected by include/exclude"),
    ]
    assert type(model.bn1) is nn.BatchNorm2d and type(model.layer2[0].downsample[1]) is nn.BatchNorm2d


def test_device_dtype_and_training_flags_are_kept():
    model = build("conv_bn_relu").double().train()
    model[4].eval()
    model, _ = swap_norm(model, "gn:2")
    assert model.training and model[1].training and not model[4].training
    assert model[1].weight.dtype == torch.float64
    meta = nn.Sequential(nn.Conv2d(3, 4, 1, device="meta"), nn.BatchNorm2d(4, device="meta")).eval()
    meta, _ = swap_norm(meta, "bn")
    assert meta[1].weight.device.type == meta[1].running_mean.device.type == "meta" and not meta[1].training


def test_root_module_shared_module_and_no_batch_norm():
    bn = randomize_batch_norms(nn.BatchNorm2d(4)).eval()
    new, report = swap_norm(bn, "gn:2")
    assert type(new) is normlab.GroupNorm and not new.training and report.changed[0].name == "(root)"
    assert torch.equal(new.weight, bn.weight)

    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    model, report = swap_norm(model, "gn:2")
    assert model[1] is model[3] and type(model[1]) is normlab.GroupNorm
    assert len(report.changed) == 1 and "also registered as 3" in report.changed[0].note

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    out, report = swap_norm(plain, "gn:2")
    assert out is plain and report.changed == [] and report.skipped == []


def test_frozen_spec_maps_a_batch_norm_3d_to_frozen_batch_norm_3d():
    model = build("conv3d").eval()
    x = torch.randn(2, *example_input("conv3d").shape[1:])
    expected = model(x)
    model, report = swap_norm(model, "frozen_bn")
    assert all(type(m) is normlab.FrozenBatchNorm3d for m in model.modules() if "BatchNorm" in type(m).__name__)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
