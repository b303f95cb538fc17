"""to_sync_bn / from_sync_bn: types, shared state, state_dict compatibility, dim inference, and a 2-process run."""

import copy

import pytest
import torch
from torch import nn

import normlab
from normlab.layers.batch_renorm import BatchRenorm2d
from normlab.layers.frozen_batch_norm import FrozenBatchNorm2d
from normlab.layers.ghost_batch_norm import GhostBatchNorm2d
from normlab.surgery.recalibrate import recalibrate_bn
from normlab.surgery.sync import from_sync_bn, infer_batch_norm_dim, to_sync_bn
from tests.distributed import run_ranks
from tests.helpers import randomize_weight_and_bias
from tests.tolerances import assert_close

_TORCH_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _trained(module, x):
    """``module`` with random affine and running statistics from a few training batches."""
    randomize_weight_and_bias(module).train()
    for step in range(3):
        module(x * (step + 1) + step)
    return module


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=0.2, eps=1e-3),
        nn.Conv2d(4, 4, 1),
        nn.SyncBatchNorm(4),  # dimensionality inferred from the Conv2d before it
        normlab.BatchNorm2d(4, momentum=None),
        GhostBatchNorm2d(4, virtual_batch_size=2),
        FrozenBatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 9, 5),
        nn.BatchNorm1d(5, affine=False),
    )
    for _ in range(3):
        model(torch.randn(6, 3, 3, 3) * 2 + 1)
    model[4].eval()  # per-module training flags must survive
    return model


def _norms(model):
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, normlab.BatchNorm2d))]


def test_to_sync_bn_converts_torch_and_normlab_batch_norms_and_keeps_their_state():
    model = _model()
    before, in_place = copy.deepcopy(model), model[4]
    params = {name: p for name, p in model.named_parameters()}
    x = torch.randn(5, 3, 3, 3)
    out, report = to_sync_bn(model)
    assert out is model
    assert [type(out[i]) for i in (1, 3, 4, 9)] == [
        normlab.BatchNorm2d,
        normlab.BatchNorm2d,
        normlab.BatchNorm2d,
        normlab.BatchNorm1d,
    ]
    assert all(out[i].sync and out[i].process_group is None for i in (1, 3, 4, 9))
    assert [c.name for c in report.changed] == ["1", "3", "4", "9"]
    assert {s.name for s in report.skipped} == {"5", "6"}
    assert "no sync" in report.skipped[0].reason and "frozen" in report.skipped[1].reason
    assert out[4] is in_place  # a normlab batch norm is switched in place
    for i in (1, 3, 4, 9):
        old, new = before[i], out[i]
        assert (new.eps, new.momentum, new.affine, new.track_running_stats, new.training) == (
            old.eps,
            old.momentum,
            old.affine,
            old.track_running_stats,
            old.training,
        )
        assert new.state_dict().keys() == old.state_dict().keys()
        for k, v in old.state_dict().items():
            assert torch.equal(new.state_dict()[k], v), (i, k)
        ref = _TORCH_BY_DIM[1 if i == 9 else 2](old.num_features, affine=old.affine)
        ref.load_state_dict(new.state_dict())
    # parameters are shared, not copied: an optimizer built before the conversion still trains the model
    assert all(p is params[name] for name, p in out.named_parameters())
    # without a process group the converted model computes exactly what it did
    assert_close(out.eval()(x), before.eval()(x))
    assert_close(out.train()(x), before.train()(x))


def test_to_sync_bn_in_place_group_handling():
    group = object()  # stands for a torch.distributed group: only stored
    bn, brn, sbn = normlab.BatchNorm2d(3), BatchRenorm2d(3), nn.SyncBatchNorm(3, process_group=group)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn, brn, nn.Conv2d(3, 3, 1), sbn)
    model, report = to_sync_bn(model)
    assert model[1] is bn and bn.sync and brn.sync and model[4].process_group is group  # own group kept
    assert [c.note for c in report.changed[:2]] == ["sync switched on in place"] * 2
    _, report = to_sync_bn(model)
    assert (
        report.changed == []
        and [s.reason for s in report.skipped] == ["already synchronized over that process group"] * 3
    )
    other = object()
    _, report = to_sync_bn(model, process_group=other)
    assert len(report.changed) == 3 and all(model[i].process_group is other for i in (1, 2, 4))


