"""The trainer: determinism, linear learning-rate scaling, sharding, evaluation, resume after a kill, DDP."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from normlab.lab.runs import RunStore
from normlab.lab.trainer import (
    TrainConfig,
    evaluate,
    init_distributed,
    load_model,
    make_progress,
    scaled_lr,
    shard_batches,
    sweep,
    train_run,
    warmup_cosine,
)
from tests.distributed import run_ranks

REPO = Path(__file__).resolve().parents[2]
MODEL = {"in_features": 8, "hidden": [32, 16], "num_classes": 3}


def tiny_data(n=192, n_test=96, separation=0.7, seed=0):
    """Three Gaussian classes in 8-D: learnable, not trivially."""
    g = torch.Generator().manual_seed(seed)
    means = separation * torch.randn(3, 8, generator=g)
    y = torch.randint(3, (n + n_test,), generator=g)
    x = means[y] + torch.randn(n + n_test, 8, generator=g)
    return (x[:n], y[:n]), (x[n:], y[n:])


def cfg(norm="ln", batch_size=8, **kw):
    return TrainConfig("stream-mlp", norm, batch_size=batch_size, epochs=kw.pop("epochs", 3), model=MODEL, **kw)


def _without_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


# ---------------------------------------------------------------------------------------------------- config


def test_config_validates_and_names_runs():
    c = cfg("gn:8", batch_size=2, seed=1)
    assert c.name.startswith("stream-mlp-gn-8-b2-s1-") and c.name == cfg("gn:8", batch_size=2, seed=1).name
    assert c.name != cfg("gn:8", batch_size=2, seed=2).name != cfg("gn:8", batch_size=4, seed=1).name
    assert c.to_dict()["world_size"] == 1 and c.to_dict()["model"]["hidden"] == [32, 16]
    assert TrainConfig.from_dict(c.to_dict()).name == c.name
    assert "-w2-" in c.resolved(2).name and c.resolved(1).name == c.name
    with pytest.raises(ValueError, match=r"TrainConfig: batch_size=0 must be a positive integer"):
        cfg(batch_size=0)
    with pytest.raises(ValueError, match=r"task.*'cifar'"):
        TrainConfig("cifar", "bn", batch_size=2)
    with pytest.raises(ValueError, match=r"schedule.*'step'"):
        cfg(schedule="step")
    with pytest.raises(ValueError, match=r"base_lr=0 must be"):
        cfg(base_lr=0)
    with pytest.raises(ValueError, match=r"world_size=2 but the run is launched with 1"):
        train_run(cfg(world_size=2), None, tiny_data())
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
        TrainConfig.from_dict({**c.to_dict(), "lr": 1})


def test_bad_norm_and_data_are_refused_before_training(tmp_path):
    store = RunStore(tmp_path, study="t")
    with pytest.raises(ValueError, match=r"stream-mlp: norm='bnn'"):
        sweep([cfg("ln"), cfg("bnn")], store, tiny_data(), quiet=True)
    assert store.done_runs() == []  # the valid config did not train either
    with pytest.raises(ValueError, match=r"data must be"):
        train_run(cfg(), None, torch.zeros(3))
    with pytest.raises(ValueError, match=r"batch_size=256 exceeds the 192 training samples"):
        train_run(cfg(batch_size=256), None, tiny_data())


# ------------------------------------------------------------------------------------------- learning rate


def test_linear_lr_scaling_with_batch_size():
    assert scaled_lr(0.1, 2, 32) == pytest.approx(0.00625)
    assert scaled_lr(0.1, 8, 32, world_size=4) == pytest.approx(0.1)
    lrs = {}
    for b in (4, 8, 16):
        c = cfg(batch_size=b, epochs=1, warmup_epochs=0, schedule="constant", base_lr=0.2, base_batch=16)
        assert c.lr == pytest.approx(0.2 * b / 16)
        lrs[b] = train_run(c, None, tiny_data()).metrics[-1]["lr"]
    assert lrs[4] == pytest.approx(0.05) and lrs[8] == pytest.approx(0.1) and lrs[16] == pytest.approx(0.2)


def test_warmup_then_cosine_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=12)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[4] == pytest.approx(1.0) and seen[8] == pytest.approx(0.5) and seen[11] < 0.05
    assert all(a >= b for a, b in zip(seen[4:], seen[5:]))
    constant = warmup_cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 0, 10, cosine=False)
    assert constant.get_last_lr() == [1.0]


# ----------------------------------------------------------------------------------------- shards and eval


def test_rank_shards_are_disjoint_and_make_the_single_process_global_batch():
    n, b, world = 23, 3, 2
    shards = [shard_batches(n, b, generator=torch.Generator().manual_seed(5), rank=r, world_size=world) for r in (0, 1)]
    single = shard_batches(n, b * world, generator=torch.Generator().manual_seed(5))
    assert shards[0].shape == shards[1].shape == (3, 3) and single.shape == (3, 6)
    assert not set(shards[0].flatten().tolist()) & set(shards[1].flatten().tolist())
    for k in range(3):
        assert sorted(shards[0][k].tolist() + shards[1][k].tolist()) == sorted(single[k].tolist())


def test_evaluate_counts_errors_in_eval_mode_and_restores_the_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.9))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    out = evaluate(model, x, y, batch_size=3)  # dropout would make this random in train mode
    assert out["error"] == 25.0 and model.training
    expected = torch.nn.functional.cross_entropy(x, y).item()
    assert out["loss"] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ training


def test_same_config_twice_gives_identical_metrics(tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = train_run(cfg("bn"), RunStore(tmp_path / "a", study="t"), tiny_data())
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    b = train_run(cfg("bn"), RunStore(tmp_path / "b", study="t"), tiny_data())
    assert _without_time(a.metrics) == _without_time(b.metrics)
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    c = train_run(cfg("bn", seed=1), None, tiny_data())
    assert _without_time(c.metrics) != _without_time(a.metrics)


def test_run_learns_and_logs_every_epoch(tmp_path):
    store = RunStore(tmp_path, study="t")
    result = train_run(cfg("bn", epochs=4, eval_every=2), store, tiny_data(separation=3.0))
    config, rows = store.load(result.name)
    assert result.dir == store.path(result.name) and not result.skipped
    assert config == result.config.to_dict() and rows == json.loads(json.dumps(result.metrics))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["step"] == 4 * (192 // 8)
    assert ["test_error" in r for r in rows] == [False, True, False, True]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["test_error"] < 20
    assert all(r["grad_norm_max"] >= r["grad_norm_mean"] > 0 for r in rows)
    assert not result.model.training
    env = store.load_env(result.name)
    assert env["device"] == "cpu" and env["world_size"] == 1


def test_diverged_run_is_marked_and_stops():
    result = train_run(cfg("none", base_lr=1e8, epochs=5), None, tiny_data())
    assert len(result.metrics) < 5 and result.metrics[-1]["diverged"] is True


def test_saved_model_loads_back(tmp_path):
    store = RunStore(tmp_path, study="t")
    result = train_run(cfg("bn", epochs=1), store, tiny_data(), save_model=True)
    loaded = load_model(store, result.name)
    x = tiny_data()[1][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))
    other = train_run(cfg("ln", epochs=1), store, tiny_data())
    with pytest.raises(ValueError, match="has no model.pt"):
        load_model(store, other.name)


# ------------------------------------------------------------------------------------------- sweep, resume


def test_sweep_skips_finished_runs_and_duplicates(tmp_path):
    store = RunStore(tmp_path, study="t")
    configs = [cfg("bn", epochs=1), cfg("ln", epochs=1), cfg("bn", epochs=1)]
    calls = []

    def data(config):
        calls.append(config.norm)
        return tiny_data()

    first = sweep(configs, store, data, quiet=True)
    assert first.trained == [configs[0].name, configs[1].name] and first.skipped == [] and calls == ["bn", "ln"]
    mtimes = {n: (store.path(n) / "metrics.jsonl").stat().st_mtime_ns for n in store.done_runs()}
    again = sweep(configs + [cfg("gn", epochs=1)], store, data, quiet=True)
    assert again.skipped == first.trained and again.trained == [cfg("gn", epochs=1).name]
    assert calls == ["bn", "ln", "gn"]
    assert all((store.path(n) / "metrics.jsonl").stat().st_mtime_ns == t for n, t in mtimes.items())
    assert again.results[0].metrics == store.load(first.trained[0])[1]


class Recorder:
    """A progress reporter that records the finished runs it was told about."""

    def __init__(self):
        self.ended = []

    def start_sweep(self, total):
        pass

    def start_run(self, name, total_steps):
        pass

    def advance(self, steps=1):
        pass

    def end_run(self, name, status, summary):
        self.ended.append((name, status))

    def close(self):
        pass


def test_sweep_in_two_worker_processes_writes_what_one_process_writes(tmp_path):
    configs = [cfg("bn", epochs=2), cfg("ln", epochs=2, seed=1), cfg("none", epochs=2)]
    serial = sweep(configs, RunStore(tmp_path / "serial", study="t"), tiny_data(), quiet=True)
    store = RunStore(tmp_path / "parallel", study="t")
    sweep(configs[:1], store, tiny_data(), quiet=True)  # one finished before: the workers skip it
    progress = Recorder()
    parallel = sweep(configs, store, tiny_data(), progress=progress, jobs=2)
    assert [r.name for r in parallel.results] == [c.name for c in configs]
    assert parallel.skipped == [configs[0].name] and parallel.trained == [c.name for c in configs[1:]]
    assert sorted(progress.ended) == sorted([(configs[0].name, "skipped")] + [(c.name, "trained") for c in configs[1:]])
    for a, b in zip(serial.results, parallel.results):
        assert _without_time(a.metrics) == _without_time(b.metrics) == _without_time(store.load(a.name)[1])
        assert b.model is None
    assert store.done_runs() == sorted(c.name for c in configs)


def test_sweep_jobs_must_be_a_positive_count(tmp_path):
    with pytest.raises(ValueError, match="jobs=0"):
        sweep([cfg()], RunStore(tmp_path, study="t"), tiny_data(), quiet=True, jobs=0)


class BlockInSecondRun:
    """A progress reporter that announces the second run's first step and then hangs (to be SIGKILLed there)."""

    def __init__(self):
        self.runs = 0

    def start_sweep(self, total):
        pass

    def start_run(self, name, total_steps):
        self.runs += 1

    def advance(self, steps=1):
        if self.runs == 2:
            print("BLOCKED", flush=True)
            time.sleep(120)

    def end_run(self, name, status, summary):
        print("FINISHED", name, flush=True)

    def close(self):
        pass


