"""``normlab bench kernels`` / ``bench resnet50``: the --smoke runs on CPU write the documented CSVs, missing or
failing implementations become status rows instead of crashes, bad options are clear errors, and the ResNet-50 used
by the benchmark has torchvision's architecture (its parameter count)."""

import csv

import pytest
import torch
from torch import nn

import normlab
from normlab import kernels
from normlab.lab import bench, cli
from normlab.lab.models import ResNet50

FAST_RESNET = ["--configs", "b32-fp32-nchw", "--steps", "1", "--warmup", "1", "--backend", "reference"]


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _no_triton_kernels(monkeypatch):
    """Make the dispatch find no Triton kernel at all, as before the kernel modules exist."""
    monkeypatch.setattr(kernels, "_triton_impl", lambda op: None)


# ----------------------------------------------------------------------------------------------- ResNet-50


@pytest.mark.parametrize("norm", ["bn", nn.BatchNorm2d])
def test_resnet50_has_torchvisions_parameter_count(norm):
    model = ResNet50(norm)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision.models.resnet50()
    assert len([m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, normlab.BatchNorm2d))]) == 53
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet50_norm_specs_and_input_checks():
    gn = ResNet50("gn:32", num_classes=10)
    norms = [m for m in gn.modules() if isinstance(m, normlab.GroupNorm)]
    assert len(norms) == 53 and {m.num_groups for m in norms} == {32}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ResNet50("none").modules())
    with pytest.raises(ValueError, match="expected input .* 3 channels"):
        gn(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="norm='bogus'"):
        ResNet50("bogus")


# ------------------------------------------------------------------------------------------- bench kernels


def test_bench_kernels_smoke_writes_the_csv(tmp_path):
    out = tmp_path / "kernels.csv"
    argv = ["bench", "kernels", "--smoke", "--ops", "gn", "rms", "--dtypes", "fp32", "bf16", "--compile", "none"]
    assert cli.main([*argv, "--backend", "reference", "--out", str(out)]) == 0
    columns, rows = _read(out)
    assert columns == bench.KERNEL_COLUMNS
    # gn: 2 dtypes x 2 layouts x 2 passes; rms (rows): 2 dtypes x 2 passes
    assert len(rows) == 12
    assert {(r["op"], r["layout"]) for r in rows} == {("gn", "channels_last"), ("gn", "nchw"), ("rms", "rows")}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["normlab_status"] == r["eager_status"] == "ok" and r["compile_status"] == "skipped"
        assert float(r["normlab_ms"]) > 0 and float(r["eager_ms"]) > 0 and r["compile_ms"] == ""
        traffic = float(r["traffic_bytes"])
        assert traffic == {"fwd": 2, "fwd+bwd": 5}[r["pass"]] * int(r["elements"]) * (2 if r["dtype"] == "bf16" else 4)
        assert float(r["normlab_gbps"]) == pytest.approx(traffic / float(r["normlab_ms"]) / 1e6, rel=1e-3)
        assert float(r["normlab_bw_frac"]) == pytest.approx(float(r["normlab_gbps"]) / float(r["copy_gbps"]), rel=1e-3)
        assert float(r["speedup_vs_eager"]) == pytest.approx(float(r["eager_ms"]) / float(r["normlab_ms"]), rel=1e-3)
        assert r["device"] and r["torch"] == torch.__version__ and r["normlab"]
    assert {r["baseline"] for r in rows} == {"nn.GroupNorm", "nn.RMSNorm"}


def test_bench_kernels_missing_triton_kernels_are_unavailable_not_fatal(tmp_path, monkeypatch, capsys):
    _no_triton_kernels(monkeypatch)
    rows = bench.bench_kernels(
        tmp_path / "k.csv", ops=["bn", "frn"], dtypes=["fp32"], layouts=["nchw"], compile="none", smoke=True,
        backend="triton",
    )  # fmt: skip
    assert len(rows) == 4
    for r in rows:
        assert r["normlab_status"].startswith("unavailable") and r["normlab_ms"] is None
        assert r["eager_status"] == "ok" and r["eager_ms"] > 0 and r["speedup_vs_eager"] is None
    assert {r["baseline"] for r in rows} == {"nn.BatchNorm2d", "normlab reference"}
    assert "no Triton kernel for 'batch_norm'" in capsys.readouterr().out


