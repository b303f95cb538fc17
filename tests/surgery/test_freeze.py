import copy
import pickle

import pytest
import torch
from torch import nn

import normlab
from normlab.surgery import freeze_bn, unfreeze_bn
from normlab.surgery._match import is_batch_norm
from tests.surgery.models import ZOO, FrozenBatchNorm2d, build, example_input, randomize_batch_norms
from tests.tolerances import assert_close

FREEZABLE = list(ZOO)


@pytest.mark.parametrize("name", FREEZABLE)
def test_frozen_model_is_the_eval_model_in_train_and_eval(name):
    model = randomize_batch_norms(build(name))
    x = example_input(name)
    expected = model.eval()(x)
    frozen, report = freeze_bn(copy.deepcopy(model).train())
    assert len(report.changed) == sum(map(is_batch_norm, model.modules())) and report.skipped == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    y_train = frozen.train()(x)
    y_eval = frozen.eval()(x)
    assert torch.equal(y_train, y_eval)
    assert_close(y_train, expected)


@pytest.mark.parametrize(
    "make_bn, x_shape",
    [
        (lambda: nn.BatchNorm2d(5), (3, 5, 4, 4)),
        (lambda: nn.BatchNorm1d(5), (3, 5)),
        (lambda: nn.BatchNorm1d(5), (3, 5, 7)),
        (lambda: normlab.BatchNorm2d(5), (3, 5, 4, 4)),
        (lambda: normlab.GhostBatchNorm2d(5, virtual_batch_size=2), (4, 5, 3, 3)),
        (lambda: normlab.BatchRenorm2d(5, r_max=2.0), (3, 5, 4, 4)),
    ],
    ids=["torch2d", "torch1d-2D", "torch1d-3D", "normlab2d", "ghost", "renorm"],
)
def test_frozen_layer_output_is_identical_in_train_and_eval_and_equals_bn_eval(make_bn, x_shape):
    bn = randomize_batch_norms(make_bn()).eval()
    x = torch.randn(x_shape) * 2 + 1
    frozen, report = freeze_bn(copy.deepcopy(bn))
    assert type(frozen).__name__ == f"FrozenBatchNorm{'1d' if len(x_shape) < 4 else '2d'}"
    assert report.changed[0].name == "(root)"
    assert torch.equal(frozen.train()(x), frozen.eval()(x))
    assert_close(frozen(x), bn(x))


def test_parameters_and_buffers_do_not_change_in_a_training_step():
    model = randomize_batch_norms(build("resnet"))
    model, _ = freeze_bn(model)
    model.train()
    frozen = [n for n, m in model.named_modules() if isinstance(m, normlab.FrozenBatchNorm2d)]
    frozen_state = {k: v.clone() for k, v in model.state_dict().items() if k.rpartition(".")[0] in frozen}
    conv_before = model.conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(example_input("resnet")).square().mean().backward()
        optimizer.step()
    assert len(frozen_state) == 6 * 4
    for k, v in frozen_state.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(model.conv1.weight, conv_before)  # the rest of the model did train
    assert all(not b.requires_grad for b in model.buffers())


def test_survives_model_train():
    # bn.eval() is undone by model.train() (PyTorch issue #86590); a frozen module is not
    model = randomize_batch_norms(build("conv_bn_relu")).eval()
    x = example_input("conv_bn_relu")
    expected = model(x)
    model, _ = freeze_bn(model)
    model.train()
    for _ in range(3):
        y = model(x)
    assert torch.equal(y, model.eval()(x))
    assert_close(y, expected)


@pytest.mark.parametrize(
    "make_bn",
    [
        pytest.param(lambda: nn.BatchNorm2d(4, eps=1e-3, momentum=None), id="torch-cumulative"),
        pytest.param(lambda: nn.BatchNorm2d(4, affine=False), id="torch-no-affine"),
        pytest.param(lambda: nn.BatchNorm2d(4, bias=False), id="torch-no-bias"),
        pytest.param(lambda: nn.BatchNorm1d(4, momentum=0.3), id="torch1d"),
        pytest.param(lambda: nn.SyncBatchNorm(4, momentum=0.2), id="sync"),
        pytest.param(lambda: normlab.BatchNorm2d(4, nan_guard=False, momentum=0.05), id="normlab"),
        pytest.param(lambda: normlab.GhostBatchNorm2d(4, virtual_batch_size=3), id="ghost"),
        pytest.param(lambda: normlab.BatchRenorm2d(4, r_max=2.0, d_max=1.0, warmup_steps=10), id="renorm"),
    ],
)
def test_unfreeze_restores_an_equivalent_module(make_bn):
    original = randomize_batch_norms(make_bn())
    model = nn.Sequential(nn.Identity(), copy.deepcopy(original)).eval()
    model, _ = freeze_bn(model)
    model.train()
    model, report = unfreeze_bn(model)
    restored = model[1]
    assert type(restored) is type(original) and report.changed[0].note == ""
    assert restored.training  # the model's current flag, as model.train() left the frozen module
    for attr in ("eps", "momentum", "affine", "track_running_stats", "virtual_batch_size", "r_max", "d_max"):
        assert getattr(restored, attr, None) == getattr(original, attr, None), attr
    assert restored.state_dict().keys() == original.state_dict().keys()
    for k, v in original.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k
    params = list(restored.parameters())
    assert len(params) == len(list(original.parameters())) and all(p.requires_grad for p in params)
    x = torch.randn(6, 4, 3, 3) if not isinstance(original, nn.BatchNorm1d) else torch.randn(6, 4)
    original.train()
    assert_close(restored(x), original(x))  # same training step: batch statistics and running update
    assert_close(restored.running_var, original.running_var)


