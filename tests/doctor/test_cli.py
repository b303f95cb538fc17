import argparse
import json

import pytest
import torch

from normlab.doctor.cli import add_doctor_parser, doctor_command
from tests.doctor.fixtures import MLP, make_model

MODEL = "tests.doctor.fixtures:make_model"
DATA = "tests.doctor.fixtures:make_data"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="normlab")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["doctor", *argv])


def run(capsys, *argv: str) -> tuple[int, str, str]:
    args = parse(*argv)
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_parser_defaults_and_command():
    args = parse(MODEL)
    assert args.func is doctor_command
    assert (args.model, args.weights, args.data, args.num_batches, args.json, args.trust_pickle) == (
        MODEL,
        None,
        None,
        8,
        False,
        False,
    )
    args = parse(MODEL, "--weights", "w.pt", "--data", DATA, "--num-batches", "3", "--json", "--trust-pickle")
    assert (args.weights, args.data, args.num_batches, args.json, args.trust_pickle) == ("w.pt", DATA, 3, True, True)


def test_json_report_from_module_function_strings(capsys):
    rc, out, err = run(capsys, MODEL, "--data", DATA, "--num-batches", "4", "--json")
    assert rc == 0 and err == ""
    report = json.loads(out)
    assert report["model"] == "ConvNet" and report["clean"] is True
    assert [layer["name"] for layer in report["layers"]] == ["bn1", "bn2"]
    assert report["num_batches"] == 4 and report["batch_sizes"] == [32] * 4


def test_table_output(capsys):
    rc, out, _ = run(capsys, MODEL, "--data", DATA)
    assert rc == 0
    assert out.startswith("normlab doctor: ConvNet, 2 batch norm layer(s), 8 batch(es)")
    assert "No hazards found." in out and "bn2" in out


def test_without_data_only_static_checks_run(capsys):
    rc, out, _ = run(capsys, MODEL, "--json")
    report = json.loads(out)
    assert rc == 0 and report["num_batches"] == 0
    assert any("no data" in n for n in report["notes"])


def test_weights_are_loaded_with_weights_only(capsys, tmp_path):
    state = make_model().state_dict()
    state["bn1.running_var"][0] = float("nan")
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    rc, out, _ = run(capsys, MODEL, "--weights", str(path), "--data", DATA, "--json")
    findings = json.loads(out)["findings"]
    assert rc == 0 and [(f["hazard"], f["layer"]) for f in findings] == [("degenerate_running_stats", "bn1")]


def test_weights_file_holding_a_pickled_model_is_refused(capsys, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(make_model(), path)
    rc, out, err = run(capsys, MODEL, "--weights", str(path))
    assert rc == 2 and out == ""
    assert "weights_only=True" in err and "--trust-pickle" in err


def test_weights_that_do_not_fit(capsys, tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(MLP().state_dict(), path)
    rc, _, err = run(capsys, MODEL, "--weights", str(path))
    assert rc == 2 and "does not fit the model" in err


def test_pickled_model_needs_trust_pickle(capsys, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(make_model(), path)
    rc, out, err = run(capsys, str(path), "--data", DATA)
    assert rc == 2 and out == ""
    assert "--trust-pickle" in err and "arbitrary code" in err and "package.module:factory" in err
    rc, out, _ = run(capsys, str(path), "--data", DATA, "--trust-pickle", "--json")
    assert rc == 0 and json.loads(out)["model"] == "ConvNet"


def test_pickled_file_that_is_not_a_model(capsys, tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"a": torch.zeros(1)}, path)
    rc, _, err = run(capsys, str(path), "--trust-pickle")
    assert rc == 2 and "not a torch.nn.Module" in err


@pytest.mark.parametrize(
    "model, data, message",
    [
        ("no_colon_here", None, "not of an accepted form: 'package.module:factory'"),
        ("tests.doctor.no_such_module:make_model", None, "cannot import 'tests.doctor.no_such_module'"),
        ("tests.doctor.fixtures:no_such_factory", None, "has no attribute 'no_such_factory'"),
        ("tests.doctor.fixtures:CLEAN_BATCH_SIZE", None, "is not callable"),
        ("tests.doctor.fixtures:make_data", None, "returned a list, not a torch.nn.Module"),
        (MODEL, "cifar10", "not of an accepted form"),
        (MODEL, "tests.doctor.fixtures:nothing", "has no attribute 'nothing'"),
    ],
)
def test_usage_errors_are_clear(capsys, model, data, message):
    argv = [model] + (["--data", data] if data else [])
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("normlab doctor: error: ") and message in err


def test_bad_data_spec_lists_the_accepted_forms(capsys):
    _, _, err = run(capsys, MODEL, "--data", "cifar10")
    assert "'package.module:function'" in err and "iterable of tensors or of (input, target) tuples" in err


def test_num_batches_must_be_positive(capsys):
    rc, _, err = run(capsys, MODEL, "--num-batches", "0")
    assert rc == 2 and "--num-batches=0" in err