def test_bench_kernels_failing_implementation_is_an_error_row(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(normlab.functional, "group_norm", broken)
    rows = bench.bench_kernels(
        tmp_path / "k.csv", ops=["gn"], dtypes=["fp32"], layouts=["nchw"], compile="none", smoke=True,
        backend="reference", echo=lambda line: None,
    )  # fmt: skip
    assert [r["normlab_status"] for r in rows] == ["error: RuntimeError: boom"] * 2
    assert all(r["eager_status"] == "ok" for r in rows)


def test_bench_kernels_times_torch_compile(tmp_path):
    rows = bench.bench_kernels(
        tmp_path / "k.csv", ops=["bn"], dtypes=["fp32"], layouts=["nchw"], compile="all", smoke=True,
        backend="reference", echo=lambda line: None,
    )  # fmt: skip
    assert [r["compile_status"] for r in rows] == ["ok", "ok"]
    assert all(r["compile_ms"] > 0 and r["speedup_vs_compile"] > 0 for r in rows)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ops": ["gnn"]}, "unknown op 'gnn'. Did you mean 'gn'"),
        ({"ops": []}, "at least one op"),
        ({"dtypes": ["fp64"]}, "unknown dtype 'fp64'"),
        ({"layouts": ["nwhc"]}, "unknown layout 'nwhc'"),
        ({"compile": "some"}, "unknown compile scope 'some'"),
        ({"backend": "cuda"}, "unknown backend 'cuda'"),
        ({"shapes": ["2,32,4"]}, "shape='2,32,4' must be 4 positive integers"),
        ({"shapes": ["2,32,0,4"]}, "must be 4 positive integers"),
        ({"rows": "4x"}, "shape='4x' must be 2 positive integers"),
        ({"ops": ["gn"], "shapes": ["2,48,4,4"]}, "op 'gn' .* needs C divisible by 32; shape 2x48x4x4 has C=48"),
        ({"ops": ["evo_s0"], "shapes": [(2, 16, 4, 4)]}, "needs C divisible by 32"),
    ],
)
def test_bench_kernels_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.bench_kernels(tmp_path / "k.csv", smoke=True, **kwargs)
    assert not (tmp_path / "k.csv").exists()


