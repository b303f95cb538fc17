"""The lab's studies: each reproduces one BatchNorm failure mode and its cures.

A study is a module in this package exposing ``STUDY``, an object with:

* ``name`` (the CLI name, e.g. ``"batch-size"``) and ``description`` (one line);
* ``run(out, *, level, norms=None, seeds=None, quiet=False, echo=print, data_dir=None, jobs=1) -> None``: runs
  the study at ``level`` ("smoke": seconds, for tests; "quick": CPU minutes; "full": the GPU-scale protocol),
  writing every result as files under ``out`` (a :class:`normlab.lab.runs.RunStore` for training runs, plus JSON
  files for other measurements), training up to ``jobs`` runs at once in separate processes where the study trains
  several (results do not depend on ``jobs``). Re-running resumes: finished runs are not redone.
* ``summarize(out) -> Summary``: reads only the files under ``out`` and returns the study's table and notes;
* ``plot(out) -> list[Path]``: writes PNG plots under ``out`` from the files alone (matplotlib, Agg backend).

Reports (:mod:`normlab.lab.report`) are generated only from these files, so ``normlab report DIR`` regenerates them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ...functional._checks import unknown_name_error

__all__ = ["LEVELS", "STUDIES", "Study", "Summary", "get_study", "list_studies", "torch_threads"]

LEVELS = ("smoke", "quick", "full")

# name -> module; imported on demand so that one study's optional dependency never breaks another
STUDIES = {
    "batch-size": "normlab.lab.studies.batch_size",
    "speed": "normlab.lab.studies.speed",
    "inference": "normlab.lab.studies.inference",
    "online": "normlab.lab.studies.online",
    "rnn": "normlab.lab.studies.rnn",
}


@dataclass
class Summary:
    """A study's result as a table plus notes, built from its files.

    Attributes:
        title: heading for the report.
        columns: column names of ``rows``.
        rows: the table, one list of cells per row (numbers or strings).
        notes: sentences for the report (what was measured, on what, the seeds, caveats).
        data: anything else worth keeping in the report's raw JSON.
    """

    title: str
    columns: list[str]
    rows: list[list]
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def to_markdown(self) -> str:
        def cell(v) -> str:
            return f"{v:.2f}" if isinstance(v, float) else str(v)

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_text(self) -> str:
        cells = [[str(c) for c in self.columns]] + [
            [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in self.rows
        ]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)


@dataclass(frozen=True)
class Study:
    """What a study module exposes as ``STUDY``: its name, its three functions and a one-line description."""

    name: str
    run: Callable
    summarize: Callable[..., Summary]
    plot: Callable
    description: str


def list_studies() -> list[str]:
    return list(STUDIES)


def get_study(name: str):
    """The ``STUDY`` object of the study called ``name``; an unknown name lists the valid ones."""
    if name not in STUDIES:
        raise unknown_name_error("study", name, STUDIES)
    return importlib.import_module(STUDIES[name]).STUDY


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: unchanged); the caller's count is restored."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