KILL_CONFIGS = [cfg(norm, epochs=1) for norm in ("bn", "ln", "none")]


def kill_me_sweep(root: str) -> None:
    """What the subprocess of the kill test runs."""
    sweep(KILL_CONFIGS, RunStore(root, study="kill"), tiny_data(), progress=BlockInSecondRun())


def test_sweep_killed_mid_run_resumes_only_unfinished_runs(tmp_path):
    root = tmp_path / "store"
    code = f"from tests.lab.test_trainer import kill_me_sweep; kill_me_sweep({str(root)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("BLOCKED"):
                break
        assert lines and lines[-1].startswith("BLOCKED"), f"the sweep ended early: {lines}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    names = [c.name for c in KILL_CONFIGS]
    store = RunStore(root, study="kill")
    assert store.done_runs() == [names[0]]
    left = [p.name for p in root.iterdir() if p.name.startswith(f".{names[1]}.tmp-")]
    assert len(left) == 1  # the killed run's folder: hidden, not a finished run
    first = store.path(names[0])
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir()}

    summary = sweep(KILL_CONFIGS, store, tiny_data(), quiet=True)

    assert summary.skipped == [names[0]] and summary.trained == names[1:]
    assert store.done_runs() == sorted(names)
    assert sorted(p.name for p in root.iterdir()) == sorted([*names, "study.json"])  # nothing doubled or left over
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir()}
    assert after == before
    # the redone run is the run a clean sweep makes
    fresh = train_run(KILL_CONFIGS[1], None, tiny_data())
    assert _without_time(store.load(names[1])[1]) == _without_time(json.loads(json.dumps(fresh.metrics)))


