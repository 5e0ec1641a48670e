"""Cron schedules against real Postgres: the sweep with a fake ``now``, racing coordinators,
catch-up, pause/resume/delete, the CLI, and typed errors."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from durable_celery import Done, InvalidArgument, InvalidSchedule, ScheduleNotFound, UnknownWorkflow
from durable_celery.cli import main
from durable_celery.testing import drain
from tests.integration.support import execute_sql, rows, scalar, start_threads

UTC = timezone.utc
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def report(durable):
    wf = durable.workflow("report")

    @wf.step
    def build(ctx):
        return Done({"input": ctx.state})

    return wf


def cron_runs(engine, name="nightly"):
    return [r["id"] for r in rows(engine, "SELECT id FROM {S}.runs WHERE id LIKE :p ORDER BY id",
                                  p=f"cron:{name}:%")]


def place(engine, name, at):
    execute_sql(engine, "UPDATE {S}.schedules SET next_fire_at = :at WHERE name = :n",
                at=at, n=name)


def test_a_due_occurrence_fires_once(durable, published, report, db_engine):
    s = durable.schedule("nightly", report, cron="0 * * * *", state={"k": 1})
    assert s.workflow == "report" and s.catchup == "latest" and not s.paused
    place(db_engine, "nightly", T0)
    sweep = durable.coordinator().cron
    assert sweep.run_once(T0 - timedelta(seconds=1)) == 0
    assert sweep.run_once(T0 + timedelta(seconds=1)) == 1
    assert sweep.run_once(T0 + timedelta(seconds=2)) == 0
    assert cron_runs(db_engine) == ["cron:nightly:2026-06-01T12:00:00Z"]
    assert [m.args for m in published.sent] == [["cron:nightly:2026-06-01T12:00:00Z", 0]]
    [schedule] = durable.list_schedules()
    assert schedule.next_fire_at == T0 + timedelta(hours=1)
    assert schedule.last_fired_at == T0
    drain(durable)
    assert durable.wait_result("cron:nightly:2026-06-01T12:00:00Z", timeout=5) == \
        {"input": {"k": 1}}
    # The run's key is the occurrence too (a signal address).
    assert durable.get_workflow("cron:nightly:2026-06-01T12:00:00Z").key == \
        "cron:nightly:2026-06-01T12:00:00Z"


def test_two_coordinators_racing_never_fire_an_occurrence_twice(make_durable, recorder,
                                                                  db_engine):
    durables = [make_durable(), make_durable()]
    for d in durables:
        wf = d.workflow("report")

        @wf.step
        def build(ctx):
            return Done()

    published = recorder(*durables)
    durables[0].schedule("nightly", "report", cron="* * * * * *", catchup="all")
    place(db_engine, "nightly", T0)
    sweeps = [d.coordinator().cron for d in durables]
    for second in range(1, 21):
        now = T0 + timedelta(seconds=second)
        barrier = threading.Barrier(2)

        def fire(sweep, now=now, barrier=barrier):
            barrier.wait()
            return sweep.run_once(now)

        started = [t.value() for t in start_threads([lambda s=s: fire(s) for s in sweeps])]
        assert sum(started) == (2 if second == 1 else 1), (second, started)
    runs = cron_runs(db_engine)
    assert len(runs) == len(set(runs)) == 21  # 12:00:00 .. 12:00:20, each once
    assert len(published) == 21


def test_the_occurrence_id_makes_firing_idempotent_beyond_the_lock(durable, published,
                                                                   report, db_engine):
    """A sweep that read a stale next_fire_at (e.g. restored) starts nothing twice."""
    durable.schedule("nightly", report, cron="0 * * * *")
    place(db_engine, "nightly", T0)
    sweep = durable.coordinator().cron
    assert sweep.run_once(T0) == 1
    place(db_engine, "nightly", T0)  # as if the advance had been lost
    assert sweep.run_once(T0) == 0
    assert len(cron_runs(db_engine)) == 1


@pytest.mark.parametrize(("mode", "expected"), [
    ("latest", ["15:00"]),
    ("all", ["10:00", "11:00", "12:00", "13:00", "14:00", "15:00"]),
    ("none", []),
])
def test_catchup_after_downtime(durable, published, report, db_engine, mode, expected):
    durable.schedule("nightly", report, cron="0 * * * *", catchup=mode)
    place(db_engine, "nightly", datetime(2026, 6, 1, 10, tzinfo=UTC))
    now = datetime(2026, 6, 1, 15, 20, tzinfo=UTC)
    durable.coordinator().cron.run_once(now)
    assert [r.split("T")[1][:5] for r in cron_runs(db_engine)] == expected
    [schedule] = durable.list_schedules()
    assert schedule.next_fire_at == datetime(2026, 6, 1, 16, tzinfo=UTC)


def test_paused_schedules_fire_nothing_and_resume_skips_the_missed(durable, published,
                                                                   report, db_engine):
    durable.schedule("nightly", report, cron="* * * * * *")
    assert durable.pause_schedule("nightly").paused
    place(db_engine, "nightly", T0)
    sweep = durable.coordinator().cron
    for second in range(5):
        assert sweep.run_once(T0 + timedelta(seconds=second)) == 0
    assert cron_runs(db_engine) == []
    resumed = durable.resume_schedule("nightly")
    assert not resumed.paused
    assert resumed.next_fire_at > datetime.now(UTC) - timedelta(seconds=1)
    assert durable.resume_schedule("nightly") == resumed  # idempotent


def test_redeclaring_keeps_the_place_in_time_unless_the_cron_changes(durable, published,
                                                                     report, db_engine):
    durable.schedule("nightly", report, cron="0 9 * * *", timezone="Europe/Berlin")
    place(db_engine, "nightly", T0)
    again = durable.schedule("nightly", report, cron="0 9 * * *", timezone="Europe/Berlin",
                             state={"v": 2})
    assert again.next_fire_at == T0 and again.state == {"v": 2}
    durable.pause_schedule("nightly")
    changed = report.schedule("nightly", cron="0 10 * * *", timezone="Europe/Berlin")
    assert changed.next_fire_at != T0 and changed.next_fire_at.astimezone(
        ZoneInfo("Europe/Berlin")).hour == 10
    assert changed.paused  # re-declaring does not unpause


def test_delete_and_unknown_names(durable, published, report):
    durable.schedule("nightly", report, cron="0 * * * *")
    durable.delete_schedule("nightly")
    assert durable.list_schedules() == []
    for call in (durable.delete_schedule, durable.pause_schedule, durable.resume_schedule):
        with pytest.raises(ScheduleNotFound):
            call("nightly")


def test_bad_schedule_input_is_a_typed_error(durable, published, report, db_engine):
    bad = [
        ({"name": "has space", "cron": "0 * * * *"}, InvalidArgument),
        ({"name": "", "cron": "0 * * * *"}, InvalidArgument),
        ({"name": "x", "cron": "not cron"}, InvalidSchedule),
        ({"name": "x", "cron": "0 * * * *", "timezone": "Mars/Base"}, InvalidSchedule),
        ({"name": "x", "cron": "0 * * * *", "catchup": "some"}, InvalidSchedule),
        ({"name": "x", "cron": "0 * * * *", "state": [1]}, InvalidArgument),
        ({"name": "x", "cron": "0 * * * *", "state": {"a": object()}}, InvalidArgument),
        ({"name": "x", "cron": "0 * * * *", "priority": 11}, InvalidArgument),
    ]
    for kwargs, error in bad:
        with pytest.raises(error):
            durable.schedule(wf=report, **kwargs)
    with pytest.raises(UnknownWorkflow):
        durable.schedule("x", "no_such_workflow", cron="0 * * * *")
    with pytest.raises(InvalidArgument):
        durable.pause_schedule("bad name")
    assert scalar(db_engine, "SELECT count(*) FROM {S}.schedules") == 0


def test_a_coordinator_without_the_code_fires_from_the_stored_definition(
        durable, make_durable, recorder, report, db_engine):
    durable.schedule("nightly", report, cron="0 * * * *")
    bare = make_durable()  # knows no workflows, like `durable-celery coordinator`
    published = recorder(bare)
    place(db_engine, "nightly", T0)
    assert bare.coordinator().cron.run_once(T0) == 1
    assert [m.name for m in published.sent] == ["durable.report.build"]


def test_the_cli_lists_pauses_resumes_and_deletes(durable, published, report, database_url,
                                                  redis_url, monkeypatch):
    monkeypatch.setenv("DURABLE_CELERY_DATABASE_URL", database_url)
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)

    durable.schedule("nightly", report, cron="0 9 * * *", timezone="America/New_York")
    listed = cli("schedule", "list")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert (row["name"], row["cron"], row["timezone"]) == ("nightly", "0 9 * * *",
                                                           "America/New_York")
    assert json.loads(cli("schedule", "pause", "nightly").output)["paused"] is True
    assert json.loads(cli("schedule", "resume", "nightly").output)["paused"] is False
    assert cli("schedule", "delete", "nightly").exit_code == 0
    missing = cli("schedule", "pause", "nightly")
    assert missing.exit_code == 2 and "ScheduleNotFound" in missing.output
    unknown = cli("schedule", "add", "n2", "no_such_workflow", "--cron", "0 * * * *")
    assert unknown.exit_code == 2 and "UnknownWorkflow" in unknown.output


def test_a_failing_cron_sweep_never_holds_up_dispatching(durable, published, report,
                                                          monkeypatch):
    wid = report.start()
    published.clear()
    execute_sql(durable._holder.engine, "UPDATE {S}.runs SET dispatch_at = now()")
    coordinator = durable.coordinator()

    def broken(now=None):
        raise RuntimeError("cron is broken")

    monkeypatch.setattr(coordinator.cron, "run_once", broken)
    coordinator._pass()
    assert [m.args for m in published.sent] == [[wid, 0]]


def test_the_database_clock_decides_not_the_hosts(durable, published, report, db_engine,
                                                  monkeypatch):
    """Finding 14: a coordinator whose host clock runs a minute ahead fires nothing early;
    the occurrence fires once the database's clock reaches it."""
    from durable_celery.coordinator import cron

    durable.schedule("skewed", report, cron="* * * * *")
    db_now = scalar(db_engine, "SELECT now()")
    soon = db_now + timedelta(seconds=30)
    place(db_engine, "skewed", soon)
    monkeypatch.setattr(cron, "_now", lambda: datetime.now(UTC) + timedelta(seconds=60))
    sweep = durable.coordinator().cron
    assert sweep.run_once() == 0
    assert cron_runs(db_engine, "skewed") == []
    assert 25 < sweep.seconds_to_next() <= 30
    place(db_engine, "skewed", db_now - timedelta(seconds=1))
    assert sweep.run_once() == 1
    assert len(cron_runs(db_engine, "skewed")) == 1
