"""The argument checks and limits the package shares: names, identifiers, priorities,
versions, durations, key reuse, batches, request keys, signal names.

Each check returns the value it accepts (normalised where that is its job) or raises a typed
error (``InvalidArgument`` unless the caller's layer names another, e.g. the controls'
``InvalidRequest``). Used by the façade, definitions, outcomes, settings, signals, controls,
cron and the drop-in, so one rule is written once. Bottom layer: imports only errors and
payloads. (A limit only one module uses, say a cron expression's length, stays there.)
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from durable_celery import errors, payloads

MAX_ID = 200                 # workflow ids, keys, dedup keys, request keys
MAX_SIGNAL_NAME = 200
MAX_VERSION = 2**31 - 1      # workflow versions (an int column)
MAX_BATCH = 100_000          # runs per start_many call
MAX_LIST = 10_000            # runs per list_workflows call
# The longest timer, delay or timeout we accept (100 years): far beyond any real schedule,
# well inside what Postgres intervals and timestamps hold.
MAX_SECONDS = 100 * 366 * 24 * 3600.0
MAX_PRIORITY = 9
# How a finished run treats its business key (see start(key_reuse=...)).
KEY_REUSE = ("reject", "after_failure", "after_finish")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,99}$")


def check_identifier(value: Any, what: str) -> str:
    """workflow ids, keys, dedup keys: 1-200 characters, not blank, no NUL."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID \
            or not payloads.storable(value):
        raise errors.InvalidArgument(
            f"{what} must be a non-blank string of at most {MAX_ID} characters without NUL or "
            f"lone surrogates; got {value!r}"[:400]
        )
    return value


def check_signal_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_SIGNAL_NAME \
            or not payloads.storable(name):
        raise errors.InvalidArgument(
            f"a signal name must be a non-blank string of at most {MAX_SIGNAL_NAME} characters "
            f"without NUL or lone surrogates; got {name!r}"[:400]
        )
    return name


def check_name(value: Any, what: str) -> str:
    """Workflow, step, queue, schedule names: 1-100 characters of a safe alphabet."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise errors.InvalidArgument(
            f"{what} must be 1-100 characters of letters, digits, '_', '.', ':' or '-', "
            f"starting with a letter or '_'; got {value!r}"
        )
    return value


def check_seconds(value: Any, what: str, error: type[errors.DurableCeleryError] = errors.InvalidArgument,
                  ) -> float:
    """A finite number of seconds in ``[0, MAX_SECONDS]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) \
            or not 0 <= value <= MAX_SECONDS:
        raise error(f"{what} must be a finite number of seconds >= 0 (at most {MAX_SECONDS:.0f}), "
                    f"got {value!r}")
    return float(value)


def check_priority(priority: Any) -> int:
    """None (0) or an int in 0..9; 9 runs first."""
    if priority is None:
        return 0
    if isinstance(priority, bool) or not isinstance(priority, int) \
            or not 0 <= priority <= MAX_PRIORITY:
        raise errors.InvalidArgument(f"priority must be an int in 0..{MAX_PRIORITY} (9 runs "
                                     f"first), got {priority!r}"[:300])
    return priority


def check_version(version: Any) -> int:
    """A workflow version: an int in 1..MAX_VERSION."""
    if isinstance(version, bool) or not isinstance(version, int) \
            or not 1 <= version <= MAX_VERSION:
        raise errors.InvalidArgument(f"version must be an int in 1..{MAX_VERSION}, got {version!r}")
    return version


def check_key_reuse(value: Any, default: str) -> str:
    """A start's key reuse policy: ``value``, else ``default`` (the ``key_reuse`` setting)."""
    if value is None:
        return default
    if value not in KEY_REUSE:
        raise errors.InvalidArgument(
            f"key_reuse must be one of {list(KEY_REUSE)}, got {value!r}"[:300])
    return str(value)


def check_run_ahead(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise errors.InvalidArgument(f"run_ahead must be True, False or None, got {value!r}"[:300])


def check_concurrency(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.InvalidArgument(f"concurrency must be None or an int >= 1, got {value!r}"
                                     [:300])
    return value


def check_limit(limit: Any, high: int = MAX_LIST) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= high:
        raise errors.InvalidArgument(f"limit must be an int in 1..{high}, got {limit!r}")
    return limit


def check_when(delay: Any, at: Any) -> None:
    """``delay=`` (seconds) or ``at=`` (an aware datetime), not both."""
    if delay is not None and at is not None:
        raise errors.InvalidArgument("pass delay= or at=, not both")
    if delay is not None:
        check_seconds(delay, "delay")
    if at is not None and (not isinstance(at, datetime) or at.tzinfo is None):
        raise errors.InvalidArgument("at must be a timezone-aware datetime")


def check_request_key(value: Any) -> str:
    """A control's request key: 1-200 characters after trimming; the trimmed form is the key."""
    if not isinstance(value, str):
        raise errors.InvalidRequest(
            f"request_key must be a string, got {type(value).__name__}", field="request_key")
    key = value.strip()
    if not 1 <= len(key) <= MAX_ID or not payloads.storable(key):
        raise errors.InvalidRequest(
            f"request_key must be 1-{MAX_ID} characters after trimming, without NUL "
            f"or lone surrogates; got {len(key)} characters", field="request_key")
    return key


def batch(values: Any, what: str) -> list[Any]:
    """A list from an iterable argument; a string, bytes or mapping is refused."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise errors.InvalidArgument(f"{what} must be a list (or another iterable) of items, "
                                     f"got {type(values).__name__}")
    return list(values)


def batch_identifiers(values: Any, what: str, count: int) -> list[str | None]:
    """One identifier (or None) per run, unique within the batch."""
    if values is None:
        return [None] * count
    found = batch(values, what)
    if len(found) != count:
        raise errors.InvalidArgument(f"{what} has {len(found)} items for {count} states")
    seen: set[str] = set()
    for value in found:
        if value is None:
            continue
        check_identifier(value, what[:-1])
        if value in seen:
            raise errors.InvalidArgument(f"{what[:-1]} {value!r} appears twice in the batch"[:300])
        seen.add(value)
    return found
