import pytest

from normlab.lab import cli
from normlab.lab.report import find_studies, write_report


def test_study_parser_levels_and_options():
    parser = cli.build_parser()
    args = parser.parse_args(["study", "batch-size", "--smoke", "--norms", "bn", "gn", "--seeds", "2", "--quiet"])
    assert (args.name, args.level, args.norms, args.seeds, args.quiet) == ("batch-size", "smoke", ["bn", "gn"], 2, True)
    assert parser.parse_args(["study", "rnn"]).level == "quick"
    assert parser.parse_args(["study", "rnn"]).jobs == cli.default_jobs() >= 1
    assert parser.parse_args(["demo", "--jobs", "3"]).jobs == 3
    bad_options = (["study", "nope"], ["study", "rnn", "--seeds", "0"], ["study", "rnn", "--smoke", "--full"])
    for bad in bad_options + (["study", "rnn", "--jobs", "0"], ["demo", "--jobs", "many"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_report_on_a_folder_without_results_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "holds no study results" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not a folder"):
        find_studies(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no study results"):
        write_report(tmp_path)


def test_report_on_an_unknown_study_marker(tmp_path):
    (tmp_path / "study.json").write_text('{"study": "no-such-study"}')
    with pytest.raises(ValueError, match="unknown study 'no-such-study'"):
        write_report(tmp_path)


def test_demo_smoke_runs_every_study_and_report_regenerates_from_files(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--out", str(out), "--quiet"]) == 0
    report = (out / "report.md").read_text()
    for title in ("batch size", "Inference", "Online", "LSTM", "Training-step cost"):
        assert title.lower() in report.lower()
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"batch-size", "inference", "online", "rnn", "speed"}
    (out / "report.md").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_study_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli.main(["study", "batch-size", "--smoke", "--norms", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert "bogus" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert cli.main(["study", "online", "--smoke", "--out", str(tmp_path / "other")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_doctor_takes_a_named_dataset(capsys):
    import json

    argv = ["doctor", "normlab.lab.models:CNN1d", "--data", "mnist1d", "--batch-size", "1", "--num-batches", "3"]
    assert cli.main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batch_sizes"] == [1, 1, 1]
    assert {"batch_size_one", "small_batch_stats"} <= {f["hazard"] for f in report["findings"]}
    assert cli.main(argv[:3] + ["cifar10"]) == 2
    err = capsys.readouterr().err
    assert "'cifar10' is neither a dataset name (fashion, fashion-seq, mnist1d, mnist1d-seq)" in err
    assert cli.main(argv[:3] + ["fashion", "--data-dir", "/no/such/dir", "--batch-size", "0"]) == 2
    assert "--batch-size=0" in capsys.readouterr().err


def test_batch_size_study_under_torchrun_is_data_parallel(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv += ["-m", "normlab.lab.cli", "study", "batch-size", "--smoke", "--out", str(out), "--quiet"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 4 and all("-w2-" in p.name for p in runs)  # run names carry the world size
    for run in runs:
        env = json.loads((run / "env.json").read_text())
        assert (env["world_size"], env["backend"]) == (2, "gloo")
    report = (out / "report.md").read_text()
    assert "Data-parallel over 2 processes (gloo)" in report and "| bn |" in report


def test_studies_without_data_parallel_runs_refuse_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["study", "online", "--smoke", "--out", str(tmp_path / "x")]) == 2
    assert "'online' does not run under torchrun (WORLD_SIZE=2); studies that do: batch-size" in capsys.readouterr().err


def test_a_missing_optional_package_is_an_error_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    from normlab.lab import studies

    def missing(name):
        raise ImportError('MNIST-1D needs the mnist1d package: pip install "normlab[lab]" (or pip install mnist1d)')

    monkeypatch.setattr(studies, "get_study", missing)
    assert cli.main(["study", "rnn", "--smoke", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["demo", "--smoke", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert 'normlab study: error: MNIST-1D needs the mnist1d package: pip install "normlab[lab]"' in err
    assert "normlab demo: error: MNIST-1D needs" in err


def test_the_console_entry_exits_with_main_status_and_flushed_output(tmp_path):
    # under torchrun (WORLD_SIZE > 1) it leaves through os._exit: the status and buffered output must survive that
    import os
    import subprocess
    import sys

    def entry(world_size, *args):
        argv = [sys.executable, "-m", "normlab.lab.cli", *args]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"WORLD_SIZE": world_size}
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)

    for world_size in ("1", "2"):
        done = entry(world_size, "report", str(tmp_path))
        assert done.returncode == 2 and "normlab report: error:" in done.stderr, done.stderr
    done = entry("2", "demo", "--tiny", "--epochs", "1")
    assert done.returncode == 0, done.stderr
    assert "GroupNorm's statistics are per sample" in done.stdout  # the last lines, still in stdout's buffer
