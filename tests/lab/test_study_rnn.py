"""The rnn study: longer test sequences, end to end at --smoke, the gradient-norm trace, resume, summary and plot from
files, the Fashion-MNIST (full-level) data path on generated IDX files, bad options."""

import json
import shutil

import numpy as np
import pytest
import torch

from normlab.lab.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, write_idx
from normlab.lab.models import build_model
from normlab.lab.runs import RunStore
from normlab.lab.studies import get_study
from normlab.lab.studies.rnn import LONG_FILE, NORMS, PROTOCOLS, blank_value, load_split, longer_sequences, make_configs
from normlab.lab.trainer import TrainConfig

STUDY = get_study("rnn")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """One smoke run of the study (all six norms, one epoch on 240 MNIST-1D samples), shared by the readers."""
    out = tmp_path_factory.mktemp("rnn") / "out"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        lines = []
        STUDY.run(out, level="smoke", echo=lines.append)
    assert torch.get_num_threads() == threads  # the study's one thread is given back
    return out, lines


# ------------------------------------------------------------------------------------------- longer sequences


def test_stretch_resamples_along_time_keeping_the_ends():
    x = torch.linspace(0, 1, 40).expand(3, 1, 40)  # a linear ramp: linear interpolation reproduces it exactly
    y = longer_sequences(x, "stretch", 80)
    assert y.shape == (3, 1, 80)
    torch.testing.assert_close(y, torch.linspace(0, 1, 80).expand(3, 1, 80))
    images = torch.randn(2, 1, 28, 28)
    tall = longer_sequences(images, "stretch", 56)
    assert tall.shape == (2, 1, 56, 28)  # rows are steps: more rows, the same 28 features each
    torch.testing.assert_close(tall[:, :, 0], images[:, :, 0])
    torch.testing.assert_close(tall[:, :, -1], images[:, :, -1])
    torch.testing.assert_close(longer_sequences(images, "stretch", 28), images)


def test_pad_prepends_blank_steps_and_keeps_the_sequence_at_the_end():
    x = torch.randn(4, 1, 40)
    y = longer_sequences(x, "pad", 80, pad_value=0.5)
    assert y.shape == (4, 1, 80) and torch.equal(y[..., 40:], x) and bool((y[..., :40] == 0.5).all())
    images = torch.randn(2, 1, 28, 28)
    tall = longer_sequences(images, "pad", 30, pad_value=-1.0)
    assert tall.shape == (2, 1, 30, 28) and torch.equal(tall[:, :, 2:], images) and bool((tall[:, :, :2] == -1).all())
    assert blank_value("mnist1d") == 0.0
    assert blank_value("fashion") == pytest.approx(-FASHION_MNIST_MEAN / FASHION_MNIST_STD)


def test_longer_sequences_refuses_bad_arguments():
    x = torch.randn(2, 1, 40)
    with pytest.raises(ValueError, match=r"kind='tile' must be one of \['stretch', 'pad'\]"):
        longer_sequences(x, "tile", 80)
    with pytest.raises(ValueError, match=r"length=20 must be an int >= the 40 steps"):
        longer_sequences(x, "pad", 20)
    with pytest.raises(ValueError, match=r"must be \(N, C, T\) or \(N, C, H, W\)"):
        longer_sequences(torch.randn(2, 40), "pad", 80)


