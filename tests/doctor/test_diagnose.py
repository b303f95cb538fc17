import importlib
import json
import math
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normlab
from normlab.doctor import DoctorInternalError, diagnose
from normlab.doctor.hazards import LayerObservation, SmallStatisticsBatch, TrainEvalGap, batch_independent_spec
from normlab.surgery import freeze_bn
from normlab.surgery.recalibrate import recalibrate_bn
from tests.doctor.fixtures import MLP, ConvNet, NoBatchNorm, Recurrent, calibrated, images, vectors

# the module (the package's attribute of that name is the function)
diagnose_module = importlib.import_module("normlab.doctor.diagnose")


def hazards(report) -> dict[str, set[str]]:
    """{hazard id: {layers}} of a report."""
    found: dict[str, set[str]] = {}
    for f in report.findings:
        found.setdefault(f.hazard, set()).add(f.layer)
    return found


def state(model: nn.Module):
    """Every parameter and buffer (cloned, NaN-aware comparable) and every module's training flag."""
    tensors = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    flags = {n: m.training for n, m in model.named_modules()}
    return tensors, flags


def assert_same_state(before, after):
    assert before[1] == after[1]
    assert before[0].keys() == after[0].keys()
    for name, t in before[0].items():
        assert torch.equal(t.nan_to_num(), after[0][name].nan_to_num()), name
        assert torch.equal(t.isnan(), after[0][name].isnan()), name


# --- a clean model, and one model per hazard, flagged with exactly that hazard ---------------------------------------


def test_clean_model_gets_clean_report():
    data = images(batch_size=32)
    report = diagnose(calibrated(ConvNet(), data), data)
    assert report.clean and report.findings == [] and report.ranked_fixes() == []
    assert [s.name for s in report.layers] == ["bn1", "bn2"]
    for s in report.layers:
        assert s.trained and s.values_per_channel == 32 * 4 * 4 and s.calls_per_forward == 1
        assert s.ema_precise_gap == pytest.approx(0.0, abs=1e-6)  # statistics are the precise ones
        assert 0 < s.train_eval_gap < 0.1  # only the batches' sampling noise
    assert 0 < report.output_rel_diff < 0.1
    assert report.num_batches == 8 and report.batch_sizes == [32] * 8
    assert "No hazards found." in str(report)


def test_model_without_batch_norm_is_clean_and_says_so():
    report = diagnose(NoBatchNorm(), images())
    assert report.clean and report.layers == []
    assert any("no batch norm" in n for n in report.notes)
    assert "no batch norm" in str(report)


@pytest.mark.parametrize("batch_size, severity", [(4, "severe"), (20, "warning")])
def test_small_effective_batch(batch_size, severity):
    data = vectors(batch_size=batch_size)
    report = diagnose(calibrated(MLP(), data), data)
    assert hazards(report) == {"small_batch_stats": {"bn"}}
    (finding,) = report.findings
    assert finding.severity == severity
    assert finding.evidence["values_per_channel"] == batch_size
    assert finding.evidence["samples_per_batch"] == batch_size and finding.evidence["spatial_positions"] == 1
    assert finding.fix == 'normlab.swap_norm(model, "ln")'  # (N, C) inputs: LayerNorm
    assert any(f.startswith("with normlab.accumulating_bn(model, steps=") for f in finding.fixes)
    assert "per_rank" not in finding.evidence


def test_small_batch_counts_spatial_positions():
    # 2 images of 3x3 positions: 18 values per channel; GroupNorm over 8 channels is the proposed swap
    data = images(batch_size=2, size=3)
    report = diagnose(calibrated(ConvNet(), data), data)
    assert hazards(report) == {"small_batch_stats": {"bn1", "bn2"}}
    for f in report.findings:
        assert f.severity == "warning" and f.evidence["values_per_channel"] == 18
        assert f.evidence["spatial_positions"] == 9 and f.fix == 'normlab.swap_norm(model, "gn:8")'