def test_bench_cli_errors_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["bench", "kernels", "--smoke", "--ops", "gnn", "--out", str(tmp_path / "k.csv")]) == 2
    assert "unknown op 'gnn'" in capsys.readouterr().err
    assert cli.main(["bench", "resnet50", "--smoke", "--settings", "torch-ln"]) == 2
    assert "unknown setting 'torch-ln'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench"])  # a subcommand is required


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_without_cuda_needs_smoke(tmp_path, capsys):
    for kind in ("kernels", "resnet50"):
        assert cli.main(["bench", kind, "--out", str(tmp_path / f"{kind}.csv")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / f"{kind}.csv").exists()


# ------------------------------------------------------------------------------------------ bench resnet50


def test_bench_resnet50_smoke_writes_steps_costs_and_targets(tmp_path):
    out = tmp_path / "resnet.csv"
    settings = ["torch-bn", "normlab-gn", "none"]
    assert cli.main(["bench", "resnet50", "--smoke", *FAST_RESNET, "--settings", *settings, "--out", str(out)]) == 0
    columns, rows = _read(out)
    assert columns == bench.RESNET_COLUMNS
    assert [(r["setting"], r["mode"]) for r in rows] == [
        ("none", "eager"),
        ("torch-bn", "eager"),
        ("normlab-gn", "eager"),
    ]
    steps = {r["setting"]: float(r["step_ms"]) for r in rows}
    for r in rows:
        assert r["status"] == "ok" and (r["batch"], r["image_size"], r["precision"]) == ("2", "32", "fp32")
        assert float(r["norm_cost_ms"]) == pytest.approx(steps[r["setting"]] - steps["none"], rel=1e-3, abs=1e-3)
    assert [r["backend"] for r in rows] == ["", "", "reference"]

    columns, targets = _read(tmp_path / "resnet-targets.csv")
    assert columns == bench.TARGET_COLUMNS
    gn_vs_bn = next(t for t in targets if t["ratio"] == "normlab-gn eager / torch-bn eager")
    assert float(gn_vs_bn["value"]) == pytest.approx(steps["normlab-gn"] / steps["torch-bn"], rel=1e-3)
    assert gn_vs_bn["target"] == "<= 1" and gn_vs_bn["met"] in ("yes", "no")
    compiled = next(t for t in targets if t["ratio"] == "normlab-gn-auto compile / torch-gn compile")
    assert compiled["target"] == "<= 1"  # the compile target: what the default dispatch compiles to
    assert compiled["value"] == "" and compiled["met"] == ""  # not measured: no ratio, no verdict


def test_bench_resnet50_auto_settings_use_the_default_dispatch(tmp_path):
    """normlab-bn-auto / normlab-gn-auto measure what a user gets by default (backend auto), whatever the run's."""
    rows = bench.bench_resnet50(
        tmp_path / "r.csv", settings=["normlab-bn-auto", "normlab-gn", "none"], configs=["b32-fp32-nchw"], steps=1,
        warmup=1, smoke=True, backend="reference", echo=lambda line: None,
    )  # fmt: skip
    backends = {r["setting"]: r["backend"] for r in rows}
    assert backends == {"none": None, "normlab-bn-auto": "auto", "normlab-gn": "reference"}
    assert all(r["status"] == "ok" for r in rows)


def test_bench_resnet50_missing_kernel_is_unavailable(tmp_path, monkeypatch):
    _no_triton_kernels(monkeypatch)
    rows = bench.bench_resnet50(
        tmp_path / "r.csv", settings=["normlab-bn", "none"], configs=["b32-fp32-nchw"], steps=1, warmup=1,
        smoke=True, backend="triton", echo=lambda line: None,
    )  # fmt: skip
    status = {r["setting"]: r["status"] for r in rows}
    assert status["none"] == "ok"
    assert status["normlab-bn"].startswith("unavailable") and "batch_norm" in status["normlab-bn"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"settings": ["torch-ln"]}, "unknown setting 'torch-ln'"),
        ({"configs": ["b64-fp16"]}, "unknown config 'b64-fp16'"),
        ({"configs": ["b32-fp32-nchw"], "compile": ["b64-bf16-cl"]}, "not selected by configs"),
        ({"steps": 0}, "steps=0 must be a positive integer"),
        ({"warmup": 1.5}, "warmup=1.5 must be a positive integer"),
        ({"backend": "tritonn"}, "unknown backend 'tritonn'. Did you mean 'triton'"),
    ],
)
def test_bench_resnet50_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.bench_resnet50(tmp_path / "r.csv", smoke=True, **kwargs)


def test_resnet50_compile_flag_and_run_order():
    parser = cli.build_parser()
    assert parser.parse_args(["bench", "resnet50"]).compile is None
    assert parser.parse_args(["bench", "resnet50", "--compile"]).compile == []
    assert parser.parse_args(["bench", "resnet50", "--compile", "b64-bf16-cl"]).compile == ["b64-bf16-cl"]
    runs = bench._resnet_runs(["torch-bn", "normlab-gn", "none", "torch-gn", "normlab-gn-auto"], compiled=True)
    assert runs[0] == ("none", "eager")
    # torch's layers and the default dispatch (the compile target) before the kernels forced in as custom ops
    assert runs[5:] == [
        ("torch-gn", "compile"), ("normlab-gn-auto", "compile"), ("torch-bn", "compile"), ("normlab-gn", "compile")
    ]  # fmt: skip
    assert parser.parse_args(["bench", "resnet50", "--graph"]).graph
    runs = bench._resnet_runs(["torch-bn", "none"], compiled=True, graph=True)
    # every graph cost needs the no-norm replay, measured before the others
    assert runs == [("none", "eager"), ("torch-bn", "eager"), ("none", "graph"), ("torch-bn", "graph")] + [
        ("torch-bn", "compile")
    ]


def test_resnet50_rounds_alternate_the_order_with_the_no_norm_step_first():
    settings = ["torch-bn", "normlab-gn", "none", "torch-gn", "normlab-gn-auto"]
    first = bench._resnet_runs(settings, compiled=True, graph=True)
    second = bench._resnet_runs(settings, compiled=True, graph=True, reverse=True)
    assert sorted(first) == sorted(second)
    for mode in ("eager", "graph", "compile"):
        a = [s for s, m in first if m == mode]
        b = [s for s, m in second if m == mode]
        if mode == "compile":
            assert b == a[::-1]
        else:  # every cost of a round needs that round's no-norm step before it
            assert a[0] == b[0] == "none" and b[1:] == a[:0:-1]
    assert [m for _, m in second] == sorted((m for _, m in second), key=["eager", "graph", "compile"].index)
    parser = cli.build_parser()
    assert parser.parse_args(["bench", "resnet50"]).rounds == 1
    assert parser.parse_args(["bench", "resnet50", "--rounds", "2"]).rounds == 2


