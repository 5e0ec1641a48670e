"""Versions: ``durable_celery.start`` by name runs the highest registered version; a process
lacking a run's version gives the run back untouched."""

from __future__ import annotations

import pytest

from durable_celery import Done
from durable_celery.testing import drain
from tests.integration.support import execute_sql, run_row, scalar, seconds


def declare(durable, version):
    wf = durable.workflow("order", version=version)

    @wf.step
    def handle(ctx):
        return Done({"version": version, "state": ctx.state})

    return wf


def test_start_by_name_picks_the_highest_version(durable, published, db_engine):
    declare(durable, 1)
    declare(durable, 3)
    declare(durable, 2)

    start = durable.app.tasks["durable_celery.start"]
    wid = start.run(workflow="order", state={"n": 1})

    assert isinstance(wid, str)
    assert durable.get_workflow(wid).version == 3
    drain(durable)
    assert durable.wait_result(wid, timeout=1) == {"version": 3, "state": {"n": 1}}
    # An explicit version is honoured.
    older = start.run(workflow="order", state={}, version=1)
    assert durable.get_workflow(older).version == 1


def test_a_version_not_registered_here_is_released_untouched(make_durable, db_engine, recorder):
    new_deploy = make_durable()
    declare(new_deploy, 1)
    v2 = declare(new_deploy, 2)
    old_deploy = make_durable()  # an older worker that only knows v1
    declare(old_deploy, 1)
    published = recorder(new_deploy, old_deploy)

    wid = v2.start({"n": 5})
    published.clear()
    before = run_row(db_engine, wid)

    assert old_deploy.executor.execute(wid, 0) == "released"
    row = run_row(db_engine, wid)
    assert row["status"] == "runnable"
    assert (row["owner"], row["lease"]) == (None, None)
    assert (row["seq"], row["attempt"], row["step"], row["version"]) == (0, 0, "handle", 2)
    assert row["state"] == before["state"] == {"n": 5}
    assert row["error"] is None
    assert scalar(db_engine, "SELECT count(*) FROM {S}.steps WHERE run_id = :id", id=wid) == 0
    assert len(published) == 0  # not bounced straight back through the broker
    assert seconds(row["dispatch_at"] - row["updated_at"]) == pytest.approx(2.0, abs=1e-3)

    # The dispatcher re-sends it later (redispatch_after), for a worker that knows v2.
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() WHERE id = :id", id=wid)
    assert new_deploy.coordinator().dispatcher.run_once() == 1
    assert [(m.name, m.args) for m in published.sent] == [("durable.order.handle", [wid, 0])]
    assert new_deploy.executor.execute(wid, 0) == "committed"
    assert new_deploy.wait_result(wid, timeout=1) == {"version": 2, "state": {"n": 5}}
