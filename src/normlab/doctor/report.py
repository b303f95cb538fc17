"""The doctor's report: per-layer evidence, findings ranked most urgent first, JSON and a readable table."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field

__all__ = ["SEVERITIES", "Finding", "LayerSummary", "Report"]

# Most urgent first. "severe": eval-mode results are (or will be) clearly wrong; "warning": likely degraded.
SEVERITIES = ("severe", "warning")


@dataclass(frozen=True)
class Finding:
    """One hazard found in one place.

    Attributes:
        hazard: the hazard's id, e.g. "small_batch_stats" (see :mod:`normlab.doctor.hazards`).
        layer: qualified module name, or "(data)" / "(model)" for hazards of the data or the whole model.
        severity: "severe" or "warning".
        evidence: the numbers behind the finding (JSON-ready: numbers, strings, lists of them).
        fixes: what to do, best first; each an exact call (``normlab.recalibrate_bn(model, data)``) where one exists.
        message: one sentence saying what is wrong and why it matters.
    """

    hazard: str
    layer: str
    severity: str
    evidence: dict
    fixes: tuple[str, ...]
    message: str

    @property
    def fix(self) -> str:
        """The recommended (first-ranked) fix."""
        return self.fixes[0]


@dataclass(frozen=True)
class LayerSummary:
    """What the doctor measured at one batch norm, whether or not it found a hazard there.

    Attributes:
        name: qualified module name.
        kind: class name, e.g. "BatchNorm2d".
        num_features: channels.
        momentum: the module's momentum (PyTorch convention; None = cumulative average), None if it has none.
        trained: whether the doctor treated it as a training batch norm (False for frozen ones and for batch norms
            left in eval mode inside a model in training mode).
        values_per_channel: median values per channel (batch x spatial positions; x ranks when synchronized) of
            its training-mode calls.
        calls_per_forward: most calls in one forward pass.
        train_eval_gap: relative difference between normalizing its training-mode inputs with their batch
            statistics (train mode) and with the running statistics (eval mode).
        ema_precise_gap: relative difference between normalizing the same inputs with the running (EMA) statistics
            and with recalibrated (precise) statistics; None when those could not be computed.
    """

    name: str
    kind: str
    num_features: int
    momentum: float | None
    trained: bool
    values_per_channel: int | None = None
    calls_per_forward: int = 0
    train_eval_gap: float | None = None
    ema_precise_gap: float | None = None


@dataclass
class Report:
    """What :func:`normlab.doctor.diagnose` found.

    Attributes:
        model: the model's class name.
        layers: one summary per batch norm, in model order.
        findings: every finding, most urgent first (severity, then the hazard's rank, then model order).
        num_batches: batches the data passes used.
        batch_sizes: their sizes.
        output_rel_diff: relative difference of the model outputs with batch norms in training vs eval mode on the
            same inputs (None without data or batch norms).
        notes: anything else worth knowing (one sentence each).
    """

    model: str
    layers: list[LayerSummary] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    num_batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    output_rel_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    @property
    def hazards(self) -> set[str]:
        """The ids of the hazards found."""
        return {f.hazard for f in self.findings}

    def for_layer(self, name: str) -> list[Finding]:
        """The findings at one layer (or "(data)" / "(model)")."""
        return [f for f in self.findings if f.layer == name]

    def ranked_fixes(self) -> list[str]:
        """The recommended fix of each finding, most urgent first, each listed once."""
        return list(dict.fromkeys(f.fix for f in self.findings))

    def to_dict(self) -> dict:
        """A JSON-ready dict (non-finite numbers become the strings "nan", "inf", "-inf")."""
        data = asdict(self)
        data["clean"] = self.clean
        data["ranked_fixes"] = self.ranked_fixes()
        return _finite(data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def render(self, *, use_rich: bool | None = None, width: int = 120) -> str:
        """The report as readable tables: drawn with rich when it is installed (or ``use_rich=True``), plain
        text otherwise (or ``use_rich=False``)."""
        if use_rich is None:
            try:
                import rich  # noqa: F401
            except ImportError:
                use_rich = False
            else:
                use_rich = True
        return _render_rich(self, width) if use_rich else _render_plain(self)

    def __str__(self) -> str:
        return self.render(use_rich=False)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _evidence_text(evidence: dict) -> str:
    return ", ".join(f"{k}={_num(v)}" for k, v in evidence.items())


def _headline(report: Report) -> list[str]:
    sizes = sorted(set(report.batch_sizes))
    size_text = "" if not sizes else f" (sizes {sizes[0]}..{sizes[-1]})" if len(sizes) > 1 else f" (size {sizes[0]})"
    lines = [
        f"normlab doctor: {report.model}, {len(report.layers)} batch norm layer(s), "
        f"{report.num_batches} batch(es){size_text}"
    ]
    if report.output_rel_diff is not None:
        lines.append(f"train/eval output relative difference: {_num(report.output_rel_diff)}")
    if report.clean:
        lines.append("No hazards found.")
    return lines


_LAYER_COLUMNS = (
    "layer",
    "type",
    "C",
    "momentum",
    "values/ch",
    "calls",
    "train/eval gap",
    "EMA/precise gap",
    "hazards",
)
_FINDING_COLUMNS = ("#", "severity", "hazard", "layer", "evidence", "fix")


def _layer_rows(report: Report) -> list[tuple[str, ...]]:
    rows = []
    for s in report.layers:
        hazards = ", ".join(f.hazard for f in report.for_layer(s.name)) or "-"
        kind = s.kind if s.trained else f"{s.kind} (frozen)"
        rows.append(
            (
                s.name,
                kind,
                str(s.num_features),
                _num(s.momentum),
                _num(s.values_per_channel),
                str(s.calls_per_forward),
                _num(s.train_eval_gap),
                _num(s.ema_precise_gap),
                hazards,
            )
        )
    return rows


def _finding_rows(report: Report) -> list[tuple[str, ...]]:
    return [
        (str(i), f.severity, f.hazard, f.layer, _evidence_text(f.evidence), f.fix)
        for i, f in enumerate(report.findings, 1)
    ]


def _plain_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _render_plain(report: Report) -> str:
    lines = _headline(report)
    if report.layers:
        lines += [""] + _plain_table(_LAYER_COLUMNS, _layer_rows(report))
    if report.findings:
        rows = [(*row[:4], row[5]) for row in _finding_rows(report)]
        lines += ["", "Findings, most urgent first:"] + _plain_table(_FINDING_COLUMNS[:4] + ("fix",), rows)
        for i, f in enumerate(report.findings, 1):
            lines += [f"  {i}. {f.message}", f"     evidence: {_evidence_text(f.evidence)}"]
            lines += [f"     alternative: {alt}" for alt in f.fixes[1:]]
    if report.notes:
        lines += ["", "Notes:"] + [f"  - {n}" for n in report.notes]
    return "\n".join(lines)


def _render_rich(report: Report, width: int) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    for line in _headline(report):
        console.print(Text(line))
    if report.layers:
        table = Table(title="Batch norm layers")
        for column in _LAYER_COLUMNS:
            table.add_column(column)
        for row in _layer_rows(report):
            table.add_row(*map(Text, row))
        console.print(table)
    if report.findings:
        table = Table(title="Findings, most urgent first", show_lines=True)
        for column in _FINDING_COLUMNS:
            table.add_column(column, overflow="fold")
        for row, f in zip(_finding_rows(report), report.findings):
            alternatives = "".join(f"\nalternative: {alt}" for alt in f.fixes[1:])
            table.add_row(*map(Text, (*row[:4], f"{row[4]}\n{f.message}", row[5] + alternatives)))
        console.print(table)
    for note in report.notes:
        console.print(Text(f"note: {note}"))
    return buffer.getvalue().rstrip()
