"""Whether this process can use its database yet, and how long to wait after a failure.

A worker that starts while Postgres is down, or whose schema is not migrated, must neither
spin nor flood its log: each failure sets a backoff (1, 2, 4 ... 30 s), and is logged as one
line without a traceback, naming what to do, when the reason changes and then at most once
per backoff. The background loops (coordinator, step tasks) respect the backoff
(``ensure(wait=False)`` raises :class:`~durable_celery.errors.NotReady` meanwhile); calls
made by users (start, signal, controls) always try at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from durable_celery import errors, forksafe

log = logging.getLogger("durable_celery")

BACKOFF_MAX = 30.0


def describe(exc: BaseException) -> str:
    """What went wrong, in one line, with what to do about it."""
    if isinstance(exc, errors.NotReady):
        return str(exc.details.get("reason") or exc.message)
    if isinstance(exc, errors.StorageError):
        if exc.details.get("sqlstate", "") in (None, "") or exc.transient:
            return f"the database does not answer ({exc.message})"
        return f"the database refused a statement ({exc.message})"
    if isinstance(exc, errors.DurableCeleryError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


class Readiness:
    """Per process (a forked child starts afresh). ``check`` migrates or verifies the schema."""

    def __init__(self, check: Callable[[], Any]) -> None:
        self._check = check
        self._pid = 0              # the process this state belongs to
        self._ready = False
        self._reason: str | None = None
        self._failures = 0
        self._next_try = 0.0
        self._next_log = 0.0
        self._last: BaseException | None = None  # the failure recorded last
        self._lock = forksafe.Lock()

    def _here(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._pid, self._ready, self._reason = os.getpid(), False, None
                    self._failures, self._next_try, self._next_log = 0, 0.0, 0.0

    @property
    def ready(self) -> bool:
        self._here()
        return self._ready and self._reason is None

    def state(self) -> dict[str, Any]:
        """``{"ready", "reason", "retry_in"}`` for reports (``celery inspect``)."""
        self._here()
        retry_in = max(self._next_try - time.monotonic(), 0.0) if self._reason else None
        return {"ready": self.ready, "reason": self._reason, "retry_in": retry_in}

    def ensure(self, *, wait: bool = True) -> None:
        """Return when the database can be used; raise otherwise (the failure, or
        ``NotReady`` while a backoff runs and ``wait`` is false)."""
        self._here()
        if self._ready and self._reason is None:
            return
        if not wait and self._reason is not None:
            left = self._next_try - time.monotonic()
            if left > 0:
                raise errors.NotReady(f"durable_celery is not ready: {self._reason}",
                                      reason=self._reason, retry_in=left)
        try:
            self._check()
        except errors.DurableCeleryError as exc:
            self.failed(exc)
            raise
        self.succeeded()

    def succeeded(self) -> None:
        self._here()
        with self._lock:
            was, self._reason = self._reason, None
            self._ready, self._failures = True, 0
        if was is not None:
            log.warning("durable_celery is ready again (it was not: %s)", was)

    def failed(self, exc: BaseException) -> float:
        """Record that the database could not be used; returns the seconds to wait."""
        self._here()
        reason = describe(exc)
        now = time.monotonic()
        with self._lock:
            if exc is self._last:  # recorded already (raised on through a caller)
                return max(self._next_try - now, 0.0)
            self._last = exc
            self._failures += 1
            backoff = min(2.0 ** (self._failures - 1), BACKOFF_MAX)
            self._next_try = now + backoff
            changed, self._reason = reason != self._reason, reason
            speak = changed or now >= self._next_log
            if speak:
                self._next_log = now + backoff
        if speak:
            log.warning("durable_celery is not ready: %s; trying again in %.0fs", reason,
                        backoff)
        return backoff