def test_from_sync_bn_gives_plain_batch_norms_whose_state_loads_into_torch():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5)
    sbn = _trained(nn.SyncBatchNorm(4, momentum=0.3).double(), x.double())
    sbn.eval()
    model = nn.Sequential(nn.Conv1d(4, 4, 1).double(), sbn, nn.Conv1d(4, 4, 1), normlab.BatchNorm1d(4, sync=True))
    state = copy.deepcopy(model.state_dict())
    ref_out = sbn(x.double())
    model, report = from_sync_bn(model)
    new = model[1]
    assert type(new) is nn.BatchNorm1d and new.running_mean is sbn.running_mean and new.weight is sbn.weight
    assert (new.momentum, new.eps, new.training, new.weight.dtype) == (0.3, sbn.eps, False, torch.float64)
    assert type(model[3]) is normlab.BatchNorm1d and not model[3].sync and model[3].process_group is None
    assert [c.name for c in report.changed] == ["1", "3"]
    assert_close(new(x.double()), ref_out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch_bn = nn.BatchNorm1d(4)
    torch_bn.load_state_dict(model[3].state_dict())


def test_round_trip_restores_the_torch_state_dict():
    model = _model()
    state = copy.deepcopy(model.state_dict())
    model, _ = to_sync_bn(model)
    model, _ = from_sync_bn(model)
    assert not any(getattr(m, "sync", False) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_sync_batch_norm_dimensionality_inference():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.Conv3d(4, 2, 1), nn.SyncBatchNorm(2), nn.ConvTranspose2d(2, 2, 1)
    )
    assert [infer_batch_norm_dim(model, n) for n in ("1", "3")] == [1, 3]
    model, _ = from_sync_bn(model)
    assert [type(model[i]) for i in (1, 3)] == [nn.BatchNorm1d, nn.BatchNorm3d]

    mismatched = nn.Sequential(nn.Conv2d(3, 5, 1), nn.SyncBatchNorm(4))
    lonely = nn.SyncBatchNorm(4)
    for model in (mismatched, lonely):
        with pytest.raises(ValueError, match=r"cannot infer .* pass dim=1, 2 or 3"):
            from_sync_bn(model)
        with pytest.raises(ValueError, match=r"cannot infer"):
            to_sync_bn(model)
    assert type(mismatched[1]) is nn.SyncBatchNorm  # nothing changed
    root, report = from_sync_bn(lonely, dim=2)
    assert type(root) is nn.BatchNorm2d and report.changed[0].name == "(root)"
    root, _ = to_sync_bn(lonely, dim=3)
    assert type(root) is normlab.BatchNorm3d and root.sync


def test_shared_module_is_replaced_everywhere():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    model, report = to_sync_bn(model)
    assert model[0] is model[2] and type(model[0]) is normlab.BatchNorm2d and len(report.changed) == 1


def test_subclasses_are_skipped():
    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x).relu()

    model, report = to_sync_bn(nn.Sequential(BatchNormAct(3)))
    assert type(model[0]) is BatchNormAct and "not a plain batch norm" in report.skipped[0].reason


@pytest.mark.parametrize("dim", [0, 4, 2.0, True, "2"])
def test_bad_dim(dim):
    for tool in (to_sync_bn, from_sync_bn):
        with pytest.raises(ValueError, match=f"dim={dim!r} must be 1, 2 or 3"):
            tool(nn.Sequential(), dim=dim)


def test_invalid_hyperparameters_for_normlab_are_refused_naming_the_module():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, eps=0.0))
    with pytest.raises(ValueError, match=r"to_sync_bn: cannot convert '1': BatchNorm2d: eps=0.0"):
        to_sync_bn(model)


# ------------------------------------------------------------------------------------------ 2 gloo processes

SIZES = (3, 5)


def _torch_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    for m in (model[1], model[4]):
        randomize_weight_and_bias(m)
    return model


def _check_rank(rank):
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 3, 2, 3, generator=g) * 2 + 1 for n in SIZES]
    ref = _torch_model()
    y_ref = ref(torch.cat(xs)).split(SIZES)[rank]
    model, _ = to_sync_bn(_torch_model())
    y = model(xs[rank])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for i in (1, 4):
        torch.testing.assert_close(model[i].running_mean, ref[i].running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[i].running_var, ref[i].running_var, rtol=1e-5, atol=1e-5)
    # recalibration of a synchronized model merges every rank's batches, as its forward does
    recalibrate_bn(model, [xs[rank], xs[rank] + 1], num_batches=2)
    with torch.no_grad():
        h = ref[0].double()(torch.cat(xs + [x + 1 for x in xs]).double()).transpose(0, 1).flatten(1)
    torch.testing.assert_close(model[1].running_mean, h.mean(1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, h.var(1).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_converted_model_computes_synced_statistics_over_two_gloo_processes():
    run_ranks(_check_rank)
