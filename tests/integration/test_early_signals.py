"""P4: a signal sent by name to a run that does not exist yet (it races the run's start,
or the start is still in its caller's transaction) is kept ``early_signal_ttl`` seconds and
delivered once the run starts; one that never finds its run expires with a warning."""

from __future__ import annotations

import logging

from durable_celery import Await, Done
from durable_celery.testing import drain
from tests.integration.support import execute_sql, rows, scalar


def declare(durable):
    wf = durable.workflow("late_start", run_ahead=False)

    @wf.step
    def park(ctx):
        return Await("go")

    @wf.step
    def end(ctx):
        return Done([s.payload for s in ctx.signals])

    return wf


def send_by_name(durable, message_id, **kwargs):
    return durable.app.tasks["durable_celery.signal"].apply(kwargs=kwargs,
                                                            task_id=message_id).get()


def test_a_signal_that_arrives_before_its_run_is_delivered_when_it_starts(durable, published,
                                                                         db_engine):
    wf = declare(durable)
    answer = send_by_name(durable, "m-1", target="order:9", name="go", payload={"v": 9})
    assert answer == {"workflow_id": None, "early": True, "duplicate": False, "woke": False}
    # The same message again (a redelivery) is kept once.
    assert send_by_name(durable, "m-1", target="order:9", name="go",
                        payload={"v": 9})["duplicate"] is True
    assert scalar(db_engine, "SELECT count(*) FROM {S}.early_signals") == 1
    wid = wf.start({}, key="order:9")
    drain(durable)
    assert durable.get_workflow(wid).status == "awaiting"
    durable.coordinator().run_once()  # the reaper's pass delivers it: the run wakes
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [{"v": 9}]
    assert scalar(db_engine, "SELECT count(*) FROM {S}.early_signals") == 0


def test_a_signal_to_an_id_given_by_the_sender_waits_for_that_id(durable, published):
    wf = declare(durable)
    send_by_name(durable, "m-2", target="run-42", name="go", payload=1)
    wid = wf.start({}, workflow_id="run-42")
    durable.coordinator().run_once()
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [1]


def test_an_early_signal_that_never_finds_its_run_expires(durable, published, db_engine,
                                                          caplog):
    declare(durable)
    send_by_name(durable, "m-3", target="nobody", name="go")
    execute_sql(db_engine, "UPDATE {S}.early_signals SET expires_at = now()")
    with caplog.at_level(logging.WARNING, logger="durable_celery.coordinator"):
        durable.coordinator().collector.run_once()
    assert rows(db_engine, "SELECT id FROM {S}.early_signals") == []
    assert "never started expired" in caplog.text


def test_a_signal_to_a_finished_run_is_not_kept(durable, published, db_engine):
    wf = declare(durable)
    wid = wf.start({}, key="order:10")
    drain(durable)
    durable.signal(wid, "go", 1)
    drain(durable)
    assert send_by_name(durable, "m-4", target="order:10", name="go") is None
    assert scalar(db_engine, "SELECT count(*) FROM {S}.early_signals") == 0


def test_the_setting_can_turn_it_off(make_durable, recorder, db_engine):
    durable = make_durable(early_signal_ttl=0)
    recorder(durable)
    declare(durable)
    assert send_by_name(durable, "m-5", target="nobody", name="go") is None
    assert scalar(db_engine, "SELECT count(*) FROM {S}.early_signals") == 0