def test_round_trip_of_a_zoo_model_restores_its_state_dict():
    model = randomize_batch_norms(build("mobilenet_v2"))
    state = copy.deepcopy(model.state_dict())
    model, _ = freeze_bn(model)
    model, report = unfreeze_bn(model)
    assert len(report.changed) == 10
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_recipe_survives_deepcopy_and_pickle():
    model, _ = freeze_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.01)))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone, _ = unfreeze_bn(clone)
        assert type(clone[1]) is nn.BatchNorm2d and clone[1].momentum == 0.01


def test_untracked_and_frozen_are_skipped_with_reasons_and_3d_is_frozen():
    model = nn.Sequential(
        nn.BatchNorm3d(2),
        nn.BatchNorm2d(2, track_running_stats=False),
        normlab.FrozenBatchNorm2d(2),
        FrozenBatchNorm2d(2),
        nn.BatchNorm2d(2),
    )
    model, report = freeze_bn(model)
    assert [c.name for c in report.changed] == ["0", "4"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "track_running_stats=False" in reasons["1"]
    assert reasons["2"] == reasons["3"] == "already frozen"
    assert isinstance(model[0], normlab.FrozenBatchNorm3d) and isinstance(model[1], nn.BatchNorm2d)


def test_include_exclude():
    model = build("resnet")
    model, report = freeze_bn(model, include=["layer1.*", "bn1"], exclude="*.bn2")
    assert [c.name for c in report.changed] == ["bn1", "layer1.0.bn1"]
    assert isinstance(model.layer1[0].bn2, nn.BatchNorm2d)
    assert {s.reason for s in report.skipped} == {"not selected by include/exclude"}
    model, report = unfreeze_bn(model, exclude="bn1")
    assert [c.name for c in report.changed] == ["layer1.0.bn1"]
    assert isinstance(model.bn1, normlab.FrozenBatchNorm2d)


def test_device_dtype_and_training_flags_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(4)).double().train()
    model[2].eval()
    model, _ = freeze_bn(model)
    assert model.training and model[1].training and not model[2].training
    assert model[1].running_mean.dtype == model[1].weight.dtype == torch.float64
    model, _ = unfreeze_bn(model)
    assert model[1].weight.dtype == torch.float64 and model[1].training and not model[2].training
    meta, _ = freeze_bn(nn.BatchNorm2d(4, device="meta"))
    assert meta.running_var.device.type == "meta"
    assert unfreeze_bn(meta)[0].weight.device.type == "meta"


def test_shared_batch_norm_is_replaced_at_every_name():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    model, report = freeze_bn(model)
    assert model[1] is model[3] and isinstance(model[1], normlab.FrozenBatchNorm2d) and len(report.changed) == 1


def test_unfreezing_a_foreign_frozen_batch_norm_builds_a_normlab_batch_norm():
    model = nn.Sequential(FrozenBatchNorm2d(4, eps=1e-3), normlab.FrozenBatchNorm1d(4))
    randomize_batch_norms(model)
    model, report = unfreeze_bn(model)
    assert type(model[0]) is normlab.BatchNorm2d and type(model[1]) is normlab.BatchNorm1d
    assert model[0].eps == 1e-3 and model[0].weight.requires_grad
    assert "not frozen by freeze_bn" in report.changed[0].note
    x = torch.randn(2, 4, 3, 3)
    ref = FrozenBatchNorm2d(4, eps=1e-3)
    ref.load_state_dict({k: v for k, v in model[0].state_dict().items() if k != "num_batches_tracked"})
    assert_close(model[0].eval()(x), ref(x))


def test_model_without_batch_norm_gives_a_clean_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    for tool in (freeze_bn, unfreeze_bn):
        out, report = tool(model)
        assert out is model and report.changed == [] and report.skipped == []