def test_longer_sequences_feed_every_sequence_model():
    for norm in NORMS:
        model = build_model("mnist1d-seq", norm, hidden_size=4, max_steps=40).eval()
        assert model(longer_sequences(torch.randn(3, 1, 40), "pad", 80)).shape == (3, 10)
    model = build_model("fashion-seq", "bn_step", hidden_size=4, max_steps=28).eval()
    assert model(longer_sequences(torch.randn(2, 1, 28, 28), "stretch", 56)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------- protocol


def test_protocol():
    configs = make_configs("quick")
    assert [c.norm for c in configs] == list(NORMS) == ["none", "bn_shared", "vertical_bn", "bn_step", "ln", "online"]
    assert all(c.task == "mnist1d-seq" and c.model["max_steps"] == 40 and c.eval_every == 1 for c in configs)
    assert all(c.clip_grad_norm == 1.0 for c in configs)
    full = make_configs("full")
    assert {c.task for c in full} == {"fashion-seq"} and {c.model["max_steps"] for c in full} == {28}
    assert len(full) == len(NORMS) * PROTOCOLS["full"].seeds
    assert [c.seed for c in make_configs("smoke", norms=["ln", "none"], seeds=2)] == [0, 0, 1, 1]
    for level, protocol in PROTOCOLS.items():
        assert all(length > protocol.train_steps for _, length in protocol.long_tests), level


def test_fashion_rows_load_from_idx_files(tmp_path):
    """The full level's data path, on tiny generated IDX files."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    (x_train, y_train), (x_test, y_test) = load_split(PROTOCOLS["full"].data, data_dir=tmp_path)
    assert x_train.shape == (20, 1, 28, 28) and y_test.shape == (10,)
    model = build_model("fashion-seq", "ln", hidden_size=4, max_steps=28).eval()
    assert model(x_test).shape == (10, 10)


def test_mnist1d_training_subset_is_class_balanced(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    data = {"dataset": "mnist1d", "num_samples": 300, "seed": 0, "train_size": 100}
    (x_train, y_train), (x_test, _) = load_split(data)
    assert x_train.shape == (100, 1, 40) and x_test.shape == (60, 1, 40)
    assert set(np.bincount(y_train.numpy(), minlength=10).tolist()) == {10}


# ------------------------------------------------------------------------------------------------- end to end


def test_smoke_end_to_end(smoke_dir):
    out, lines = smoke_dir
    store = RunStore(out, study="rnn")
    assert len(store.done_runs()) == len(NORMS)
    assert json.loads((out / "protocol.json").read_text())["level"] == "smoke"
    assert "6 runs trained, 0 found finished, 6 evaluated on longer sequences" in lines[-1]
    for name in store.done_runs():
        config, metrics = store.load(name)
        folder = store.path(name)
        assert {"model.pt", LONG_FILE, "metrics.jsonl"} <= {p.name for p in folder.iterdir()}
        assert TrainConfig.from_dict(config).model == {"hidden_size": 8, "max_steps": 40}
        # the gradient-norm trace: one point per epoch, before clipping, the max at least the mean
        assert [row["epoch"] for row in metrics] == [1]
        assert all(0 < row["grad_norm_mean"] <= row["grad_norm_max"] for row in metrics)
        long = json.loads((folder / LONG_FILE).read_text())
        assert long["train_steps"] == 40 and sorted(long["tests"]) == ["pad-60", "stretch-60", "train-40"]
        # the evaluation at the training length reproduces the trainer's test error
        assert long["tests"]["train-40"]["accuracy"] == pytest.approx(100.0 - metrics[-1]["test_error"])
        assert store.load_env(name)["torch_threads"] == 1


def test_summary_and_plot_from_the_files_alone(smoke_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_dir[0], copy)
    summary = STUDY.summarize(copy)
    assert summary.columns == ["norm", "seeds", "test acc", "stretch-60", "pad-60", "grad first", "grad last",
                               "grad max"]  # fmt: skip
    assert [row[0] for row in summary.rows] == list(NORMS)
    for row in summary.rows:
        assert row[1] == 1 and all(0.0 <= float(cell) <= 100.0 for cell in row[2:5])
        assert float(row[5]) > 0 and float(row[7]) >= float(row[5])
    runs = summary.data["runs"]
    assert runs["ln"][0]["long"].keys() == {"train-40", "stretch-60", "pad-60"}
    assert summary.data["tests"] == ["train-40", "stretch-60", "pad-60"]
    assert any("smoke level" in note for note in summary.notes)
    paths = STUDY.plot(copy)
    assert [p.name for p in paths] == ["rnn_training.png", "rnn_long_sequences.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_second_run_trains_and_evaluates_nothing_and_a_missing_evaluation_is_redone(smoke_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_dir[0], copy)
    store = RunStore(copy, study="rnn")
    mtimes = {n: (store.path(n) / "metrics.jsonl").stat().st_mtime_ns for n in store.done_runs()}
    lines = []
    STUDY.run(copy, level="smoke", echo=lines.append)
    assert "0 runs trained, 6 found finished, 0 evaluated" in lines[-1]
    name = store.done_runs()[0]
    path = store.path(name) / LONG_FILE
    expected = json.loads(path.read_text())
    path.unlink()  # killed between training and evaluating
    lines = []
    STUDY.run(copy, level="smoke", echo=lines.append)
    assert "0 runs trained, 6 found finished, 1 evaluated" in lines[-1]
    assert json.loads(path.read_text()) == expected  # from the saved model, deterministically
    assert {n: (store.path(n) / "metrics.jsonl").stat().st_mtime_ns for n in store.done_runs()} == mtimes
    assert not [p for p in store.path(name).iterdir() if p.name.startswith(".")]


def test_summary_notes_a_run_not_yet_evaluated(smoke_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_dir[0], copy)
    store = RunStore(copy, study="rnn")
    (store.path(store.done_runs()[0]) / LONG_FILE).unlink()
    summary = STUDY.summarize(copy)
    assert any("Not yet evaluated on longer sequences" in note for note in summary.notes)
    assert "-" in summary.rows[[r[0] for r in summary.rows].index(store.load(store.done_runs()[0])[0]["norm"])]


# ------------------------------------------------------------------------------------------------- bad options


def test_bad_options_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"unknown norm 'bn_steps'.*Did you mean 'bn_step'.*Valid names: .*vertical_bn"
    ):
        STUDY.run(out, level="smoke", norms=["bn_steps"])
    with pytest.raises(ValueError, match=r"unknown norm 'gn'"):
        STUDY.run(out, level="smoke", norms=["gn"])  # a factory spec, but not a recurrent norm
    with pytest.raises(ValueError, match=r"unknown level 'medium'"):
        STUDY.run(out, level="medium")
    with pytest.raises(ValueError, match=r"seeds=0 must be a positive integer"):
        STUDY.run(out, level="smoke", seeds=0)
    assert not out.exists()


def test_a_folder_of_another_study_is_refused(tmp_path):
    RunStore(tmp_path, study="online")
    with pytest.raises(ValueError, match=r"holds the results of study 'online'"):
        STUDY.run(tmp_path, level="smoke", norms=["ln"])
    with pytest.raises(ValueError, match=r"holds no rnn results"):
        STUDY.summarize(tmp_path / "missing")
