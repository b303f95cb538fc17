"""``normlab doctor MODEL [--weights FILE] [--data SPEC] [--num-batches N] [--json] [--trust-pickle]``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["add_doctor_parser", "doctor_command", "load_model", "load_data"]

_MODEL_FORMS = (
    "'package.module:factory' (a function called with no arguments that returns the model), or the path of a "
    "whole pickled model together with --trust-pickle"
)
_DATA_FORMS = (
    "'package.module:function' (a function called with no arguments that returns an iterable of tensors or of "
    "(input, target) tuples); named built-in datasets are not available yet"
)


class DoctorCommandError(ValueError):
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
    except DoctorCommandError as err:
        print(f"normlab doctor: error: {err}", file=sys.stderr)
        return 2
    report = diagnose(model, data, num_batches=args.num_batches)
    print(report.to_json() if args.json else report.render())
    return 0


def _resolve(spec: str, what: str, forms: str) -> Callable:
    """The callable named by 'package.module:attribute'; the current directory is importable, as for python -m."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise DoctorCommandError(f"{what} {spec!r} is not of an accepted form: {forms}")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DoctorCommandError(f"{what} {spec!r}: cannot import {module_name!r} ({err})") from err
    finally:
        if added:
            sys.path.remove(os.getcwd())
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise DoctorCommandError(f"{what} {spec!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise DoctorCommandError(f"{what} {spec!r}: {attribute!r} is not callable")
    return target


def load_model(spec: str, *, weights: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Build the model from 'package.module:factory', or unpickle it from a file (only with ``trust_pickle``), then
    load ``weights`` (a state_dict file, read with ``torch.load(weights_only=True)``) into it."""
    if Path(spec).is_file():
        if not trust_pickle:
            raise DoctorCommandError(
                f"MODEL {spec!r} is a file: loading a whole pickled model runs arbitrary code from that file, so it "
                "needs --trust-pickle (only for files you trust). Safer: give MODEL as 'package.module:factory' and "
                "the weights as a state_dict with --weights FILE"
            )
        model = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise DoctorCommandError(f"MODEL file {spec!r} holds a {type(model).__name__}, not a torch.nn.Module")
    else:
        model = _resolve(spec, "MODEL", _MODEL_FORMS)()
        if not isinstance(model, nn.Module):
            raise DoctorCommandError(f"MODEL factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(model, weights)
    return model


def _load_weights(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise DoctorCommandError(f"--weights {path!r}: no such file") from err
    except Exception as err:  # torch.load raises many types for foreign or non-weights files
        raise DoctorCommandError(
            f"--weights {path!r} cannot be read with torch.load(weights_only=True) ({type(err).__name__}): it must be "
            "a state_dict; a whole pickled model goes in MODEL, with --trust-pickle"
        ) from err
    if not isinstance(state, dict):
        raise DoctorCommandError(f"--weights {path!r} holds a {type(state).__name__}, expected a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DoctorCommandError(f"--weights {path!r} does not fit the model: {err}") from err


def load_data(spec: str):
    """The iterable of batches returned by the function named 'package.module:function'."""
    return _resolve(spec, "--data", _DATA_FORMS)()