def test_small_batch_thresholds_are_class_attributes():
    assert (SmallStatisticsBatch.warn_below, SmallStatisticsBatch.severe_below) == (32, 8)
    assert (TrainEvalGap.warn_at, TrainEvalGap.severe_at) == (0.2, 0.5)


def test_small_batch_under_ddp_is_per_rank_and_counts_synchronized_ranks(monkeypatch):
    monkeypatch.setattr(diagnose_module, "_world_size", lambda: 4)
    data = images(batch_size=2, size=2)  # 8 values per channel on this rank
    model = calibrated(ConvNet(), data)
    model.bn2 = normlab.BatchNorm2d(8, sync=True)  # no process group: computes locally, but syncs under DDP
    model = calibrated(model, data)
    report = diagnose(model, data)
    assert any("per rank" in n for n in report.notes)
    assert hazards(report) == {"small_batch_stats": {"bn1"}}  # bn2 sees 4 x 8 = 32 values
    (finding,) = report.findings
    assert finding.evidence["per_rank"] is True and finding.evidence["values_per_channel"] == 8
    assert finding.fix == "normlab.to_sync_bn(model)  # under DDP: statistics over every rank's batch"
    assert "per rank" in finding.message
    assert report.layers[1].values_per_channel == 32


def test_stale_running_statistics_flag_train_eval_gap():
    data = images(batch_size=32, mean=3.0, std=2.0)  # fresh statistics (0, 1) are far from these
    torch.manual_seed(0)
    report = diagnose(ConvNet().eval(), data)
    assert hazards(report) == {"train_eval_gap": {"bn1", "bn2"}}
    first = report.findings[0]
    assert first.layer == "bn1" and first.severity == "severe"
    assert first.fix == "normlab.recalibrate_bn(model, data)"
    assert first.evidence["ema_precise_gap"] >= 0.5 and first.evidence["train_eval_gap"] >= 0.5
    assert first.evidence["output_rel_diff"] == report.output_rel_diff > 0.5
    assert first.evidence["num_batches_tracked"] == 0
    # recalibrating, as the fix says, cures it
    stale = ConvNet().eval()
    fixed, _ = recalibrate_bn(stale, data, len(data))
    assert diagnose(fixed, data).clean


def test_train_eval_gap_within_noise_of_precise_statistics_is_not_judged():
    # a momentum-0.1 EMA over batches of 4 vs precise statistics of only 8 x 4 values: differences are noise
    model = MLP().train()
    with torch.no_grad():
        for x in vectors(batches=300, batch_size=4, seed=1):
            model(x)
    report = diagnose(model.eval(), vectors(batch_size=4))
    assert hazards(report) == {"small_batch_stats": {"bn"}}
    assert report.layers[0].ema_precise_gap > 0.2  # above warn_at, yet below 2 x the noise floor sqrt(1.5 / 32)


def test_train_eval_gap_not_judged_without_precise_statistics():
    data = images(batch_size=32, mean=3.0, std=2.0)
    report = diagnose(ConvNet().eval(), data, precise=False)
    assert report.clean
    assert all(s.ema_precise_gap is None and s.train_eval_gap > 0.5 for s in report.layers)


def test_shared_batch_norm_called_per_time_step():
    data = vectors(batch_size=64, features=16)
    report = diagnose(calibrated(Recurrent(steps=3), data), data)
    assert hazards(report) == {"shared_norm_call": {"bn"}}
    assert report.findings[0].evidence == {"calls_per_forward": 3}
    assert report.layers[0].calls_per_forward == 3


def test_nonfinite_running_statistics_are_severe():
    data = images(batch_size=32)
    model = calibrated(ConvNet(), data)
    with torch.no_grad():
        model.bn1.running_var[0] = float("nan")
        model.bn1.running_mean[3] = float("inf")
    report = diagnose(model, data)
    assert hazards(report) == {"degenerate_running_stats": {"bn1"}}
    (finding,) = report.findings
    assert finding.severity == "severe" and finding.evidence["nonfinite_channels"] == 2
    assert finding.fix == "normlab.recalibrate_bn(model, data)"
    assert math.isnan(report.output_rel_diff)  # eval outputs are NaN
    parsed = json.loads(report.to_json())  # and the JSON stays valid
    assert parsed["output_rel_diff"] == "nan"


