"""The inference study: end to end at --smoke, the measurements, folding the lab's models, resume, bad options."""

import copy
import json

import pytest
import torch
from torch import nn

import normlab
from normlab.lab.models import SmallCNN, SmallResNet
from normlab.lab.runs import RunStore
from normlab.lab.studies import get_study
from normlab.lab.studies.inference import TEST_BATCH_SIZES, evaluate_model

STUDY = get_study("inference")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        lines = []
        STUDY.run(out, level="smoke", echo=lines.append)
    return out, lines


def _records(out) -> dict:
    records = [json.loads(p.read_text()) for p in sorted((out / "evaluations").glob("*.json"))]
    return {(r["norm"], r["train_batch"]): r for r in records}


def test_smoke_trains_at_batch_32_and_4_and_saves_the_models(smoke_dir):
    out, lines = smoke_dir
    store = RunStore(out, study="inference")
    runs = store.done_runs()
    assert len(runs) == 4 and all((store.path(name) / "model.pt").is_file() for name in runs)
    assert sorted({store.load(name)[0]["batch_size"] for name in runs}) == [4, 32]
    assert set(_records(out)) == {("bn", 32), ("bn", 4), ("gn", 32), ("gn", 4)}
    assert "4 runs trained, 0 found finished; 4 models evaluated" in lines[-1]


def test_measurements_of_a_batch_norm_model(smoke_dir):
    r = _records(smoke_dir[0])[("bn", 4)]
    sizes = [str(b) for b in TEST_BATCH_SIZES]
    errors = r["error"]
    for mode in ("eval", "train_mode", "recalibrated", "folded"):
        assert sorted(errors[mode], key=int) == sizes
    assert len(set(errors["eval"].values())) == 1  # eval mode does not depend on the test batch
    assert errors["folded"] == errors["eval"]
    assert r["fold"]["equal_to_eval"] is True and r["fold"]["max_abs_logit_diff"] <= 1e-3
    assert len(r["fold"]["changed"]) == 3 and r["fold"]["skipped"] == []  # every BatchNorm of CNN1d
    assert len(r["recalibrate"]["changed"]) == 3 and r["recalibrate"]["batch_size"] == 4
    assert r["recalibrate"]["batches"] == 240 // 4
    assert r["latency_ms"]["before"] > 0 and r["latency_ms"]["after"] > 0


def test_measurements_of_a_group_norm_model(smoke_dir):
    r = _records(smoke_dir[0])[("gn", 32)]
    # GroupNorm has no batch statistics: train mode is eval mode at every test batch size; no tool applies
    assert r["error"]["train_mode"] == r["error"]["eval"]
    assert r["error"]["recalibrated"] is None and r["error"]["folded"] is None
    assert r["fold"]["changed"] == [] and r["fold"]["equal_to_eval"] is None
    assert r["recalibrate"]["changed"] == []
    assert r["latency_ms"]["before"] > 0 and r["latency_ms"]["after"] is None


