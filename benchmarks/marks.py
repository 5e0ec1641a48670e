"""Timestamps the workers record for the client (Redis lists), one client per process."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

_clients: dict[tuple[int, str], Any] = {}


def client(url: str) -> redis.Redis:
    key = (os.getpid(), url)
    found = _clients.get(key)
    if found is None:
        found = _clients[key] = redis.Redis.from_url(url)
    return found


def mark(url: str, key: str, value: Any = None) -> None:
    """Append ``value`` (default: now, epoch seconds) to the list ``key``."""
    client(url).rpush(key, repr(time.time()) if value is None else str(value))


def ready_key(prefix: str, label: str) -> str:
    return f"{prefix}:ready:{label}"