def test_near_zero_running_variance_warns():
    data = images(batch_size=32)
    model = ConvNet()
    with torch.no_grad():
        model.conv1.weight[2] = 0.0  # channel 2 of bn1 is dead: variance 0
    report = diagnose(calibrated(model, data), data)
    assert hazards(report) == {"degenerate_running_stats": {"bn1"}}
    (finding,) = report.findings
    assert finding.severity == "warning" and finding.evidence["near_zero_var_channels"] == 1
    assert finding.evidence["nonfinite_channels"] == 0


def test_batches_of_one_sample():
    data = images(batch_size=1, size=8)  # 64 spatial positions: enough values, but per-sample statistics
    report = diagnose(calibrated(ConvNet(), data), data)
    assert hazards(report) == {"batch_size_one": {"(data)"}}
    (finding,) = report.findings
    assert finding.severity == "severe" and finding.evidence["batches_of_size_one"] == 8
    assert finding.fix == "normlab.freeze_bn(model)"


def test_batch_of_one_vector_cannot_train_and_is_reported_not_raised():
    data = vectors(batch_size=64)
    data[3] = data[3][:1]
    report = diagnose(calibrated(MLP(), data[:3]), data)
    assert set(hazards(report)) == {"batch_size_one"}
    (finding,) = report.findings
    assert finding.evidence["training_forward_failures"] == 1
    assert "batch 3" in finding.evidence["first_failure"]
    assert finding.fix.startswith("torch.utils.data.DataLoader(") and "drop_last=True" in finding.fix
    assert any("precise statistics could not be computed" in n for n in report.notes)


def test_varying_batch_sizes():
    data = images(batch_size=[32, 32, 32, 12, 32, 32, 32, 20])
    report = diagnose(calibrated(ConvNet(), data), data)
    assert hazards(report) == {"varying_batch_size": {"(data)"}}
    assert report.findings[0].evidence["min_batch_size"] == 12
    assert report.findings[0].evidence["max_batch_size"] == 32


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_keras_style_momentum(momentum):
    data = images(batch_size=32)
    report = diagnose(calibrated(ConvNet(momentum=momentum), data), data)
    assert hazards(report) == {"foreign_momentum": {"bn1", "bn2"}}
    finding = report.for_layer("bn2")[0]
    assert finding.evidence == {"momentum": momentum, "pytorch_equivalent_if_keras": round(1 - momentum, 2)}
    assert finding.fix == f'model.get_submodule("bn2").momentum = normlab.momentum_from_keras({momentum})'


def test_momentum_fix_for_a_root_batch_norm_and_none_momentum_is_fine():
    data = vectors(batch_size=64, features=4)
    report = diagnose(calibrated(nn.BatchNorm1d(4, momentum=0.9), data), data)
    assert report.findings[0].layer == "(root)"
    assert report.findings[0].fix == "model.momentum = normlab.momentum_from_keras(0.9)"
    assert diagnose(calibrated(nn.BatchNorm1d(4, momentum=None), data), data).clean


# --- ranking, frozen layers, the model left alone ----------------------------------------------------------------


def test_findings_are_ranked_severe_first_then_by_hazard_and_layer():
    data = vectors(batch_size=4)
    model = calibrated(MLP(momentum=0.9), data)
    with torch.no_grad():
        model.bn.running_var[0] = float("nan")
    report = diagnose(model, data)
    order = [(f.severity, f.hazard) for f in report.findings]
    assert order == [
        ("severe", "degenerate_running_stats"),
        ("severe", "small_batch_stats"),
        ("warning", "foreign_momentum"),
    ]
    assert report.ranked_fixes() == [
        "normlab.recalibrate_bn(model, data)",
        'normlab.swap_norm(model, "ln")',
        'model.get_submodule("bn").momentum = normlab.momentum_from_keras(0.9)',
    ]


