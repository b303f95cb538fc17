"""The report every surgery tool returns next to the model: what changed, what was skipped and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["Change", "Skip", "SurgeryReport"]


@dataclass(frozen=True)
class Change:
    """One module changed: its qualified name, what it was, what it is now, and a short note."""

    name: str
    before: str
    after: str
    note: str = ""


@dataclass(frozen=True)
class Skip:
    """One candidate module left as it was, and why."""

    name: str
    reason: str


@dataclass
class SurgeryReport:
    """What a surgery tool did to a model.

    Attributes:
        tool: the tool's name, e.g. "swap_norm".
        changed: every module changed, in model order.
        skipped: every candidate module not changed, with the reason.
        notes: anything else the user should know (one sentence each).
    """

    tool: str
    changed: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def change(self, name: str, before, after, note: str = "") -> None:
        self.changed.append(Change(name or "(root)", _describe(before), _describe(after), note))

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(Skip(name or "(root)", reason))

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.tool}: {len(self.changed)} changed, {len(self.skipped)} skipped"]
        lines += [
            f"  changed {c.name}: {c.before} -> {c.after}" + (f" ({c.note})" if c.note else "") for c in self.changed
        ]
        lines += [f"  skipped {s.name}: {s.reason}" for s in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _describe(obj) -> str:
    if isinstance(obj, str):
        return obj
    text = repr(obj)
    return text if len(text) <= 120 else text[:117] + "..."
