"""The README's promises: its Python examples run, and CI runs exactly its test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_exactly_two_fresh_machine_commands_and_ci_runs_the_second():
    commands = [b.strip() for b in blocks("bash")]
    assert len(commands) == 2
    assert commands[0].endswith("normlab demo")
    # the demo needs Fashion-MNIST on disk and the lab extra (matplotlib, mnist1d, ...): a bare install fails
    assert "apt-get install -y dataset-fashion-mnist" in commands[0] and '-e ".[lab]"' in commands[0]
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] not in "#"]
    assert commands[1] in ci_lines


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs(index):
    exec(compile(blocks("python")[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
