"""Chaos fixtures: a :class:`~tests.chaos.harness.Scenario` factory with private servers.

Each scenario's one-line accounting is printed in the terminal summary (and kept in the
JUnit properties and a JSON summary, see ``harness.write_summary``), so CI logs show the
figures without ``-s``. When a scenario fails, the tails of its worker logs are attached.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import Scenario, log_tail

RUNS = int(os.environ.get("CHAOS_RUNS", "300"))
REPORT: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        logs: list[Path] = getattr(item, "_chaos_logs", [])
        for path in logs[-4:]:
            report.sections.append((f"chaos log tail: {path.name}", log_tail(path, 6000)))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.section("chaos accounting")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Scenario]]:
    made: list[Scenario] = []

    def factory(name: str, **options: Any) -> Scenario:
        scenario = Scenario(name, tmp_path, runs=RUNS, **options)
        made.append(scenario)
        request.node._chaos_logs = scenario.logs
        return scenario

    yield factory
    for scenario in made:
        scenario.close()