def test_summary_and_plot_from_files(smoke_dir):
    out, _ = smoke_dir
    summary = STUDY.summarize(out)
    assert summary.columns[:3] == ["norm", "train B", "eval"] and len(summary.columns) == 10
    assert [row[:2] for row in summary.rows] == [["bn", 32], ["bn", 4], ["gn", 32], ["gn", 4]]
    by_key = {(row[0], row[1]): row for row in summary.rows}
    records = _records(out)
    assert by_key[("bn", 4)][2] == f"{records[('bn', 4)]['error']['eval']['64']:.2f}"
    assert by_key[("bn", 4)][6] == f"{records[('bn', 4)]['error']['recalibrated']['64']:.2f}"
    assert by_key[("bn", 4)][7] == "yes" and by_key[("gn", 4)][7] == "n/a"
    assert by_key[("gn", 4)][6] == "n/a" and by_key[("gn", 4)][9] == "n/a"
    assert any(note.startswith("recalibrate_bn on bn trained at batch 4: eval error") for note in summary.notes)
    (path,) = STUDY.plot(out)
    assert path.name == "inference.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_second_run_trains_and_evaluates_nothing(smoke_dir, monkeypatch, tmp_path):
    out, _ = smoke_dir
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    before = {p.name: p.read_text() for p in (out / "evaluations").glob("*.json")}
    lines = []
    STUDY.run(out, level="smoke", echo=lines.append)
    assert "0 runs trained, 4 found finished; 0 models evaluated" in lines[-1]
    assert {p.name: p.read_text() for p in (out / "evaluations").glob("*.json")} == before
    # an evaluation made with other settings is not current: the summary ignores it and a run redoes it
    path = sorted((out / "evaluations").glob("*.json"))[0]
    path.write_text(json.dumps({**json.loads(before[path.name]), "settings": {"test_samples": 7}}))
    assert len(STUDY.summarize(out).rows) == 3
    STUDY.run(out, level="smoke", echo=lines.append)
    assert "0 runs trained, 4 found finished; 1 models evaluated" in lines[-1]
    assert json.loads(path.read_text())["settings"] == json.loads(before[path.name])["settings"]
    assert len(STUDY.summarize(out).rows) == 4


@pytest.mark.parametrize("model_class", [SmallResNet, SmallCNN])
def test_fold_bn_folds_every_batch_norm_of_the_lab_models(model_class):
    torch.manual_seed(0)
    model = model_class("bn", widths=(4, 8, 8)).eval()
    for m in model.modules():  # non-trivial statistics, so that folding changes the weights
        if isinstance(m, normlab.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    bns = {name for name, m in model.named_modules() if isinstance(m, normlab.BatchNorm2d)}
    assert len(bns) == (9 if model_class is SmallResNet else 3)  # stem, 2 per block, 2 shortcuts
    folded, report = normlab.fold_bn(copy.deepcopy(model))  # the forward's input check does not trace
    assert "does not trace" in report.notes[0]
    assert {c.name for c in report.changed} == bns and report.skipped == []
    assert not any(isinstance(m, normlab.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)


def test_evaluate_model_leaves_the_model_alone_and_uses_batch_statistics_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model.eval()
    model[1].running_mean.fill_(0.5)
    state = copy.deepcopy(model.state_dict())
    x, y = torch.randn(16, 1, 8, 8), torch.randint(3, (16,))
    result = evaluate_model(
        model, torch.randn(40, 1, 8, 8), (x, y), train_batch=4, seed=0, recalibration_samples=40, latency_repeats=2
    )
    assert not model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        trained_mode = copy.deepcopy(model).train()
        wrong = sum((trained_mode(xb).argmax(1) != yb).sum().item() for xb, yb in zip(x.split(8), y.split(8)))
    assert result["error"]["train_mode"]["8"] == pytest.approx(100.0 * wrong / 16)
    assert result["recalibrate"]["batches"] == 10 and result["recalibrate"]["changed"] == ["1"]
    assert result["fold"]["changed"] == ["1"] and result["fold"]["equal_to_eval"] is True


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"inference: unknown norm 'gnn'\. Did you mean 'gn'\?.*Valid names: bn, brn"):
        STUDY.run(tmp_path / "a", level="smoke", norms=["gnn"])
    with pytest.raises(ValueError, match=r"inference: seeds=0 must be a positive integer"):
        STUDY.run(tmp_path / "a", level="smoke", seeds=0)
    with pytest.raises(ValueError, match=r"unknown level 'fast'"):
        STUDY.run(tmp_path / "a", level="fast")
    assert not (tmp_path / "a").exists()
    RunStore(tmp_path / "other", study="batch-size")
    with pytest.raises(ValueError, match=r"holds the results of study 'batch-size'"):
        STUDY.run(tmp_path / "other", level="smoke")
    with pytest.raises(ValueError, match=r"holds no inference results"):
        STUDY.summarize(tmp_path / "missing")
