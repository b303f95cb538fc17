"""The speed study: end to end at --smoke, the profiler attribution, summary and plot from files, resume, bad options.

Timings are never asserted (a shared machine only adds time); the tests check what was measured and attributed.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from normlab.lab.models import SmallResNet
from normlab.lab.studies import get_study, speed
from normlab.layers.group_norm import GroupNorm

NORMS = ["gn+ws", "frn"]  # bn and none are added as the references


def _session(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


def _results(out: Path) -> dict:
    return json.loads((_session(out) / "results.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speed")
    threads = torch.get_num_threads()
    get_study("speed").run(out, level="smoke", norms=NORMS, devices=["cpu"], quiet=True)
    assert torch.get_num_threads() == threads  # restored
    return out


def test_smoke_writes_one_session_with_every_norm(smoke):
    assert json.loads((smoke / "study.json").read_text())["study"] == "speed"
    folder = _session(smoke)
    assert folder.name.startswith("speed-smoke-cpu-")
    assert {p.name for p in folder.iterdir()} == {"config.json", "env.json", "metrics.jsonl", "results.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["norms"] == ["bn", "gn+ws", "frn", "none"] and config["threads"] == 1  # smoke: one thread
    env = json.loads((folder / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["torch_threads"] >= 1

    res = _results(smoke)
    protocol = speed.PROTOCOLS["smoke"]
    assert res["device"] == "cpu" and res["torch"] == torch.__version__ and res["device_name"]
    assert res["threads"] == 1 and res["wall_s"] > 0
    assert set(res["norms"]) == {"gn+ws", "frn", "bn", "none"}
    for norm, v in res["norms"].items():
        assert len(v["round_ms"]) == protocol.rounds and v["step_ms"] == min(v["round_ms"]), norm
        assert v["samples_per_s"] == pytest.approx(1e3 * protocol.batch_size / v["step_ms"]), norm
        assert v["norm_ms"] == pytest.approx(v["step_ms"] * v["norm_share"]), norm
        assert v["peak_bytes"] > 0 and v["state_bytes"] > 0 and v["loss_finite"], norm
        assert len(v["profiled_shares"]) == protocol.profiled, norm
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == protocol.rounds * 4 and {r["norm"] for r in rows} == set(res["norms"])
    # the norms alternate: each round starts with another norm
    assert [r["norm"] for r in rows if r["round"] == 0][0] != [r["norm"] for r in rows if r["round"] == 1][0]


def test_smoke_ratios_backends_and_memory(smoke):
    v = _results(smoke)["norms"]
    assert v["bn"]["x_bn"] == 1.0 and v["none"]["x_none"] == 1.0
    assert v["frn"]["x_bn"] == pytest.approx(v["frn"]["step_ms"] / v["bn"]["step_ms"])
    assert v["bn"]["backends"] == {"batch_norm": "native"}
    assert v["frn"]["backends"] == {"filter_response_norm": "native"}
    assert v["gn+ws"]["backends"]["group_norm"] == "native" and "standardize_weight" in v["gn+ws"]["backends"]
    assert v["none"]["backends"] == {}
    # a norm keeps its input and statistics for backward: the step needs more memory than without norm
    assert v["none"]["peak_bytes"] < v["bn"]["peak_bytes"]


def test_attribution_is_the_norm_and_only_the_norm(smoke):
    """Forward ops inside the scopes, backward nodes matched by autograd sequence number, nothing else."""
    v = _results(smoke)["norms"]
    # 9 norms: stem, two per block (3 blocks), two projected shortcuts; gn+ws adds the 9 StdConv2d
    assert [v[n]["norm_modules"] for n in ("bn", "frn", "gn+ws", "none")] == [9, 9, 18, 0]
    assert v["bn"]["attributed"]["backward"] == ["NativeBatchNormBackward0"]  # not the in-place ReLU after it
    assert "aten::native_batch_norm" in v["bn"]["attributed"]["forward"]
    assert "NativeGroupNormBackward0" in v["gn+ws"]["attributed"]["backward"]
    # FRN + TLU is one autograd Function on CPU (normlab.kernels.native): one backward node, the TLU included
    assert v["frn"]["attributed"]["backward"] == ["_FilterResponseNormBackward"]
    for norm in ("bn", "frn", "gn+ws"):
        assert 0 < v[norm]["norm_share"] < 1, norm
        assert "ConvolutionBackward0" not in v[norm]["attributed"]["backward"], norm
        assert "ReluBackward0" not in v[norm]["attributed"]["backward"], norm
        assert "aten::convolution" not in v[norm]["attributed"]["forward"], norm
    assert v["none"]["norm_share"] == 0.0 and v["none"]["attributed"] == {"forward": [], "backward": []}


def test_norm_share_leaves_the_model_as_it_was():
    model = SmallResNet("gn+ws", widths=(4, 8, 8))
    x, y = torch.randn(2, 1, 28, 28), torch.randint(10, (2,))

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()

    before = model(x).detach()
    with speed.torch_threads(1):  # quick on a busy machine too
        r = speed.norm_share(model, step, steps=3, norm_classes=(GroupNorm,))
    assert r["modules"] == 18 and 0 < r["share"] < 1 and r["peak_bytes"] > 0
    assert len(r["shares"]) == 3 and r["share"] == sorted(r["shares"])[1]  # the median step
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "standardized_weight" not in vars(module)
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=0)  # GN has no running statistics


def test_summarize_and_plot_from_files_alone(smoke, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(smoke, out)
    summary = speed.summarize(out)
    assert summary.columns[:3] == ["device", "norm", "step ms"] and "x none" in summary.columns
    assert [row[1] for row in summary.rows] == ["bn", "gn+ws", "frn", "none"]  # the study's order
    assert all(row[0] == "cpu/smoke" for row in summary.rows)
    assert any("random" in note for note in summary.notes)

    # the table is computed from the files: change BatchNorm's step time there and the ratios follow
    path = _session(out) / "results.json"
    res = json.loads(path.read_text())
    res["norms"]["bn"]["step_ms"] = 2 * res["norms"]["none"]["step_ms"]
    res["norms"]["frn"]["step_ms"] = 3 * res["norms"]["none"]["step_ms"]
    path.write_text(json.dumps(res))
    rows = {row[1]: row for row in speed.summarize(out).rows}
    x_bn, x_none = summary.columns.index("x bn"), summary.columns.index("x none")
    assert (rows["frn"][x_bn], rows["frn"][x_none], rows["bn"][x_none]) == (1.5, 3.0, 2.0)
    per_s = summary.columns.index("samples/s")
    assert rows["bn"][per_s] == round(1e3 * speed.PROTOCOLS["smoke"].batch_size / res["norms"]["bn"]["step_ms"])

    # rounds far slower than the fastest: the summary says the machine was busy
    for slower, busy in ((1.1, False), (3.0, True)):
        for v in res["norms"].values():
            v["round_ms"] = [v["step_ms"], slower * v["step_ms"], slower * v["step_ms"]]
        path.write_text(json.dumps(res))
        assert speed.busy_spread(res) == pytest.approx(slower)
        assert any("machine was busy" in note for note in speed.summarize(out).notes) == busy

    (png,) = speed.plot(out)
    assert png == out / "speed-smoke-cpu.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_measures_nothing_unless_asked(smoke, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(smoke, out)
    before = (_session(out) / "results.json").read_bytes()

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(speed, "measure", no_measuring)
    lines = []
    speed.run(out, level="smoke", norms=["frn", "gn+ws", "frn"], devices=["cpu"], echo=lines.append)
    assert "already measured" in lines[0]
    assert (_session(out) / "results.json").read_bytes() == before

    # asked: a new session (the old one is kept), and the summary shows the newest
    old = json.loads(before)
    fake = {"norms": {n: {**v, "step_ms": 10.0 * (i + 1)} for i, (n, v) in enumerate(old["norms"].items())}}
    monkeypatch.setattr(speed, "measure", lambda *a, **k: {**fake, "wall_s": 1.0})
    speed.run(out, level="smoke", norms=NORMS, devices=["cpu"], quiet=True, remeasure=True)
    sessions = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(sessions) == 2
    (newest,) = speed.collect(out)
    assert newest["repeat"] == 1 and newest["norms"]["bn"]["step_ms"] == fake["norms"]["bn"]["step_ms"]


def test_bad_options_are_clear_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown norm 'bogus'.*Valid names: bn, brn"):
        speed.run(out, level="smoke", norms=["bn", "bogus"])
    with pytest.raises(ValueError, match=r"unknown level 'fast'.*quick"):
        speed.run(out, level="fast")
    with pytest.raises(ValueError, match=r"norms='bn' must be a non-empty list"):
        speed.run(out, level="smoke", norms="bn")
    with pytest.raises(ValueError, match=r"norms=\[\] must be a non-empty list"):
        speed.run(out, level="smoke", norms=[])
    with pytest.raises(ValueError, match=r"seeds=0 must be a positive integer"):
        speed.run(out, level="smoke", seeds=0)
    with pytest.raises(ValueError, match=r"unknown device 'tpu'"):
        speed.run(out, level="smoke", devices=["tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"no CUDA device"):
            speed.run(out, level="smoke", devices=["cuda"])
    assert not out.exists()  # nothing was created for a bad option

    with pytest.raises(ValueError, match="holds no speed results"):
        speed.summarize(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "study.json").write_text('{"study": "batch-size"}')
    with pytest.raises(ValueError, match="batch-size"):
        speed.run(other, level="smoke", norms=["bn"])
    with pytest.raises(ValueError, match="batch-size"):
        speed.summarize(other)


@pytest.mark.gpu
def test_smoke_on_cuda(tmp_path):
    speed.run(tmp_path, level="smoke", norms=["gn"], devices=["cuda"], quiet=True)
    res = _results(tmp_path)
    assert res["device"] == "cuda" and res["device_name"]
    for norm, v in res["norms"].items():
        assert v["peak_bytes"] > 0 and v["step_ms"] > 0, norm
        assert (0 < v["norm_share"] < 1) if norm != "none" else v["norm_share"] == 0.0, norm
    (node,) = res["norms"]["bn"]["attributed"]["backward"]  # cuDNN's or the native batch norm, or normlab's kernels
    assert node.endswith(("BatchNormBackward0", "_BatchNormTrainBackward"))


def test_profiler_chatter_on_stderr_is_dropped_and_other_lines_kept(capfd):
    import os

    from normlab.lab.studies.speed import _without_profiler_chatter

    with _without_profiler_chatter():
        os.write(2, b"USDT:2026 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real warning\n")
    assert capfd.readouterr().err == "a real warning\n"