def test_bench_resnet50_rounds_write_a_row_per_round_and_pool_the_targets(tmp_path):
    rows = bench.bench_resnet50(
        tmp_path / "r.csv", settings=["torch-bn", "normlab-gn", "none"], configs=["b32-fp32-nchw"], steps=1,
        warmup=1, smoke=True, backend="reference", rounds=2, echo=lambda line: None,
    )  # fmt: skip
    assert [(r["setting"], r["round"]) for r in rows] == [
        ("none", 1), ("torch-bn", 1), ("normlab-gn", 1), ("none", 2), ("normlab-gn", 2), ("torch-bn", 2)
    ]  # fmt: skip
    assert all(r["norm_cost_ms"] is not None for r in rows)  # each round's against its own no-norm step
    with open(tmp_path / "r.csv") as fh:
        assert [line.split(",")[3] for line in fh.read().splitlines()] == ["round"] + ["1"] * 3 + ["2"] * 3
    with pytest.raises(ValueError, match="rounds=0 must be a positive integer"):
        bench.bench_resnet50(tmp_path / "r.csv", smoke=True, rounds=0)


def test_resnet_targets_pool_rounds_with_the_median():
    def row(setting, step, round_):
        return {"config": "c", "setting": setting, "mode": "eager", "step_ms": step, "round": round_}

    rows = [row("torch-bn", 10.0, 1), row("normlab-gn", 13.0, 1), row("normlab-gn", 11.0, 2), row("torch-bn", 12.0, 2)]
    got = {t["ratio"]: t for t in bench.resnet_targets(rows)}["normlab-gn eager / torch-bn eager"]
    assert (got["numerator_ms"], got["denominator_ms"], got["value"]) == (12.0, 11.0, pytest.approx(12 / 11))


def test_bench_resnet50_graph_needs_cuda(tmp_path):
    """On the CPU (--smoke) --graph is ignored: CUDA graphs need a GPU."""
    rows = bench.bench_resnet50(
        tmp_path / "r.csv", settings=["none"], configs=["b32-fp32-nchw"], steps=1, warmup=1, smoke=True, graph=True,
        echo=lambda line: None,
    )  # fmt: skip
    assert [r["mode"] for r in rows] == ["eager"]


def test_resnet_targets_ratios():
    def row(setting, mode, step, cost=None):
        return {"config": "c", "setting": setting, "mode": mode, "step_ms": step, "norm_cost_ms": cost}

    rows = [
        row("none", "eager", 10.0, 0.0),
        row("torch-bn", "eager", 14.0, 4.0),
        row("normlab-bn", "eager", 11.0, 1.0),
        row("normlab-gn", "eager", 15.0, 5.0),
        row("torch-gn", "compile", 20.0),
    ]
    got = {t["ratio"]: (t["value"], t["target"], t["met"]) for t in bench.resnet_targets(rows)}
    assert got["normlab-gn eager / torch-bn eager"] == (pytest.approx(15 / 14), "<= 1", "no")
    assert got["normlab-gn eager / torch-gn compile"] == (pytest.approx(0.75), "<= 0.9", "yes")
    assert got["normlab-bn norm cost / torch-bn norm cost"] == (pytest.approx(0.25), "<= 0.5", "yes")
    assert got["normlab-bn-auto compile / torch-bn compile"] == (None, "<= 1", "")
    assert got["normlab-bn compile / torch-bn compile"] == (None, None, "")  # forced kernels: reported, no target
    assert got["torch-gn eager / torch-bn eager"] == (None, None, "")
    rows += [row("torch-bn", "graph", 8.0, 2.0), row("normlab-bn", "graph", 7.0, 1.0)]
    got = {t["ratio"]: (t["value"], t["target"], t["met"]) for t in bench.resnet_targets(rows)}
    assert got["normlab-bn norm cost / torch-bn norm cost (graph)"] == (pytest.approx(0.5), None, "")
    rows[1]["norm_cost_ms"] = -0.5  # noise: torch BN "faster" than no norm gives no cost ratio
    got = {t["ratio"]: t["value"] for t in bench.resnet_targets(rows)}
    assert got["normlab-bn norm cost / torch-bn norm cost"] is None
