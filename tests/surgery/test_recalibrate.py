"""PreciseBN recalibration: exact population statistics, restored state, skips and data handling."""

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normlab
from normlab.layers.batch_renorm import BatchRenorm2d
from normlab.layers.evonorm import EvoNorm2dB0
from normlab.layers.frozen_batch_norm import FrozenBatchNorm2d
from normlab.layers.ghost_batch_norm import GhostBatchNorm2d
from normlab.layers.group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d
from normlab.surgery.recalibrate import merge_batch_stats, recalibrate_bn
from tests.tolerances import assert_close

C = 3
SIZES = (1, 4, 7, 1, 2, 5)  # varying, with batches of 1


def _batches(spatial, sizes=SIZES, dtype=torch.float64, c=C):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, c, *spatial, generator=g, dtype=dtype) * (1 + i) + 3 * i) for i, n in enumerate(sizes)]


def _population(xs):
    """Per-channel mean and unbiased variance of all values of the concatenated inputs, float64."""
    x = torch.cat([t.double() for t in xs]).transpose(0, 1).reshape(xs[0].shape[1], -1)
    return x.mean(1), x.var(1, correction=1)


def _instance_population(xs):
    """Average over all instances of each instance's spatial mean and unbiased spatial variance, float64."""
    x = torch.cat([t.double() for t in xs]).flatten(2)
    return x.mean(2).mean(0), x.var(2, correction=1).mean(0)


def _capture_inputs(model, names, batches):
    """The inputs each named module receives when only the norms ``names`` run in training mode (the definition)."""
    model = copy.deepcopy(model)
    seen = {n: [] for n in names}
    for n in names:
        mod = model.get_submodule(n)
        mod.training = True
        mod.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
    with torch.no_grad():
        for x in batches:
            model(x)
    return seen


# ------------------------------------------------------------------------------------------- merge_batch_stats


@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=9), c=st.sampled_from([1, 3]))
def test_merge_equals_statistics_of_the_concatenation(sizes, c):
    g = torch.Generator().manual_seed(len(sizes))
    parts = [torch.randn(n, c, generator=g, dtype=torch.float64) * (i + 1) + 10 * i for i, n in enumerate(sizes)]
    mean, var, count = merge_batch_stats(
        torch.tensor(sizes), torch.stack([p.mean(0) for p in parts]), [p.var(0, correction=0) for p in parts]
    )
    x = torch.cat(parts)
    assert count.dtype == mean.dtype == var.dtype == torch.float64 and int(count) == sum(sizes)
    assert_close(mean, x.mean(0))
    assert_close(var, x.var(0, correction=0))


def test_merge_is_not_the_mean_of_batch_variances():
    parts = [torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)]
    mean, var, _ = merge_batch_stats([4, 4], [p.mean(0) for p in parts], [p.var(0, correction=0) for p in parts])
    assert float(mean) == 0.5 and float(var) == 0.25  # the batch variances are both 0


