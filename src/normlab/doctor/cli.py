"""``normlab doctor MODEL [--weights FILE] [--data SPEC] [--num-batches N] [--json] [--trust-pickle]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .._loading import MODEL_FORMS, LoadError, load_model, resolve_callable

__all__ = ["add_doctor_parser", "doctor_command", "load_model", "load_data"]

_MODEL_FORMS = MODEL_FORMS
_DATA_FORMS = (
    "'package.module:function' (a function called with no arguments that returns an iterable of tensors or of "
    "(input, target) tuples)"
)


class DoctorCommandError(LoadError):
    """A problem with the command's arguments, reported to the user without a traceback."""


def add_doctor_parser(
    subparsers, *, named_datasets: dict[str, str] | None = None, load_named: Callable | None = None
) -> argparse.ArgumentParser:
    """Add the ``doctor`` subcommand to an argparse ``subparsers`` object; returns its parser.

    ``named_datasets`` (name -> description) and ``load_named(name, batch_size, num_batches, data_dir=...)`` let
    ``--data`` also take a dataset name; the ``normlab`` command passes the lab's
    (:data:`normlab.lab.data.NAMED_DATASETS`), which the doctor itself does not import.
    """
    named_datasets = dict(named_datasets or {})
    forms = _DATA_FORMS + (f", or a dataset name: {', '.join(named_datasets)}" if named_datasets else "")
    parser = subparsers.add_parser(
        "doctor",
        help="diagnose BatchNorm hazards in a model (small batches, stale statistics, foreign momentum, ...)",
        description="Run a few forward passes of MODEL on the data and report BatchNorm hazards with ranked fixes.",
    )
    parser.add_argument("model", metavar="MODEL", help=f"the model: {_MODEL_FORMS}")
    parser.add_argument(
        "--weights", metavar="FILE", help="a state_dict file, loaded with torch.load(weights_only=True)"
    )
    parser.add_argument("--data", metavar="SPEC", help=f"the data: {forms}; without it only static checks run")
    parser.add_argument("--num-batches", type=int, default=8, metavar="N", help="batches to use (default 8)")
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="B", help="batch size of a named dataset (default 32)"
    )
    parser.add_argument("--data-dir", metavar="DIR", help="where a named dataset's files are looked for first")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow MODEL to be a pickled model file (unpickling runs arbitrary code: only for files you trust)",
    )
    parser.set_defaults(func=doctor_command, named_datasets=named_datasets, load_named=load_named)
    return parser


def doctor_command(args: argparse.Namespace) -> int:
    """Run the doctor as the parsed arguments say; print the report. Returns 0, or 2 on a usage error."""
    from .diagnose import diagnose

    try:
        if args.num_batches <= 0:
            raise DoctorCommandError(f"--num-batches={args.num_batches} must be a positive integer")
        model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle)
        data = _data(args) if args.data else None
    except (LoadError, FileNotFoundError) as err:
        print(f"normlab doctor: error: {err}", file=sys.stderr)
        return 2
    report = diagnose(model, data, num_batches=args.num_batches)
    print(report.to_json() if args.json else report.render())
    return 0


def load_data(spec: str):
    """The iterable of batches returned by the function named 'package.module:function'."""
    return resolve_callable(spec, "--data", _DATA_FORMS)()


def _data(args: argparse.Namespace):
    named = getattr(args, "named_datasets", None) or {}
    if args.data in named:
        if args.batch_size <= 0:
            raise DoctorCommandError(f"--batch-size={args.batch_size} must be a positive integer")
        return args.load_named(args.data, args.batch_size, args.num_batches, data_dir=args.data_dir)
    if ":" not in args.data and named:
        raise DoctorCommandError(
            f"--data {args.data!r} is neither a dataset name ({', '.join(named)}) nor of the form {_DATA_FORMS}"
        )
    return load_data(args.data)
