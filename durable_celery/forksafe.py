"""A lock that a forked child never inherits locked.

Celery's prefork pool forks children from a process whose threads (the coordinator, the
heartbeat) may hold a lock at that moment; the child has no such thread, so a plain
``threading.Lock`` copied in the locked state would never be released and the child's
first use would wait for ever. This lock is one ``threading.Lock`` per process id: a child
gets a fresh one. Hold it only around work in memory, never around I/O.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType


class Lock:
    """``with lock:``, like ``threading.Lock``; per process, so safe across ``fork()``."""

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        self._locks: dict[int, threading.Lock] = {}

    def _current(self) -> threading.Lock:
        pid = os.getpid()
        lock = self._locks.get(pid)
        if lock is None:
            # setdefault is atomic: two threads of a new child agree on one lock.
            lock = self._locks.setdefault(pid, threading.Lock())
        return lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._current().acquire(blocking, timeout)

    def release(self) -> None:
        self._current().release()

    def __enter__(self) -> bool:
        return self._current().acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._current().release()