def test_batch_norm_in_eval_inside_training_model_counts_as_frozen():
    data = images(batch_size=2, size=2)  # small batches: only training batch norms are flagged
    model = calibrated(ConvNet(), data).train()
    model.bn2.eval()
    report = diagnose(model, data)
    assert [s.trained for s in report.layers] == [True, False]
    assert hazards(report) == {"small_batch_stats": {"bn1"}}
    assert "(frozen)" in str(report)


def test_frozen_batch_norm_only_checked_for_degenerate_statistics():
    data = images(batch_size=2, size=2)
    model, _ = freeze_bn(calibrated(ConvNet(momentum=0.9), data))
    with torch.no_grad():
        model.bn1.running_var[1] = float("nan")
    report = diagnose(model, data)
    assert [s.trained for s in report.layers] == [False, False]
    assert hazards(report) == {"degenerate_running_stats": {"bn1"}}


def test_model_is_left_unchanged():
    data = images(batch_size=4, size=4, mean=1.0)
    model = ConvNet(momentum=0.9).train()
    model.bn2.eval()
    with torch.no_grad():
        model.bn1.running_var[0] = float("nan")
    before = state(model)
    hooks = (dict(model.bn1._forward_pre_hooks), dict(model.bn1._forward_hooks))
    report = diagnose(model, data)
    assert not report.clean
    assert_same_state(before, state(model))
    assert (dict(model.bn1._forward_pre_hooks), dict(model.bn1._forward_hooks)) == hooks
    assert int(model.bn1.num_batches_tracked) == 0


class SharedOnCopy(nn.BatchNorm2d):
    """A batch norm that a deep copy does not copy: training passes on the copies would change it."""

    def __deepcopy__(self, memo):
        return self


def test_internal_error_if_the_model_changed():
    model = ConvNet()
    model.bn1 = SharedOnCopy(8)
    with pytest.raises(DoctorInternalError, match="buffer bn1.running_mean"):
        diagnose(model, images(batch_size=8), precise=False)


# --- data handling ----------------------------------------------------------------------------------------------


def test_fewer_batches_than_asked_warns_and_uses_them():
    data = images(batches=3, batch_size=32)
    with pytest.warns(UserWarning, match="3 batch"):
        report = diagnose(calibrated(ConvNet(), data), iter(data), num_batches=8)
    assert report.num_batches == 3 and report.clean
    assert any("fewer than num_batches=8" in n for n in report.notes)


def test_num_batches_limits_the_batches_used():
    data = images(batches=8, batch_size=32)
    report = diagnose(calibrated(ConvNet(), data), data, num_batches=2)
    assert report.num_batches == 2 and report.layers[0].values_per_channel == 32 * 16


def test_no_data_runs_static_checks_only():
    model = ConvNet(momentum=0.9)
    report = diagnose(model, None)
    assert hazards(report) == {"foreign_momentum": {"bn1", "bn2"}}
    assert report.num_batches == 0 and report.output_rel_diff is None
    assert any("no data" in n for n in report.notes)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_batches=0"):
        diagnose(ConvNet(), images(), num_batches=0)
    with pytest.raises(ValueError, match="data must be an iterable"):
        diagnose(ConvNet(), 3)
    with pytest.raises(ValueError, match="batch of type dict"):
        diagnose(ConvNet(), [{"x": torch.randn(2, 3, 4, 4)}] * 8)


def test_float64_model_and_plain_tensor_batches():
    data = [x.double() for x, _ in images(batch_size=32)]
    model = calibrated(ConvNet().double(), data)
    assert diagnose(model, data).clean


# --- the report -------------------------------------------------------------------------------------------------


def small_batch_report():
    torch.manual_seed(0)
    data = vectors(batch_size=4)
    return diagnose(calibrated(MLP(momentum=0.9), data), data)


