"""Settings: keyword arguments, else Celery config ``durable_<name>``, else env
``DURABLE_CELERY_<NAME>``, else the default. Frozen once built."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

from durable_celery import errors
from durable_celery.checks import KEY_REUSE
from durable_celery.checks import MAX_SECONDS as MAX_DURATION

MAX_COUNT = 2**31 - 1
MAX_TIMER_LEAD = 5.0  # seconds a due timer's message may be published ahead (with an eta)
# What a finished run does to its business key (see docs/guide.md, "Business keys").


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    database_url: str | None = None
    heartbeat_interval: float = 5.0
    stale_after: float = 30.0
    sweep_interval: float = 1.0
    redispatch_after: float = 60.0
    redispatch_max_backoff: float = 3600.0
    timer_lead: float = 0.05
    retention: timedelta = field(default_factory=lambda: timedelta(days=7))
    gc_batch_size: int = 1000
    sweep_batch_size: int = 500
    max_recoveries: int = 10
    max_payload_bytes: int = 1_000_000
    auto_migrate: bool = True
    run_ahead: bool = True
    run_ahead_limit: int = 100
    coordinator: bool = True
    pool_size: int = 4
    key_reuse: str = "reject"
    early_signal_ttl: float = 600.0

    def __post_init__(self) -> None:
        positive = ("heartbeat_interval", "stale_after", "sweep_interval", "redispatch_after",
                    "redispatch_max_backoff")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, float) and math.isfinite(value)
                    and 0 < value <= MAX_DURATION):
                raise errors.ConfigurationError(
                    f"{name} must be > 0 and at most {MAX_DURATION:.0f} seconds, got {value!r}")
        if not (isinstance(self.timer_lead, float) and 0 <= self.timer_lead <= MAX_TIMER_LEAD):
            raise errors.ConfigurationError(
                f"timer_lead must be between 0 and {MAX_TIMER_LEAD:.0f} seconds, "
                f"got {self.timer_lead!r}")
        if self.timer_lead >= self.redispatch_after:
            raise errors.ConfigurationError(
                f"timer_lead ({self.timer_lead}) must be less than redispatch_after "
                f"({self.redispatch_after}), or a timer would be published twice")
        if self.key_reuse not in KEY_REUSE:
            raise errors.ConfigurationError(
                f"key_reuse must be one of {list(KEY_REUSE)}, got {self.key_reuse!r}"[:300])
        if not (isinstance(self.early_signal_ttl, float) and math.isfinite(self.early_signal_ttl)
                and 0 <= self.early_signal_ttl <= MAX_DURATION):
            raise errors.ConfigurationError(
                f"early_signal_ttl must be between 0 and {MAX_DURATION:.0f} seconds, "
                f"got {self.early_signal_ttl!r}")
        if self.stale_after < 2 * self.heartbeat_interval:
            raise errors.ConfigurationError(
                f"stale_after ({self.stale_after}) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}), or live workers would be reaped after one late beat"
            )
        for name in ("gc_batch_size", "sweep_batch_size", "max_recoveries", "max_payload_bytes",
                     "run_ahead_limit", "pool_size"):
            if not 1 <= getattr(self, name) <= MAX_COUNT:
                raise errors.ConfigurationError(
                    f"{name} must be >= 1, got {getattr(self, name)!r} (and at most {MAX_COUNT})")
        if not 0 < self.retention.total_seconds() <= MAX_DURATION:
            raise errors.ConfigurationError(
                f"retention must be positive and at most {MAX_DURATION:.0f} seconds")


_BOOL = {"1": True, "true": True, "yes": True, "on": True,
         "0": False, "false": False, "no": False, "off": False}


def _coerce(name: str, kind: Any, value: Any) -> Any:
    try:
        if kind in ("float", float):
            return float(value)
        if kind in ("int", int):
            return int(value)
        if kind in ("bool", bool):
            if isinstance(value, bool):
                return value
            return _BOOL[str(value).strip().lower()]
        if kind in ("timedelta", timedelta):
            return value if isinstance(value, timedelta) else timedelta(seconds=float(value))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise errors.ConfigurationError(f"setting {name} has a bad value {value!r}"[:300]) from exc
    return value if value is None else str(value)


def build(overrides: Mapping[str, Any], celery_conf: Mapping[str, Any] | None = None,
          env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from keyword overrides, the Celery config and the environment."""
    env = os.environ if env is None else env
    known = {f.name: f.type for f in fields(Settings)}
    unknown = set(overrides) - set(known)
    if unknown:
        raise errors.ConfigurationError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if celery_conf is not None:
        stray = sorted(k for k in list(celery_conf)
                       if str(k).startswith("durable_") and str(k)[8:] not in known)
        if stray:
            raise errors.ConfigurationError(f"unknown Celery setting(s): {', '.join(stray)}")
    values: dict[str, Any] = {}
    for name, kind in known.items():
        kind = str(kind).split("|")[0].strip()
        if overrides.get(name) is not None:
            raw: Any = overrides[name]
        elif celery_conf is not None and celery_conf.get(f"durable_{name}") is not None:
            raw = celery_conf.get(f"durable_{name}")
        elif env.get(f"DURABLE_CELERY_{name.upper()}"):
            raw = env[f"DURABLE_CELERY_{name.upper()}"]
        else:
            continue
        values[name] = _coerce(name, kind, raw)
    return Settings(**values)
