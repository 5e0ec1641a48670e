"""Integration fixtures on top of tests/conftest.py (real Postgres, real Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from durable_celery import Durable
from tests.integration.support import Recorder


@pytest.fixture
def published(durable: Durable, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """What ``durable`` publishes to the broker, captured instead of sent."""
    return Recorder().install(durable, monkeypatch)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install one shared Recorder on any number of Durable instances."""
    shared = Recorder()

    def install(*durables: Durable) -> Recorder:
        for d in durables:
            shared.install(d, monkeypatch)
        return shared

    return install