def test_report_to_dict_and_json():
    report = small_batch_report()
    parsed = json.loads(report.to_json())
    assert parsed == json.loads(json.dumps(report.to_dict()))
    assert parsed["clean"] is False and parsed["model"] == "MLP"
    assert [f["hazard"] for f in parsed["findings"]] == ["small_batch_stats", "foreign_momentum"]
    first = parsed["findings"][0]
    assert set(first) == {"hazard", "layer", "severity", "evidence", "fixes", "message"}
    assert first["evidence"]["values_per_channel"] == 4 and first["fixes"][0] == 'normlab.swap_norm(model, "ln")'
    assert parsed["layers"][0]["name"] == "bn" and parsed["ranked_fixes"] == report.ranked_fixes()


def test_plain_text_table():
    text = small_batch_report().render(use_rich=False)
    assert text == str(small_batch_report())
    lines = text.splitlines()
    assert lines[0].startswith("normlab doctor: MLP, 1 batch norm layer(s), 8 batch(es) (size 4)")
    header = next(line for line in lines if line.startswith("layer"))
    assert "values/ch" in header and "EMA/precise gap" in header
    assert any(line.startswith("1  severe    small_batch_stats") for line in lines)
    assert 'normlab.swap_norm(model, "ln")' in text and "evidence: values_per_channel=4" in text
    assert "alternative: normlab.freeze_bn(model)" in text
    assert "┃" not in text


def test_rich_table():
    text = small_batch_report().render(use_rich=True, width=200)
    assert "┃" in text and "Findings, most urgent first" in text
    assert 'normlab.swap_norm(model, "ln")' in text and "small_batch_stats" in text
    assert "\x1b[" not in text  # no terminal escapes in the returned text


def test_render_falls_back_to_plain_text_without_rich(monkeypatch):
    report = small_batch_report()
    assert report.render() == report.render(use_rich=True)  # rich is installed in the dev environment
    monkeypatch.setitem(sys.modules, "rich", None)  # now `import rich` raises ImportError
    assert report.render() == report.render(use_rich=False)


def test_ghost_batch_norm_counts_its_ghost_batches():
    data = images(batch_size=32, size=2)  # 32 x 4 = 128 values per channel, but ghost batches of 4 images: 16
    model = ConvNet()
    model.bn1 = normlab.GhostBatchNorm2d(8, virtual_batch_size=4)
    model = calibrated(model, data)
    report = diagnose(model, data)
    assert hazards(report) == {"small_batch_stats": {"bn1"}}
    assert report.findings[0].evidence["samples_per_batch"] == 4
    assert [s.values_per_channel for s in report.layers] == [16, 128]


def test_lazy_batch_norm_must_be_initialized_first():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"uninitialized lazy parameters or buffers \(1.weight, 1.bias"):
        diagnose(model, images(batch_size=32))
    model(images(batch_size=2)[0][0])
    assert diagnose(model, None).layers[0].num_features == 8


def test_distributed_data_parallel_wrapper_is_looked_through(tmp_path):
    data = images(batch_size=32)
    ddp_model = calibrated(ConvNet(), data)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        report = diagnose(nn.parallel.DistributedDataParallel(ddp_model), data)
    finally:
        dist.destroy_process_group()
    assert report.model == "ConvNet" and report.clean
    assert any("DistributedDataParallel" in n for n in report.notes)


def test_swap_spec_fits_every_batch_norm():
    def spec(*layers):
        return batch_independent_spec(
            [LayerObservation(n, k, c, 1e-5, 0.1, True, input_dims=d) for n, k, c, d in layers]
        )

    assert spec(("a", "BatchNorm2d", 64, 4), ("b", "BatchNorm2d", 128, 4)) == "gn32"
    assert spec(("a", "BatchNorm2d", 48, 4), ("b", "BatchNorm2d", 24, 4)) == "gn:24"
    assert spec(("a", "BatchNorm2d", 8, 4), ("b", "BatchNorm2d", 20, 4)) == "gn:4"
    assert spec(("a", "BatchNorm1d", 16, 2), ("b", "BatchNorm1d", 10, 3)) == "ln"
    assert spec(("a", "BatchNorm1d", 16, None)) == "ln"  # no data seen: judged by the class
    assert spec(("a", "BatchNorm1d", 16, 2), ("b", "BatchNorm2d", 32, 4)) == "gn:16"