def test_merge_ignores_empty_batches():
    nan = torch.full((2,), float("nan"))
    mean, var, count = merge_batch_stats([0, 3, 0], [nan, torch.tensor([1.0, 2.0]), nan], [nan, torch.ones(2), nan])
    assert int(count) == 3
    assert_close(mean, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert_close(var, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "counts,means,vars_,match",
    [
        ([], [], [], "counts is empty"),
        ([1, -2], torch.zeros(2, 3), torch.zeros(2, 3), r"counts=\[1.0, -2.0\] must be >= 0"),
        ([0, 0], torch.zeros(2, 3), torch.zeros(2, 3), "not all 0"),
        ([1, 2], torch.zeros(3, 3), torch.zeros(3, 3), r"got counts \(2,\), means \(3, 3\)"),
        ([1, 2], torch.zeros(2, 3), torch.zeros(2, 4), r"vars \(2, 4\)"),
    ],
)
def test_merge_rejects_bad_input(counts, means, vars_, match):
    with pytest.raises(ValueError, match=match):
        merge_batch_stats(counts, means, vars_)


# ---------------------------------------------------------------------------------------- exact recalibration

BATCH_NORMS = [
    pytest.param(lambda: nn.BatchNorm1d(C), (5,), id="torch.BatchNorm1d"),
    pytest.param(lambda: nn.BatchNorm2d(C), (3, 2), id="torch.BatchNorm2d"),
    pytest.param(lambda: nn.BatchNorm3d(C, momentum=None), (2, 2, 2), id="torch.BatchNorm3d-cumulative"),
    pytest.param(lambda: nn.SyncBatchNorm(C), (3, 2), id="torch.SyncBatchNorm"),
    pytest.param(lambda: normlab.BatchNorm1d(C), (5,), id="normlab.BatchNorm1d"),
    pytest.param(lambda: normlab.BatchNorm2d(C, momentum=0.3), (3, 2), id="normlab.BatchNorm2d"),
    pytest.param(lambda: normlab.BatchNorm3d(C), (2, 2, 2), id="normlab.BatchNorm3d"),
    pytest.param(lambda: GhostBatchNorm2d(C, virtual_batch_size=2), (3, 2), id="GhostBatchNorm2d"),
    pytest.param(lambda: BatchRenorm2d(C, warmup_steps=10), (3, 2), id="BatchRenorm2d"),
    pytest.param(lambda: EvoNorm2dB0(C), (3, 2), id="EvoNorm2dB0"),
]


@pytest.mark.parametrize("make,spatial", BATCH_NORMS)
def test_batch_norm_statistics_are_the_population_statistics(make, spatial):
    norm = make().double().eval()
    model = nn.Sequential(norm, nn.ReLU())
    momentum = norm.momentum
    batches = _batches(spatial)
    _, report = recalibrate_bn(model, batches, num_batches=len(batches))
    mean, var = _population(batches)
    assert_close(norm.running_mean, mean)
    assert_close(norm.running_var, var)
    assert int(norm.num_batches_tracked) == 1 and norm.momentum == momentum and not norm.training
    assert [c.name for c in report.changed] == ["0"] and not report.skipped
    assert f"{sum(SIZES) * torch.Size(spatial).numel()} values per channel in 6 call(s)" in report.changed[0].after


@pytest.mark.parametrize(
    "make,spatial",
    [
        pytest.param(lambda: nn.InstanceNorm1d(C, track_running_stats=True), (5,), id="torch.InstanceNorm1d"),
        pytest.param(lambda: nn.InstanceNorm2d(C, track_running_stats=True), (3, 2), id="torch.InstanceNorm2d"),
        pytest.param(lambda: InstanceNorm1d(C, track_running_stats=True), (5,), id="normlab.InstanceNorm1d"),
        pytest.param(lambda: InstanceNorm2d(C, track_running_stats=True), (3, 2), id="normlab.InstanceNorm2d"),
    ],
)
def test_instance_norm_statistics_are_averages_over_instances(make, spatial):
    norm = make().double()
    batches = _batches(spatial)
    _, report = recalibrate_bn(norm, batches, num_batches=len(batches))
    mean, var = _instance_population(batches)
    assert_close(norm.running_mean, mean)
    assert_close(norm.running_var, var)
    assert f"averaged over {sum(SIZES)} instances" in report.changed[0].after
    # on one batch: what the layer's own training update records with momentum 1
    tracked = make().double().train()
    tracked.momentum = 1.0
    x = _batches(spatial, sizes=(5,))[0]
    tracked(x)
    recalibrate_bn(norm, [x], num_batches=1)
    assert_close(norm.running_mean, tracked.running_mean)
    assert_close(norm.running_var, tracked.running_var)


def _net():
    return nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 5, 3, padding=1),
        normlab.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 6),
        nn.BatchNorm1d(6),
    ).double()


def test_every_norm_of_a_network_gets_the_statistics_of_its_training_mode_inputs():
    model = _net().eval()  # dropout off: the norms still run with batch statistics
    batches = _batches((5, 4), sizes=(2, 5, 3, 4))
    seen = _capture_inputs(model, ["1", "5", "10"], batches)
    recalibrate_bn(model, batches, num_batches=4)
    for name, inputs in seen.items():
        mean, var = _population(inputs)
        assert_close(model.get_submodule(name).running_mean, mean, msg=name)
        assert_close(model.get_submodule(name).running_var, var, msg=name)


