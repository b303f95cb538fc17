"""Loading what a command line names: a callable as 'package.module:attribute', a model, a state_dict file.

Shared by ``normlab doctor`` and ``normlab export``. Every problem is a :class:`LoadError` (a ValueError) whose
message names the argument and the value, for printing without a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoadError", "MODEL_FORMS", "resolve_callable", "load_model", "load_weights"]

MODEL_FORMS = (
    "'package.module:factory' (a function called with no arguments that returns the model), or the path of a "
    "whole pickled model together with --trust-pickle"
)


class LoadError(ValueError):
    """A command-line argument naming something that cannot be loaded."""


def resolve_callable(spec: str, what: str, forms: str) -> Callable:
    """The callable named by 'package.module:attribute'; the current directory is importable, as for python -m."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise LoadError(f"{what} {spec!r} is not of an accepted form: {forms}")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise LoadError(f"{what} {spec!r}: cannot import {module_name!r} ({err})") from err
    finally:
        if added:
            sys.path.remove(os.getcwd())
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise LoadError(f"{what} {spec!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise LoadError(f"{what} {spec!r}: {attribute!r} is not callable")
    return target


def load_model(spec: str, *, weights: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Build the model from 'package.module:factory', or unpickle it from a file (only with ``trust_pickle``), then
    load ``weights`` (a state_dict file, read with ``torch.load(weights_only=True)``) into it."""
    if Path(spec).is_file():
        if not trust_pickle:
            raise LoadError(
                f"MODEL {spec!r} is a file: loading a whole pickled model runs arbitrary code from that file, so it "
                "needs --trust-pickle (only for files you trust). Safer: give MODEL as 'package.module:factory' and "
                "the weights as a state_dict with --weights FILE"
            )
        model = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise LoadError(f"MODEL file {spec!r} holds a {type(model).__name__}, not a torch.nn.Module")
    else:
        model = resolve_callable(spec, "MODEL", MODEL_FORMS)()
        if not isinstance(model, nn.Module):
            raise LoadError(f"MODEL factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise LoadError(f"--weights {path!r}: no such file") from err
    except Exception as err:  # torch.load raises many types for foreign or non-weights files
        raise LoadError(
            f"--weights {path!r} cannot be read with torch.load(weights_only=True) ({type(err).__name__}): it must be "
            "a state_dict; a whole pickled model goes in MODEL, with --trust-pickle"
        ) from err
    if not isinstance(state, dict):
        raise LoadError(f"--weights {path!r} holds a {type(state).__name__}, expected a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise LoadError(f"--weights {path!r} does not fit the model: {err}") from err
