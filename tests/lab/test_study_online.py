"""The online study: the test-then-train protocol step by step, end to end at --smoke, resume after a kill, summary
and plot from files, bad options."""

import dataclasses
import json
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F

from normlab.lab.data import synthetic_stream
from normlab.lab.models import build_model
from normlab.lab.runs import RunStore
from normlab.lab.studies import get_study
from normlab.lab.studies.online import NORMS, PROTOCOLS, run_stream, stream_accuracy

STUDY = get_study("online")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """One smoke run of the study (all six norms, 60 steps), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("online") / "out"
    threads = torch.get_num_threads()
    lines = []
    STUDY.run(out, level="smoke", echo=lines.append)
    assert torch.get_num_threads() == threads  # the study's one thread is given back
    return out, lines


def _config(norm, seed=0, **stream):
    protocol = dataclasses.replace(PROTOCOLS["smoke"], **stream)
    return protocol.config(norm, seed, "smoke")


def _stream(config):
    s = config["stream"]
    return list(
        synthetic_stream(
            num_classes=s["num_classes"], dim=s["dim"], num_batches=s["num_batches"],
            batch_sizes=tuple(s["batch_sizes"]), shift_at=s["shift_at"], shift_scale=s["shift_scale"],
            shift_gain=s["shift_gain"], separation=s["separation"], seed=config["seed"],
        )
    )  # fmt: skip


def _model(config):
    kwargs = {k: v for k, v in config["model"].items() if k != "task"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        return build_model("stream-mlp", config["norm"], **kwargs)


# ---------------------------------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("norm", ["bn", "online"])
def test_each_batch_is_predicted_in_eval_mode_before_training_on_it(norm):
    """An independent re-implementation of the first steps: eval-mode prediction, then one train-mode SGD step."""
    config = _config(norm, num_batches=6, batch_sizes=(3, 5))
    rows = run_stream(config)
    model = _model(config)
    opt = torch.optim.SGD(model.parameters(), lr=config["optimizer"]["lr"], momentum=config["optimizer"]["momentum"])
    for (x, y), row in zip(_stream(config), rows):
        model.eval()
        with torch.no_grad():
            logits = model(x)
        assert row["correct"] == int((logits.argmax(1) == y).sum())
        assert row["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
        assert row["batch_size"] == len(y) and row["updated"]
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert [r["step"] for r in rows] == list(range(6))


def test_batchnorm_skips_the_train_step_of_batches_of_one_and_others_train_on_every_batch():
    bn = run_stream(_config("bn", num_batches=40, batch_sizes=(1, 3)))
    ones = [r["step"] for r in bn if r["batch_size"] == 1]
    assert ones  # the stream holds batches of one
    assert [r["step"] for r in bn if not r["updated"]] == ones
    for norm in ("online", "ln"):
        rows = run_stream(_config(norm, num_batches=40, batch_sizes=(1, 3)))
        assert all(r["updated"] for r in rows) and [r["batch_size"] for r in rows] == [r["batch_size"] for r in bn]


def test_a_skipped_step_changes_nothing():
    """After a batch of one, BatchNorm's next prediction is the same as if the batch had not been there."""
    config = _config("bn", num_batches=30, batch_sizes=(1, 3))
    rows = run_stream(config)
    batches = _stream(config)
    k = next(i for i, r in enumerate(rows) if not r["updated"] and i + 1 < len(rows))
    model = _model(config)
    opt = torch.optim.SGD(model.parameters(), lr=config["optimizer"]["lr"], momentum=config["optimizer"]["momentum"])
    for x, y in batches[: k + 1]:
        if len(y) > 1:
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    x, y = batches[k + 1]
    with torch.no_grad():
        assert rows[k + 1]["loss"] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)


def test_runs_are_deterministic():
    config = _config("online", num_batches=20)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(run_stream(config)) == strip(run_stream(config))
    assert strip(run_stream(_config("online", seed=1, num_batches=20))) != strip(run_stream(config))


def test_stream_accuracy_splits_at_the_shift():
    rows = [{"step": i, "batch_size": 2, "correct": 2 if i < 4 else (1 if i < 6 else 0), "loss": 0.0, "updated": i != 3}
            for i in range(10)]  # fmt: skip
    r = stream_accuracy(rows, shift_step=4, recovery_steps=2)
    assert (r["before"], r["after"], r["recovery"], r["overall"]) == (100.0, pytest.approx(100 / 6), 50.0, 50.0)
    assert (r["skipped_steps"], r["skipped_samples"], r["samples"], r["nonfinite_steps"]) == (1, 2, 20, 0)
    rows[5]["loss"] = float("nan")
    assert stream_accuracy(rows, 4, 2)["nonfinite_steps"] == 1


def test_protocol_levels():
    quick = PROTOCOLS["quick"]
    assert quick.norms == NORMS == ("bn", "brn", "online", "ln", "gn:8", "none")
    assert quick.batch_sizes == (1, 16) and quick.shift_step == quick.num_batches // 2
    assert quick.threads == 1 and PROTOCOLS["full"].threads is None
    assert PROTOCOLS["full"].seeds > 1 and PROTOCOLS["full"].num_batches > quick.num_batches


# ------------------------------------------------------------------------------------------------- end to end


