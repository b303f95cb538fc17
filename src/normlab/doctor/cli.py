"""``normlab doctor MODEL [--weights FILE] [--data SPEC] [--num-batches N] [--json] [--trust-pickle]``."""

from __future__ import annotations

import argparse
import sys

from .._loading import MODEL_FORMS, LoadError, load_model, resolve_callable

__all__ = ["add_doctor_parser", "doctor_command", "load_model", "load_data"]

_MODEL_FORMS = MODEL_FORMS
_DATA_FORMS = (
    "'package.module:function' (a function called with no arguments that returns an iterable of tensors or of "
    "(input, target) tuples); named built-in datasets are not available yet"
)


class DoctorCommandError(LoadError):
    """A problem with the command's arguments, reported to the user without a traceback."""


def add_doctor_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``doctor`` subcommand to an argparse ``subparsers`` object; returns its parser."""
    parser = subparsers.add_parser(
        "doctor",
        help="diagnose BatchNorm hazards in a model (small batches, stale statistics, foreign momentum, ...)",
        description="Run a few forward passes of MODEL on the data and report BatchNorm hazards with ranked fixes.",
    )
    parser.add_argument("model", metavar="MODEL", help=f"the model: {_MODEL_FORMS}")
    parser.add_argument(
        "--weights", metavar="FILE", help="a state_dict file, loaded with torch.load(weights_only=True)"
    )
    parser.add_argument("--data", metavar="SPEC", help=f"the data: {_DATA_FORMS}; without it only static checks run")
    parser.add_argument("--num-batches", type=int, default=8, metavar="N", help="batches to use (default 8)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow MODEL to be a pickled model file (unpickling runs arbitrary code: only for files you trust)",
    )
    parser.set_defaults(func=doctor_command)
    return parser


def doctor_command(args: argparse.Namespace) -> int:
    """Run the doctor as the parsed arguments say; print the report. Returns 0, or 2 on a usage error."""
    from .diagnose import diagnose

    try:
        if args.num_batches <= 0:
            raise DoctorCommandError(f"--num-batches={args.num_batches} must be a positive integer")
        model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle)
        data = load_data(args.data) if args.data else None
    except LoadError as err:
        print(f"normlab doctor: error: {err}", file=sys.stderr)
        return 2
    report = diagnose(model, data, num_batches=args.num_batches)
    print(report.to_json() if args.json else report.render())
    return 0


def load_data(spec: str):
    """The iterable of batches returned by the function named 'package.module:function'."""
    return resolve_callable(spec, "--data", _DATA_FORMS)()
