"""The seam for what runs around each step and each transition: metrics, logging context,
tracing, rate limits plug in here, never into the executor's body.

A hook is any object with some of these methods (all optional):

- ``around_step(claim, call)``: wrap the user's step function; must call ``call()`` once
  and return what it returns (middleware, in the manner of procrastinate's
  ``middleware.py``: the first hook added is the outermost);
- ``on_event(name, claim)``: a transition or a decision was made: ``"committed"``,
  ``"run_ahead"``, ``"stale"``, ``"lease_lost"``, ``"released"``, ``"early"``,
  ``"bad_message"``, ``"step_errors"``, ``"commit_failed"``, ``"abandoned"``
  (``claim`` is None when there is none).

Hooks run in the worker process, on the step's thread; an exception a hook raises in
``on_event`` is logged and swallowed (a metric must never fail a step).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from durable_celery import errors
from durable_celery.storage.records import Claim

log = logging.getLogger("durable_celery.runtime")


class Counters:
    """Per-process tallies of every event (``durable.stats()``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def on_event(self, name: str, claim: Claim | None) -> None:
        self.counts[name] += 1


class Hooks:
    """The hooks of one Durable, in the order they were added."""

    def __init__(self, *hooks: Any) -> None:
        self._hooks: list[Any] = list(hooks)
        self._around: list[Any] = []
        self._listeners: list[Any] = []
        self._index()

    def add(self, hook: Any) -> None:
        if not (hasattr(hook, "around_step") or hasattr(hook, "on_event")):
            raise errors.InvalidArgument(
                f"a hook has around_step(claim, call) and/or on_event(name, claim); got "
                f"{hook!r}"[:300])
        self._hooks.append(hook)
        self._index()

    def _index(self) -> None:
        self._around = [h.around_step for h in self._hooks if hasattr(h, "around_step")]
        self._listeners = [h.on_event for h in self._hooks if hasattr(h, "on_event")]

    def event(self, name: str, claim: Claim | None = None) -> None:
        for listener in self._listeners:
            try:
                listener(name, claim)
            except Exception:
                log.warning("a hook failed on %r; ignored", name, exc_info=True)

    def run_step(self, claim: Claim, call: Callable[[], Any]) -> Any:
        """``call()`` inside every ``around_step``, the first hook outermost."""
        for around in reversed(self._around):
            call = partial(around, claim, call)
        return call()
