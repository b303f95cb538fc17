import pytest

from normlab.lab import cli
from normlab.lab.report import find_studies, write_report


def test_study_parser_levels_and_options():
    parser = cli.build_parser()
    args = parser.parse_args(["study", "batch-size", "--smoke", "--norms", "bn", "gn", "--seeds", "2", "--quiet"])
    assert (args.name, args.level, args.norms, args.seeds, args.quiet) == ("batch-size", "smoke", ["bn", "gn"], 2, True)
    assert parser.parse_args(["study", "rnn"]).level == "quick"
    for bad in (["study", "nope"], ["study", "rnn", "--seeds", "0"], ["study", "rnn", "--smoke", "--full"]):
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