# ------------------------------------------------------------------------------------------------ progress


def test_progress_lines_and_quiet(tmp_path):
    store = RunStore(tmp_path, study="t")
    configs = [cfg("bn", epochs=1), cfg("ln", epochs=1)]
    lines = []
    sweep(configs[:1], store, tiny_data(), progress="lines", echo=lines.append)
    sweep(configs, store, tiny_data(), progress="lines", echo=lines.append)
    assert len(lines) == 3 and lines[0].startswith(f"[1/1] {configs[0].name}") and "test error" in lines[0]
    assert "skipped" in lines[1] and lines[2].startswith(f"[2/2] {configs[1].name}")
    quiet = []
    sweep([cfg("gn", epochs=1)], store, tiny_data(), progress="lines", quiet=True, echo=quiet.append)
    sweep([cfg("gn", epochs=2)], store, tiny_data(), progress=make_progress("lines", echo=quiet.append), quiet=True)
    assert quiet == []
    with pytest.raises(ValueError, match=r"kind.*'bars'"):
        make_progress("bars")


def test_rich_and_tqdm_progress_when_installed(tmp_path):
    for kind in ("rich", "tqdm"):
        try:
            reporter = make_progress(kind)
        except ImportError as e:
            assert f"pip install {kind}" in str(e)
            continue
        summary = sweep([cfg("bn", epochs=1, seed=len(kind))], RunStore(tmp_path / kind, study="t"), tiny_data(),
                        progress=reporter)  # fmt: skip
        assert len(summary.trained) == 1


