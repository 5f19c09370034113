"""What the workshop stack test keeps: its figures and screenshots, and each scenario's findings.

Figures are printed at the end of the run and written, with the screenshots the test takes, to
out/stack-test/ (FIGURES_DIR; out/ is not committed). docs/workshop/ holds a copy from the run
the README quotes.

A scenario (leaky mode under load, the out-of-memory restart, ...) runs once, in a fixture, and
records what it found step by step. It never raises: an exception ends it and is recorded, and
each test then asserts on the findings it needs. A finding the scenario did not reach fails that
test, with the scenario's error as the reason, and no other test errors because of it.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES_DIR = ROOT / "out" / "stack-test"


@dataclass
class Figures:
    """What the run measured, one line each, printed and written at the end (see `write`)."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def write(self) -> Path:
        path = figure_path("figures.txt")
        path.write_text("\n".join(self.lines) + "\n")
        return path


def figure_path(name: str) -> Path:
    """Where the file `name` of this run's figures goes (a screenshot, say)."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    return FIGURES_DIR / name


@dataclass
class Scenario:
    """The findings of one scenario, by name, and the error that ended it early, if one did."""

    name: str
    found: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.found:
            reason = self.error or "the scenario did not measure it"
            pytest.fail(f"{self.name}: no {key!r}: {reason}", pytrace=False)
        return self.found[key]


def run_scenario(name: str, steps: Callable[[dict[str, Any]], None]) -> Scenario:
    """Runs `steps(found)`, which stores its findings in `found` as it goes; keeps what it found
    before an exception, and the exception."""
    scenario = Scenario(name)
    try:
        steps(scenario.found)
    except Exception as error:  # an assertion in a step, a command that failed, a timeout
        where = "".join(traceback.format_exception(error)[-3:]).strip()
        scenario.error = f"{type(error).__name__}: {error}\n{where}"
    return scenario
