"""Cron planning: next occurrences in IANA zones (DST gaps and overlaps), catch-up modes."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from durable_celery import InvalidArgument, InvalidSchedule
from durable_celery.coordinator import cron
from durable_celery.storage.schedules import run_id

UTC = timezone.utc
NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(zone: ZoneInfo, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=zone, fold=fold)


def occurrences(expr: str, zone: ZoneInfo, start: datetime, n: int) -> list[datetime]:
    found, at = [], start
    for _ in range(n):
        at = cron.next_after(expr, zone, at)
        found.append(at)
    return found


# ----------------------------------------------------------------------------- next occurrence


def test_next_is_strictly_after_and_in_utc() -> None:
    at = cron.next_after("0 9 * * *", ZoneInfo("UTC"), utc(2026, 1, 1, 9, 0))
    assert at == utc(2026, 1, 2, 9, 0)
    assert at.tzinfo is UTC


def test_a_local_time_is_kept_across_dst_in_new_york() -> None:
    # 09:00 New York is 14:00 UTC in winter and 13:00 UTC in summer.
    found = occurrences("0 9 * * *", NY, utc(2026, 3, 6, 20, 0), 3)
    assert found == [utc(2026, 3, 7, 14, 0), utc(2026, 3, 8, 13, 0), utc(2026, 3, 9, 13, 0)]
    assert [f.astimezone(NY).hour for f in found] == [9, 9, 9]


def test_spring_forward_gap_fires_once_at_the_end_of_the_gap_new_york() -> None:
    # 2026-03-08 02:30 does not exist in New York (02:00 -> 03:00).
    found = occurrences("30 2 * * *", NY, local(NY, 2026, 3, 7, 12, 0), 3)
    assert found[0] == utc(2026, 3, 8, 7, 0)  # 03:00 EDT
    assert [f.astimezone(NY).replace(tzinfo=None) for f in found] == [
        datetime(2026, 3, 8, 3, 0), datetime(2026, 3, 9, 2, 30), datetime(2026, 3, 10, 2, 30)]


def test_spring_forward_gap_berlin() -> None:
    # 2026-03-29 02:30 does not exist in Berlin (02:00 -> 03:00).
    found = occurrences("30 2 * * *", BERLIN, local(BERLIN, 2026, 3, 28, 12, 0), 2)
    assert found == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]


def test_fall_back_overlap_fires_a_fixed_time_once_new_york() -> None:
    # 2026-11-01 01:30 happens twice in New York; a daily job runs once (the first pass).
    found = occurrences("30 1 * * *", NY, local(NY, 2026, 10, 31, 12, 0), 2)
    assert found == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_fall_back_overlap_fixed_time_berlin() -> None:
    # 2026-10-25 02:30 happens twice in Berlin.
    found = occurrences("30 2 * * *", BERLIN, local(BERLIN, 2026, 10, 24, 12, 0), 2)
    assert found == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_fall_back_overlap_interval_schedule_follows_elapsed_time() -> None:
    # Every 30 minutes: both passes of the repeated hour fire, 30 real minutes apart.
    found = occurrences("*/30 * * * *", NY, utc(2026, 11, 1, 4, 50), 5)
    assert found == [utc(2026, 11, 1, 5, 0), utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 0),
                     utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 7, 0)]
    gaps = {b - a for a, b in itertools.pairwise(found)}
    assert gaps == {timedelta(minutes=30)}


def test_six_fields_are_seconds() -> None:
    found = occurrences("*/5 * * * * *", ZoneInfo("UTC"), utc(2026, 1, 1, 0, 0, 1), 3)
    assert found == [utc(2026, 1, 1, 0, 0, 5), utc(2026, 1, 1, 0, 0, 10),
                     utc(2026, 1, 1, 0, 0, 15)]


def test_latest_until_includes_now() -> None:
    zone = ZoneInfo("UTC")
    assert cron.latest_until("0 * * * *", zone, utc(2026, 1, 1, 10, 0)) == utc(2026, 1, 1, 10, 0)
    assert cron.latest_until("0 * * * *", zone, utc(2026, 1, 1, 10, 59, 59, 999)) == \
        utc(2026, 1, 1, 10, 0)


def test_latest_until_agrees_with_next_after_across_dst() -> None:
    assert cron.latest_until("0 9 * * *", BERLIN, utc(2026, 6, 1, 8)) == utc(2026, 6, 1, 7)
    # The gap day's 02:30 New York fired at 03:00 EDT; the overlap day's 01:30 on the first pass.
    assert cron.latest_until("30 2 * * *", NY, utc(2026, 3, 8, 12)) == utc(2026, 3, 8, 7)
    assert cron.latest_until("30 1 * * *", NY, utc(2026, 11, 1, 12)) == utc(2026, 11, 1, 5, 30)
    p = cron.plan("30 2 * * *", NY, utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 12), "latest")
    assert list(p.fire) == [utc(2026, 3, 8, 7)] and p.next_fire_at == utc(2026, 3, 9, 6, 30)


# ----------------------------------------------------------------------------- catch-up


HOURLY = "0 * * * *"
Z = ZoneInfo("UTC")


def test_not_due_fires_nothing() -> None:
    p = cron.plan(HOURLY, Z, utc(2026, 1, 1, 11), utc(2026, 1, 1, 10, 30), "latest")
    assert p.fire == () and p.next_fire_at == utc(2026, 1, 1, 11)


@pytest.mark.parametrize("mode", ["latest", "all", "none"])
def test_on_time_every_mode_fires_the_occurrence(mode: str) -> None:
    p = cron.plan(HOURLY, Z, utc(2026, 1, 1, 10), utc(2026, 1, 1, 10, 0, 0, 300), mode)
    assert list(p.fire) == [utc(2026, 1, 1, 10)]
    assert p.next_fire_at == utc(2026, 1, 1, 11)


def test_latest_fires_the_most_recent_missed_occurrence_once() -> None:
    # Down from 10:00 to 15:20: five occurrences were missed.
    p = cron.plan(HOURLY, Z, utc(2026, 1, 1, 10), utc(2026, 1, 1, 15, 20), "latest")
    assert list(p.fire) == [utc(2026, 1, 1, 15)]
    assert p.next_fire_at == utc(2026, 1, 1, 16)


def test_all_fires_each_missed_occurrence() -> None:
    p = cron.plan(HOURLY, Z, utc(2026, 1, 1, 10), utc(2026, 1, 1, 15, 20), "all")
    assert list(p.fire) == [utc(2026, 1, 1, h) for h in range(10, 16)]
    assert p.next_fire_at == utc(2026, 1, 1, 16)


def test_all_is_batched_and_continues() -> None:
    p = cron.plan(HOURLY, Z, utc(2026, 1, 1, 0), utc(2026, 1, 2, 0, 30), "all", batch=10)
    assert list(p.fire) == [utc(2026, 1, 1, h) for h in range(10)]
    assert p.next_fire_at == utc(2026, 1, 1, 10)
    rest = cron.plan(HOURLY, Z, p.next_fire_at, utc(2026, 1, 2, 0, 30), "all", batch=100)
    assert list(rest.fire) == [utc(2026, 1, 1, h) for h in range(10, 24)] + [utc(2026, 1, 2)]


def test_none_skips_missed_occurrences() -> None:
    p = cron.plan(HOURLY, Z, utc(2026, 1, 1, 10), utc(2026, 1, 1, 15, 20), "none")
    assert p.fire == ()
    assert p.next_fire_at == utc(2026, 1, 1, 16)


def test_none_fires_a_slightly_late_occurrence() -> None:
    p = cron.plan(HOURLY, Z, utc(2026, 1, 1, 10), utc(2026, 1, 1, 15, 0, 30), "none")
    assert list(p.fire) == [utc(2026, 1, 1, 15)]


def test_catchup_across_a_dst_change() -> None:
    # Daily 09:00 New York, down over the spring-forward weekend: "all" fires each local 09:00.
    p = cron.plan("0 9 * * *", NY, utc(2026, 3, 7, 14), utc(2026, 3, 9, 13, 30), "all")
    assert list(p.fire) == [utc(2026, 3, 7, 14), utc(2026, 3, 8, 13), utc(2026, 3, 9, 13)]


def test_run_ids_name_the_occurrence() -> None:
    assert run_id("nightly", utc(2026, 3, 8, 13)) == "cron:nightly:2026-03-08T13:00:00Z"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("expr", ["", "   ", "* * *", "61 * * * *", "* * * * * * *", "bogus",
                                  "0 25 * * *", "0 0 31 2 *", None, 5, "a\x00b", "*" * 300])
def test_bad_cron_is_a_typed_error(expr: object) -> None:
    with pytest.raises(InvalidSchedule):
        cron.check_cron(expr)


@pytest.mark.parametrize("zone", ["", "Mars/Olympus", "../etc/passwd", None, 3, "UTC\x00"])
def test_bad_timezone_is_a_typed_error(zone: object) -> None:
    with pytest.raises(InvalidSchedule):
        cron.check_zone(zone)


@pytest.mark.parametrize("mode", ["", "LATEST", "some", None, 1])
def test_bad_catchup_is_a_typed_error(mode: object) -> None:
    with pytest.raises(InvalidArgument):
        cron.check_catchup(mode)


def test_cron_is_normalized() -> None:
    assert cron.check_cron("  0   9 * *  * ") == "0 9 * * *"