def test_float32_model_matches_the_float64_population_statistics():
    norm = nn.BatchNorm2d(C)
    batches = _batches((4, 3), dtype=torch.float32)
    recalibrate_bn(norm, [x * 10 + 1e3 for x in batches], num_batches=len(batches))
    mean, var = _population([x * 10 + 1e3 for x in batches])
    assert norm.running_mean.dtype == torch.float32
    assert_close(norm.running_mean, mean.float())
    assert_close(norm.running_var, var.float(), scale=10)


def test_training_flags_momentum_hooks_other_modules_and_parameters_are_untouched():
    model = _net().train()
    model[3].eval()
    model[5].momentum = 0.25
    flags = [m.training for m in model.modules()]
    params = {k: v.clone() for k, v in model.named_parameters()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    recalibrate_bn(model, _batches((5, 4), sizes=(2, 3)), num_batches=2)
    assert [m.training for m in model.modules()] == flags
    assert model[1].momentum == 0.1 and model[5].momentum == 0.25 and model[10].momentum == 0.1
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k


class _Counter(nn.Module):
    """A non-norm module with state that its training forward changes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return x


class _UnknownNorm(nn.Module):
    """Stands for norms recalibrate_bn does not know (OnlineNorm, MovingAverageBatchNorm2d, ...)."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c, dtype=torch.float64))

    def forward(self, x):
        if self.training:
            self.running_mean.lerp_(x.mean((0, 2, 3)), 0.5)
        return x


def test_other_modules_state_is_restored_and_unknown_norms_are_skipped():
    model = nn.Sequential(_Counter(), _UnknownNorm(C), nn.BatchNorm2d(C).double(), FrozenBatchNorm2d(C)).train()
    model.append(nn.BatchNorm2d(C, track_running_stats=False).double())
    model.append(GroupNorm(C, num_groups=1).double())
    _, report = recalibrate_bn(model, _batches((2, 2)), num_batches=len(SIZES))
    assert int(model[0].calls) == 0 and not model[1].running_mean.any()
    assert [c.name for c in report.changed] == ["2"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"1", "3", "4"}
    assert "_UnknownNorm keeps running statistics that recalibrate_bn does not know" in reasons["1"]
    assert "frozen batch norm" in reasons["3"] and "track_running_stats=False" in reasons["4"]


def test_everything_is_restored_and_nothing_written_when_the_forward_raises():
    model = _net().eval()
    model[5].momentum = None
    state = copy.deepcopy(model.state_dict())
    calls = []

    def forward_fn(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        m(batch)

    with pytest.raises(RuntimeError, match="boom"):
        recalibrate_bn(model, _batches((5, 4), sizes=(2, 3, 4, 5)), num_batches=4, forward_fn=forward_fn)
    assert not any(m.training for m in model.modules()) and model[5].momentum is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_one_value_per_channel_raises_and_restores():
    bn = nn.BatchNorm1d(C).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        recalibrate_bn(bn, [torch.randn(4, C), torch.randn(1, C)])
    assert not bn.training and int(bn.num_batches_tracked) == 0 and not bn._forward_hooks


def test_batch_renorm_forwards_see_the_original_running_statistics():
    brn = BatchRenorm2d(C, r_max=2.0, d_max=1.0, warmup_steps=5).double()
    with torch.no_grad():
        brn.running_mean.fill_(7.0)
    seen = []
    brn.register_forward_pre_hook(lambda m, a: seen.append((m.running_mean.clone(), int(m.num_batches_tracked))))
    recalibrate_bn(brn, _batches((3, 2)), num_batches=len(SIZES))
    assert len(seen) == len(SIZES)
    assert all(bool((rm == 7.0).all()) and nbt == 0 for rm, nbt in seen)


def test_short_data_warns_and_uses_what_there_is():
    norm = nn.BatchNorm2d(C).double()
    batches = _batches((2, 3))
    with pytest.warns(UserWarning, match=r"data gave 6 batches, fewer than num_batches=10"):
        _, report = recalibrate_bn(norm, iter(batches), num_batches=10)
    assert_close(norm.running_var, _population(batches)[1])
    assert "6 batch(es)" in report.notes[0]


def test_only_num_batches_are_consumed():
    norm = nn.BatchNorm2d(C).double()
    batches = _batches((2, 3))
    stream = iter(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recalibrate_bn(norm, stream, num_batches=4)
    assert_close(norm.running_var, _population(batches[:4])[1])
    assert next(stream) is batches[4]


def test_model_without_norms_gives_a_clean_report_and_runs_nothing():
    def data():
        raise AssertionError("data must not be read")
        yield

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4))
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, report = recalibrate_bn(model, data(), num_batches=5)
    assert out is model and report.changed == [] and report.skipped == []
    assert "nothing was run" in report.notes[0]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_batch_layouts_and_forward_fn():
    xs = _batches((2, 2), sizes=(2, 3))
    expected = _population(xs)
    layouts = {
        "tuple": [(x, torch.zeros(len(x))) for x in xs],
        "list": [[x, "meta"] for x in xs],
        "dict": [{"label": 0, "image": x} for x in xs],
    }
    for layout, data in layouts.items():
        norm = nn.BatchNorm2d(C).double()
        recalibrate_bn(norm, data, num_batches=2, device="cpu")
        assert_close(norm.running_var, expected[1], msg=layout)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(C).double()

        def forward(self, a, b):
            return self.bn(a + b)

    model = TwoInputs()
    data = [{"a": x, "b": x} for x in xs]
    recalibrate_bn(model, data, num_batches=2, forward_fn=lambda m, batch: m(batch["a"], batch["b"]))
    assert_close(model.bn.running_var, 4 * expected[1])


def test_shared_module_counts_every_call():
    bn = nn.BatchNorm2d(C).double()
    model = nn.Sequential(bn, nn.Identity(), bn)  # second call sees normalized inputs
    xs = _batches((2, 2), sizes=(3, 4))
    seen = _capture_inputs(model, ["0"], xs)
    _, report = recalibrate_bn(model, xs, num_batches=2)
    assert len(seen["0"]) == 4 and "in 4 call(s)" in report.changed[0].after
    assert_close(bn.running_var, _population(seen["0"])[1])


def test_include_exclude_and_unused_norms():
    model = nn.ModuleDict({"a": nn.BatchNorm2d(C), "b": nn.BatchNorm2d(C), "unused": nn.BatchNorm2d(C)})
    model.forward = lambda x: model["b"](model["a"](x))
    _, report = recalibrate_bn(model, [torch.randn(2, C, 2, 2)], num_batches=1, exclude="a")
    assert [c.name for c in report.changed] == ["b"]
    assert {s.name: s.reason for s in report.skipped} == {
        "a": "not selected by include/exclude",
        "unused": "received no input in 1 batch(es); running statistics left unchanged",
    }
    assert int(model["a"].num_batches_tracked) == 0 and int(model["unused"].num_batches_tracked) == 0


def test_non_finite_inputs_leave_the_statistics_unchanged():
    bn = nn.BatchNorm2d(C)
    x = torch.randn(2, C, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    _, report = recalibrate_bn(bn, [x], num_batches=1)
    assert report.changed == [] and "non-finite" in report.skipped[0].reason
    assert bool((bn.running_var == 1).all()) and int(bn.num_batches_tracked) == 0


def test_doctor_call_on_a_deep_copy_leaves_the_original_alone():
    model = _net()
    state = copy.deepcopy(model.state_dict())
    copy_, report = recalibrate_bn(copy.deepcopy(model), _batches((5, 4), sizes=(2, 3)), 2)
    assert len(report.changed) == 3 and copy_ is not model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.equal(copy_[1].running_mean, model[1].running_mean)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"data": torch.randn(4, C, 2, 2)}, r"got a tensor of shape \(4, 3, 2, 2\)"),
        ({"data": [torch.randn(2, C, 2, 2)], "num_batches": 0}, "num_batches=0 must be a positive integer"),
        ({"data": [{"labels": torch.randn(2, C, 2, 2)}]}, r"keys \['labels'\]"),
        ({"data": [()]}, "batch of type tuple"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recalibrate_bn(nn.BatchNorm2d(C), **kwargs)
