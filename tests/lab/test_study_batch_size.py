"""The batch-size study: protocol, end to end at --smoke, resume, summary and plot from files, bad options."""

import json

import pytest

from normlab.lab.data import DataNotFoundError
from normlab.lab.runs import RunStore
from normlab.lab.studies import get_study
from normlab.lab.studies.batch_size import NORMS, PROTOCOLS, make_configs

STUDY = get_study("batch-size")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """One smoke run of the study (bn and gn at batch 2 and 8), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("batch-size") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        lines = []
        STUDY.run(out, level="smoke", echo=lines.append)
    return out, lines


def test_protocol_is_the_group_norm_papers():
    configs = make_configs("quick")
    quick = PROTOCOLS["quick"]
    assert {c.norm for c in configs} == {"bn", "gn", "gn+ws", "frn", "online", "none"}
    assert {c.batch_size for c in configs} == {2, 8, 32} and len(configs) == 6 * 3
    # same epochs at every batch size; learning rate linear in the batch (0.1 at 32)
    assert {c.epochs for c in configs} == {quick.epochs}
    assert {c.batch_size: c.lr for c in configs} == {2: 0.1 * 2 / 32, 8: 0.1 * 8 / 32, 32: 0.1}
    assert all(c.task == "fashion-cnn" and c.eval_every == c.epochs for c in configs)
    # enough data that batch 32 takes 1250 steps; the whole test set
    assert quick.data["train_size"] * quick.epochs // 32 == 1250 and quick.data["test_size"] is None
    assert make_configs("smoke")[0].task == "mnist1d"
    full = make_configs("full")
    assert {c.norm for c in full} == set(NORMS) and len(NORMS) == 11
    assert {c.batch_size for c in full} == {2, 4, 8, 16, 32} and len(full) == 11 * 5 * 3


def test_runs_are_seed_major_so_an_interrupted_sweep_leaves_whole_seeds():
    configs = make_configs("quick", norms=["bn", "gn"], seeds=2)
    assert [c.seed for c in configs] == [0] * 6 + [1] * 6
    assert [(c.norm, c.batch_size) for c in configs[:3]] == [("bn", 2), ("bn", 8), ("bn", 32)]


def test_smoke_end_to_end(smoke_dir):
    out, lines = smoke_dir
    store = RunStore(out, study="batch-size")
    assert len(store.done_runs()) == 4
    assert json.loads((out / "protocol.json").read_text())["level"] == "smoke"
    assert "4 runs trained, 0 found finished" in lines[-1]
    summary = STUDY.summarize(out)
    assert summary.columns == ["norm", "B=2", "B=8"]
    assert [row[0] for row in summary.rows] == ["bn", "gn"]
    for row in summary.rows:
        for cell in row[1:]:
            assert 0.0 <= float(cell) <= 100.0  # one seed: the mean alone
    assert any("smoke level" in note for note in summary.notes)
    (path,) = STUDY.plot(out)
    assert path.name == "batch_size.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_second_run_trains_nothing(smoke_dir, monkeypatch, tmp_path):
    out, _ = smoke_dir
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    store = RunStore(out, study="batch-size")
    before = {name: (store.path(name) / "metrics.jsonl").read_text() for name in store.done_runs()}
    lines = []
    STUDY.run(out, level="smoke", echo=lines.append)
    assert "0 runs trained, 4 found finished" in lines[-1]
    assert {name: (store.path(name) / "metrics.jsonl").read_text() for name in store.done_runs()} == before


def _fake_runs(out, errors: dict, level="quick"):
    """Finished runs with the given final test errors: {(norm, batch): [error per seed]}."""
    store = RunStore(out, study="batch-size")
    protocol = PROTOCOLS[level]
    for (norm, batch), values in errors.items():
        for seed, error in enumerate(values):
            config = protocol.config(norm, batch, seed)
            with store.run(config.name, config.to_dict()) as run:
                run.log(epoch=1, train_loss=1.0, time_s=2.0)
                run.log(epoch=2, train_loss=0.5, test_error=error, time_s=3.0)
    (out / "protocol.json").write_text(json.dumps({"level": level}))
    return store


def test_summary_cells_are_mean_and_std_over_seeds_read_from_files(tmp_path):
    _fake_runs(
        tmp_path,
        {("bn", 2): [20.0, 24.0], ("bn", 32): [10.0, 12.0], ("gn", 2): [11.0, 11.5], ("gn", 32): [11.0, 12.0]},
    )
    summary = STUDY.summarize(tmp_path)
    assert summary.columns == ["norm", "B=2", "B=32"]
    assert summary.rows == [["bn", "22.00 ± 2.83", "11.00 ± 1.41"], ["gn", "11.25 ± 0.35", "11.50 ± 0.71"]]
    assert summary.data["errors"]["bn"] == {2: [20.0, 24.0], 32: [10.0, 12.0]}
    text = " ".join(summary.notes)
    assert "BatchNorm: test error at batch 2 minus batch 32 = +11.00 points" in text and ": met." in text
    assert "gn: batch 2 minus batch 32 = -0.25 points (within the 1-point band)" in text
    assert "Best alternative at batch 2: gn at 11.25% vs BatchNorm at batch 32 11.00%" in text
    assert "total training time 0.7 min" in text  # 8 runs x 5 s, from metrics.jsonl


def test_summary_reports_a_contradicting_result_as_measured(tmp_path):
    _fake_runs(tmp_path, {("bn", 2): [10.5], ("bn", 32): [10.0], ("frn", 2): [15.0], ("frn", 32): [10.0]})
    text = " ".join(STUDY.summarize(tmp_path).notes)
    assert "+0.50 points" in text and "not met" in text
    assert "frn: batch 2 minus batch 32 = +5.00 points (outside the 1-point band)" in text


def test_summary_ignores_runs_of_another_level(tmp_path):
    _fake_runs(tmp_path, {("bn", 2): [30.0]}, level="smoke")
    _fake_runs(tmp_path, {("bn", 2): [20.0]}, level="quick")
    assert STUDY.summarize(tmp_path).rows == [["bn", "20.00"]]


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"batch-size: unknown norm 'bnn'\. Did you mean 'bn'\?.*Valid names: bn, brn"):
        STUDY.run(tmp_path / "a", level="smoke", norms=["bn", "bnn"])
    with pytest.raises(ValueError, match=r"batch-size: seeds=0 must be a positive integer"):
        STUDY.run(tmp_path / "a", level="smoke", seeds=0)
    with pytest.raises(ValueError, match=r"unknown level 'medium'"):
        STUDY.run(tmp_path / "a", level="medium")
    with pytest.raises(ValueError, match=r"norms='bn' must be a non-empty list"):
        STUDY.run(tmp_path / "a", level="smoke", norms="bn")
    assert not (tmp_path / "a").exists()  # options are checked before anything is written
    RunStore(tmp_path / "other", study="rnn")
    with pytest.raises(ValueError, match=r"holds the results of study 'rnn'"):
        STUDY.run(tmp_path / "other", level="smoke")
    with pytest.raises(ValueError, match=r"holds no batch-size results"):
        STUDY.summarize(tmp_path / "missing")


def test_other_factory_specs_are_accepted():
    assert [c.norm for c in make_configs("smoke", norms=["gn:4", "gn:4", "bn"])][::2] == ["gn:4", "bn"]


def test_quick_without_fashion_mnist_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("normlab.lab.data.SYSTEM_FASHION_MNIST_DIR", tmp_path / "nowhere")
    monkeypatch.delenv("NORMLAB_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match=r"Fashion-MNIST not found"):
        STUDY.run(tmp_path / "out", level="quick", norms=["bn"], quiet=True)
    assert RunStore(tmp_path / "out", study="batch-size").done_runs() == []


def test_acceptance_notes_give_each_verdict():
    from normlab.lab.studies.batch_size import _acceptance_notes

    errors = {
        "bn": {2: [14.0, 14.5], 32: [11.5, 11.9]},
        "gn": {2: [12.0], 32: [12.4]},
        "frn": {2: [14.0], 32: [12.5]},
        "gn+ws": {2: [11.8], 32: [11.9]},
    }
    notes = "\n".join(_acceptance_notes(errors))
    assert "= +2.55 points (mean over seeds). The literature's effect (at least 2 points worse" in notes
    assert "worse at batch 2): met." in notes
    assert "gn: batch 2 minus batch 32 = -0.40 points (within the 1-point band)" in notes
    assert "frn: batch 2 minus batch 32 = +1.50 points (outside the 1-point band)" in notes
    assert "Best alternative at batch 2: gn+ws at 11.80% vs BatchNorm at batch 32 11.70% (+0.10 points" in notes
    assert "at most 0.5 points worse: met" in notes
    errors["bn"] = {2: [12.0], 32: [11.0]}
    errors["gn+ws"] = {2: [11.6]}
    errors["gn"] = {2: [11.7]}
    notes = "\n".join(_acceptance_notes(errors))
    assert "+1.00 points (mean over seeds)" in notes and "worse at batch 2): not met" in notes
    assert "(+0.60 points; stretch goal, at most 0.5 points worse: not met)" in notes