# ---------------------------------------------------------------------------------------------------- DDP

WORLD = 2


def _ddp_rank(rank, root):
    info = init_distributed()
    assert (info.rank, info.world_size, info.device.type) == (rank, WORLD, "cpu") and dist.get_backend() == "gloo"
    assert init_distributed() == info  # idempotent
    configs = [cfg("ln", batch_size=4), cfg("bn", batch_size=4)]
    summary = sweep(configs, RunStore(root, study="ddp"), tiny_data(), quiet=True)
    again = sweep(configs, RunStore(root, study="ddp"), tiny_data(), quiet=True)  # every rank skips
    out = {
        "trained": summary.trained,
        "skipped_again": again.skipped,
        "dirs": [None if r.dir is None else str(r.dir) for r in summary.results],
        "metrics": [_without_time(r.metrics) for r in summary.results],
    }
    Path(root).parent.joinpath(f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_one_process_at_the_global_batch(tmp_path):
    root = tmp_path / "store"
    run_ranks(_ddp_rank, str(root), world=WORLD, torchrun_env=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    store = RunStore(root, study="ddp")
    names = ranks[0]["trained"]
    assert ranks[1]["trained"] == names and all("-w2-" in n for n in names)
    assert ranks[0]["skipped_again"] == ranks[1]["skipped_again"] == names
    assert ranks[0]["dirs"] == [str(store.path(n)) for n in names] and ranks[1]["dirs"] == [None, None]
    assert sorted(p.name for p in root.iterdir()) == sorted([*names, "study.json"])  # only rank 0 wrote
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # all-reduced: every rank reports the same numbers
    config, rows = store.load(names[0])
    assert config["world_size"] == 2 and config["batch_size"] == 4
    env = store.load_env(names[0])
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    # LayerNorm's statistics are per sample: 2 ranks x batch 4 train as 1 process at batch 8
    single = train_run(cfg("ln", batch_size=8), None, tiny_data())
    assert len(rows) == len(single.metrics)
    for ddp_row, one_row in zip(rows, single.metrics):
        assert ddp_row["lr"] == pytest.approx(one_row["lr"]) and ddp_row["step"] == one_row["step"]
        for key in ("train_loss", "test_loss", "grad_norm_mean"):
            assert ddp_row[key] == pytest.approx(one_row[key], rel=1e-4), key
        assert abs(ddp_row["test_error"] - one_row["test_error"]) <= 100 / 96 + 1e-9
