"""Small fakes for pure-logic unit tests."""

from __future__ import annotations

from typing import Any

from durable_celery.definitions import Registry


class FakeDurable:
    """A ``WorkflowOwner`` without I/O: a registry and a list of registered steps, enough for
    pure-logic tests (nothing starts or schedules)."""

    def __init__(self, default_queue: str = "default") -> None:
        self.default_queue = default_queue
        self.registry = Registry(lambda: self.default_queue)
        self.registered: list[tuple[str, str]] = []

    def register_step(self, wf: Any, step: Any) -> None:
        self.registered.append((wf.name, step.name))

    def start_run(self, wf: Any, state: Any, **options: Any) -> str:
        raise AssertionError("pure-logic tests start nothing")

    def start_runs(self, wf: Any, states: Any, **options: Any) -> list[str]:
        raise AssertionError("pure-logic tests start nothing")

    def schedule(self, name: str, wf: Any, **options: Any) -> Any:
        raise AssertionError("pure-logic tests schedule nothing")
