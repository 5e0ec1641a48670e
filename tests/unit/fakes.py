"""Small fakes for pure-logic unit tests."""

from __future__ import annotations

from typing import Any


class FakeDurable:
    """The two attributes a Workflow uses from its Durable: enough for pure-logic tests."""

    def __init__(self, default_queue: str = "default") -> None:
        self.default_queue = default_queue
        self.registered: list[tuple[str, str]] = []
        self._workflows: dict[tuple[str, int], Any] = {}  # filled by tests that spawn

    def _register_step(self, wf: Any, step: Any) -> None:
        self.registered.append((wf.name, step.name))