def test_smoke_end_to_end(smoke_dir):
    out, lines = smoke_dir
    store = RunStore(out, study="online")
    assert len(store.done_runs()) == len(NORMS)
    assert json.loads((out / "protocol.json").read_text())["level"] == "smoke"
    assert "6 runs streamed, 0 found finished" in lines[-1]
    steps = PROTOCOLS["smoke"].num_batches
    for name in store.done_runs():
        config, metrics = store.load(name)
        assert config["protocol"] == "test-then-train" and config["stream"]["shift_step"] == steps // 2
        assert [r["step"] for r in metrics] == list(range(steps))
        assert all(0 <= r["correct"] <= r["batch_size"] <= 16 for r in metrics)
        skipped = [r for r in metrics if not r["updated"]]
        if config["norm"] in ("bn", "brn"):
            assert skipped == [r for r in metrics if r["batch_size"] == 1]
        else:
            assert not skipped
        assert store.load_env(name)["torch_threads"] == 1


def test_two_worker_processes_write_the_same_runs(smoke_dir, tmp_path):
    out = tmp_path / "parallel"
    lines = []
    STUDY.run(out, level="smoke", norms=["bn", "online", "none"], echo=lines.append, jobs=2)
    assert "3 runs streamed, 0 found finished" in lines[-1]
    serial, parallel = RunStore(smoke_dir[0], study="online"), RunStore(out, study="online")
    assert parallel.done_runs() and set(parallel.done_runs()) <= set(serial.done_runs())
    for name in parallel.done_runs():
        strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
        assert strip(parallel.load(name)[1]) == strip(serial.load(name)[1])
    with pytest.raises(ValueError, match="jobs"):
        STUDY.run(tmp_path / "bad", level="smoke", jobs=0)


def test_summary_and_plot_from_the_files_alone(smoke_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_dir[0], copy)
    summary = STUDY.summarize(copy)
    assert summary.columns == ["norm", "seeds", "before shift", "after shift", "recovery", "overall",
                               "train steps skipped"]  # fmt: skip
    assert [row[0] for row in summary.rows] == list(NORMS)
    for row in summary.rows:
        assert row[1] == 1 and all(0.0 <= float(cell) <= 100.0 for cell in row[2:6])
        assert row[6].endswith(f"of {PROTOCOLS['smoke'].num_batches}")
        assert (row[6] == "0 of 60") == (row[0] not in ("bn", "brn"))
    by_norm = summary.data["runs"]
    assert by_norm["bn"][0]["skipped_steps"] > 0 and by_norm["ln"][0]["skipped_steps"] == 0
    assert any("skip the train step" in note for note in summary.notes)
    assert summary.to_markdown().count("\n") == len(NORMS) + 1
    (path,) = STUDY.plot(copy)
    assert path == copy / "online.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_streams_nothing(smoke_dir):
    out, _ = smoke_dir
    store = RunStore(out, study="online")
    before = {name: (store.path(name) / "metrics.jsonl").stat().st_mtime_ns for name in store.done_runs()}
    lines = []
    STUDY.run(out, level="smoke", echo=lines.append)
    assert "0 runs streamed, 6 found finished" in lines[-1]
    assert {name: (store.path(name) / "metrics.jsonl").stat().st_mtime_ns for name in store.done_runs()} == before


def test_killed_run_is_redone_and_finished_ones_are_kept(tmp_path):
    out = tmp_path / "out"
    STUDY.run(out, level="smoke", norms=["ln", "none"], quiet=True)
    store = RunStore(out, study="online")
    ln, none = store.done_runs()[0], store.done_runs()[1]
    kept = (store.path(ln) / "metrics.jsonl").read_text()
    # a kill mid-stream leaves a temporary folder and no final one
    shutil.move(store.path(none), out / f".{none}.tmp-{socket.gethostname()}-999999999")
    lines = []
    STUDY.run(out, level="smoke", norms=["ln", "none"], echo=lines.append)
    assert "1 runs streamed, 1 found finished" in lines[-1]
    assert store.done_runs() == sorted([ln, none]) and not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert (store.path(ln) / "metrics.jsonl").read_text() == kept


def test_summary_ignores_runs_of_another_level(smoke_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_dir[0], copy)
    protocol = json.loads((copy / "protocol.json").read_text())
    (copy / "protocol.json").write_text(json.dumps({**protocol, "level": "quick"}))
    assert STUDY.summarize(copy).rows == []


# ------------------------------------------------------------------------------------------------- bad options


def test_bad_options_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown norm 'bnn'.*Did you mean 'bn'.*Valid names: .*gn:8"):
        STUDY.run(out, level="smoke", norms=["bnn"])
    with pytest.raises(ValueError, match=r"MLP: norm='in': InstanceNorm"):
        STUDY.run(out, level="smoke", norms=["in"])
    with pytest.raises(ValueError, match=r"unknown level 'medium'"):
        STUDY.run(out, level="medium")
    with pytest.raises(ValueError, match=r"seeds=0 must be a positive integer"):
        STUDY.run(out, level="smoke", seeds=0)
    assert not out.exists()


def test_a_folder_of_another_study_is_refused(tmp_path):
    RunStore(tmp_path, study="rnn")
    with pytest.raises(ValueError, match=r"holds the results of study 'rnn'"):
        STUDY.run(tmp_path, level="smoke", norms=["ln"])
    with pytest.raises(ValueError, match=r"holds no online results"):
        STUDY.summarize(tmp_path / "missing")
