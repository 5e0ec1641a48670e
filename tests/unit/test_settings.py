"""settings.build: keyword arguments > Celery config > environment > defaults."""

from __future__ import annotations

import dataclasses
import math
from datetime import timedelta
from typing import Any

import pytest

from durable_celery import settings
from durable_celery.errors import ConfigurationError


def build(overrides: dict[str, Any] | None = None, conf: dict[str, Any] | None = None,
          env: dict[str, str] | None = None) -> settings.Settings:
    # env={} by default: these tests never read the real process environment.
    return settings.build(overrides or {}, celery_conf=conf, env=env or {})


def test_defaults() -> None:
    s = build()
    assert s == settings.Settings()
    assert s.database_url is None
    assert s.heartbeat_interval == 5.0
    assert s.stale_after == 30.0
    assert s.retention == timedelta(days=7)
    assert s.auto_migrate is True


@pytest.mark.parametrize("overrides, conf, env, expected", [
    ({"heartbeat_interval": 1.0}, {"durable_heartbeat_interval": 2.0},
     {"DURABLE_CELERY_HEARTBEAT_INTERVAL": "3"}, 1.0),
    ({}, {"durable_heartbeat_interval": 2.0}, {"DURABLE_CELERY_HEARTBEAT_INTERVAL": "3"}, 2.0),
    ({}, {}, {"DURABLE_CELERY_HEARTBEAT_INTERVAL": "3"}, 3.0),
    ({}, None, {"DURABLE_CELERY_HEARTBEAT_INTERVAL": "3"}, 3.0),
    ({}, {}, {}, 5.0),
])
def test_precedence(overrides: dict[str, Any], conf: dict[str, Any] | None,
                    env: dict[str, str], expected: float) -> None:
    assert build(overrides, conf, env).heartbeat_interval == expected


def test_none_means_not_given_at_every_level() -> None:
    s = build({"database_url": None}, {"durable_database_url": None},
              {"DURABLE_CELERY_DATABASE_URL": "postgresql://env/db"})
    assert s.database_url == "postgresql://env/db"
    assert build({}, {}, {"DURABLE_CELERY_DATABASE_URL": ""}).database_url is None


def test_false_keyword_beats_true_config() -> None:
    s = build({"auto_migrate": False}, {"durable_auto_migrate": True},
              {"DURABLE_CELERY_AUTO_MIGRATE": "true"})
    assert s.auto_migrate is False


def test_each_setting_is_read_from_its_own_names() -> None:
    conf = {"durable_pool_size": 9, "durable_database_url": "postgresql://conf/db"}
    env = {"DURABLE_CELERY_POOL_SIZE": "3", "DURABLE_CELERY_GC_BATCH_SIZE": "77"}
    s = build({}, conf, env)
    assert (s.pool_size, s.gc_batch_size, s.database_url) == (9, 77, "postgresql://conf/db")


def test_celery_conf_is_any_mapping() -> None:
    class Conf(dict[str, Any]):
        pass

    assert build({}, Conf(durable_sweep_interval=0.25)).sweep_interval == 0.25


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_env_booleans(text: str, expected: bool) -> None:
    assert build(env={"DURABLE_CELERY_RUN_AHEAD": text}).run_ahead is expected


def test_env_values_are_coerced_to_the_field_types() -> None:
    s = build(env={
        "DURABLE_CELERY_STALE_AFTER": "45.5",
        "DURABLE_CELERY_MAX_PAYLOAD_BYTES": "2048",
        "DURABLE_CELERY_RETENTION": "3600",
        "DURABLE_CELERY_DATABASE_URL": "postgresql://h/db",
    })
    assert s.stale_after == 45.5
    assert s.max_payload_bytes == 2048 and isinstance(s.max_payload_bytes, int)
    assert s.retention == timedelta(hours=1)
    assert s.database_url == "postgresql://h/db"


def test_retention_accepts_a_timedelta() -> None:
    assert build({"retention": timedelta(days=1)}).retention == timedelta(days=1)


def test_settings_are_frozen() -> None:
    s = build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.heartbeat_interval = 1.0  # type: ignore[misc]


# ----------------------------------------------------------------------------- bad values


def test_unknown_settings_are_rejected_and_named() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting\\(s\\): heartbeat, stale"):
        build({"stale": 1, "heartbeat": 2})


@pytest.mark.parametrize("overrides, env, problem", [
    ({"heartbeat_interval": "fast"}, {}, "setting heartbeat_interval has a bad value 'fast'"),
    ({}, {"DURABLE_CELERY_HEARTBEAT_INTERVAL": "soon"}, "heartbeat_interval has a bad value"),
    ({}, {"DURABLE_CELERY_POOL_SIZE": "2.5"}, "setting pool_size has a bad value '2.5'"),
    ({}, {"DURABLE_CELERY_AUTO_MIGRATE": "maybe"}, "auto_migrate has a bad value 'maybe'"),
    ({"retention": "a week"}, {}, "retention has a bad value"),
    ({"gc_batch_size": [1]}, {}, "gc_batch_size has a bad value"),
])
def test_unparseable_values_are_rejected(overrides: dict[str, Any], env: dict[str, str],
                                         problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        build(overrides, env=env)


@pytest.mark.parametrize("name", ["heartbeat_interval", "sweep_interval", "redispatch_after",
                                  "redispatch_max_backoff", "stale_after"])
@pytest.mark.parametrize("value", [0, -1, math.nan])
def test_intervals_must_be_positive(name: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=f"{name} must be > 0"):
        build({name: value})


@pytest.mark.parametrize("name", ["gc_batch_size", "sweep_batch_size", "max_recoveries",
                                  "max_payload_bytes", "run_ahead_limit", "pool_size"])
def test_counts_must_be_at_least_one(name: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{name} must be >= 1, got 0"):
        build({name: 0})


@pytest.mark.parametrize("retention", [0, -5, timedelta(0)])
def test_retention_must_be_positive(retention: Any) -> None:
    with pytest.raises(ConfigurationError, match="retention must be positive"):
        build({"retention": retention})


@pytest.mark.parametrize("stale_after", [9.9, 5.0, 4.0])
def test_stale_after_must_exceed_the_heartbeat(stale_after: float) -> None:
    with pytest.raises(ConfigurationError,
                       match=r"stale_after .* must be at least twice heartbeat_interval .*reaped"):
        build({"heartbeat_interval": 5.0, "stale_after": stale_after})


def test_stale_after_check_applies_across_sources() -> None:
    # The heartbeat comes from the env, stale_after from the Celery config.
    with pytest.raises(ConfigurationError, match="must be at least twice heartbeat_interval"):
        build({}, {"durable_stale_after": 10}, {"DURABLE_CELERY_HEARTBEAT_INTERVAL": "20"})
    assert build({}, {"durable_stale_after": 10},
                 {"DURABLE_CELERY_HEARTBEAT_INTERVAL": "5"}).stale_after == 10.0


def test_bad_values_raise_configuration_errors_with_the_cause() -> None:
    with pytest.raises(ConfigurationError) as info:
        build(env={"DURABLE_CELERY_SWEEP_INTERVAL": "x"})
    assert isinstance(info.value.__cause__, ValueError)
