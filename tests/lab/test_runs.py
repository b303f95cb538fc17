"""The run store: atomic run folders, the study marker, stale temporary folders, names, env.json."""

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from normlab.lab.runs import RunStore, config_hash, env_info, git_commit, run_name


def _entries(root):
    return sorted(p.name for p in root.iterdir())


def test_finished_run_folder_holds_config_env_and_metrics(tmp_path):
    store = RunStore(tmp_path, study="s")
    config = {"task": "fashion", "norm": "gn", "batch_size": 2, "widths": [8, 16]}
    with store.run("r1", config) as run:
        assert run.dir.name.startswith(".r1.tmp-") and not store.is_done("r1")
        run.log(epoch=1, loss=torch.tensor(0.5), error=12.5)
        run.log(epoch=2, loss=float("nan"), trace=[1.0, 2.0])
    assert run.dir == tmp_path / "r1" == store.path("r1")
    assert sorted(os.listdir(run.dir)) == ["config.json", "env.json", "metrics.jsonl"]
    assert store.is_done("r1") and store.done_runs() == ["r1"]
    loaded_config, metrics = store.load("r1")
    assert loaded_config == config
    assert metrics[0] == {"epoch": 1, "loss": 0.5, "error": 12.5}
    assert math.isnan(metrics[1]["loss"]) and metrics[1]["trace"] == [1.0, 2.0]
    assert {"torch", "triton", "python", "device", "device_name", "git"} <= set(store.load_env("r1"))
    assert _entries(tmp_path) == ["r1", "study.json"]  # no temporary folder left


def test_exception_leaves_no_run_and_no_temporary_folder(tmp_path):
    store = RunStore(tmp_path, study="s")
    with pytest.raises(RuntimeError, match="boom"):
        with store.run("r1", {"a": 1}) as run:
            run.log(epoch=1)
            raise RuntimeError("boom")
    assert not store.is_done("r1") and store.done_runs() == []
    assert _entries(tmp_path) == ["study.json"]
    with pytest.raises(ValueError, match="no finished run 'r1'"):
        store.load("r1")
    with store.run("r1", {"a": 1}) as run:  # and it can be redone
        run.log(epoch=1)
    assert store.load("r1")[1] == [{"epoch": 1}]


def test_keyboard_interrupt_also_leaves_nothing(tmp_path):
    store = RunStore(tmp_path, study="s")
    with pytest.raises(KeyboardInterrupt):
        with store.run("r1", {}):
            raise KeyboardInterrupt
    assert _entries(tmp_path) == ["study.json"]


def test_a_finished_run_is_never_written_twice(tmp_path):
    store = RunStore(tmp_path, study="s")
    with store.run("r1", {"a": 1}) as run:
        run.log(first=True)
    with pytest.raises(ValueError, match="run 'r1' is already finished"):
        with store.run("r1", {"a": 1}):
            pass
    assert store.load("r1")[1] == [{"first": True}]


def test_run_finished_by_another_process_meanwhile_is_kept(tmp_path):
    store = RunStore(tmp_path, study="s")
    with store.run("r1", {"who": "us"}) as run:
        run.log(who="us")
        other = tmp_path / "r1"  # another process renames its complete folder first
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"who": "them"}))
        (other / "metrics.jsonl").write_text(json.dumps({"who": "them"}) + "\n")
    assert store.load("r1") == ({"who": "them"}, [{"who": "them"}])
    assert _entries(tmp_path) == ["r1", "study.json"]


def test_study_marker_refuses_another_study(tmp_path):
    RunStore(tmp_path, study="batch-size")
    assert json.loads((tmp_path / "study.json").read_text())["study"] == "batch-size"
    RunStore(tmp_path, study="batch-size")  # reopening the same study is fine
    with pytest.raises(ValueError, match=r"holds the results of study 'batch-size'.*not of 'speed'"):
        RunStore(tmp_path, study="speed")


def test_refuses_a_non_empty_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty \(notes.txt\) and holds no study.json"):
        RunStore(tmp_path, study="s")
    assert not (tmp_path / "study.json").exists()
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".cache").write_text("")
    RunStore(hidden, study="s")  # hidden entries only: fine
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        RunStore(file, study="s")


def test_bad_names(tmp_path):
    with pytest.raises(ValueError, match=r"study=''"):
        RunStore(tmp_path, study="")
    store = RunStore(tmp_path / "s", study="s")
    for bad in ["", ".hidden", "../escape", "a/b", "a b"]:
        with pytest.raises(ValueError, match="run name="):
            store.path(bad)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_stale_removes_only_dead_processes_temporary_folders(tmp_path):
    store = RunStore(tmp_path, study="s")
    host = socket.gethostname()
    dead = tmp_path / f".r-dead.tmp-{host}-{_dead_pid()}"
    alive = tmp_path / f".r-alive.tmp-{host}-{os.getpid()}"
    elsewhere = tmp_path / f".r-other.tmp-some-other-host-{_dead_pid()}"
    for d in (dead, alive, elsewhere):
        d.mkdir()
        (d / "config.json").write_text("{}")
    assert store.stale() == [dead]
    assert not store.is_done("r-dead") and store.done_runs() == []
    assert store.clean_stale() == ["r-dead"]
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_run_names_are_readable_deterministic_and_safe():
    a = {"task": "fashion", "norm": "gn:8", "lr": 0.1, "widths": (8, 16)}
    name = run_name("fashion-gn:8-b2", a)
    assert re.fullmatch(r"fashion-gn-8-b2-[0-9a-f]{10}", name)
    assert name == run_name("fashion-gn:8-b2", dict(reversed(list(a.items()))))
    assert run_name("fashion-gn:8-b2", {**a, "lr": 0.2}) != name
    assert config_hash({"widths": [8, 16]}) == config_hash({"widths": (8, 16)})
    assert run_name("../..", {}).startswith("run-")


def test_env_info_records_versions_device_and_commit():
    info = env_info("cpu", world_size=2)
    assert info["torch"] == torch.__version__ and info["device"] == "cpu" and info["world_size"] == 2
    assert info["python"].count(".") == 2 and info["device_name"]
    git = git_commit()
    assert set(git) == {"commit", "dirty"}
    inside_checkout = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).returncode == 0
    if inside_checkout:  # the tests run from the normlab checkout
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool)
