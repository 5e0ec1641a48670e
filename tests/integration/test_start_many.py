"""``wf.start_many``: many runs in one transaction; typed errors for bad input; keys
deduplicated; all or nothing."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from durable_celery import errors
from durable_celery.testing import drain
from tests.integration.support import rows


def declare(durable):
    wf = durable.workflow("bulk")

    @wf.step
    def only(ctx):
        return {"n": ctx.state.get("n")}

    return wf


def count_runs(db_engine) -> int:
    return rows(db_engine, "SELECT count(*) AS n FROM {S}.runs")[0]["n"]


def test_starts_every_run_in_order_and_publishes_each(durable, published, db_engine):
    wf = declare(durable)
    ids = wf.start_many([{"n": i} for i in range(50)])

    assert len(ids) == len(set(ids)) == 50
    assert [m.args for m in published.sent] == [[wid, 0] for wid in ids]
    drain(durable)
    assert [durable.wait_result(wid, timeout=1) for wid in ids] == [{"n": i} for i in range(50)]


def test_keys_ids_and_delay(durable, published, db_engine):
    wf = declare(durable)
    ids = wf.start_many([{"n": 1}, None], keys=["k:1", None], workflow_ids=[None, "fixed-id"],
                        delay=3600)

    assert ids[1] == "fixed-id"
    assert published.sent == []  # delayed: the dispatcher publishes them when due
    runs = {r["id"]: r for r in rows(db_engine, "SELECT id, key, status, state, "
                                                "eligible_at > now() + interval '3000 seconds' "
                                                "AS later FROM {S}.runs")}
    assert runs[ids[0]]["key"] == "k:1" and runs[ids[1]]["state"] == {}
    assert all(r["status"] == "runnable" and r["later"] for r in runs.values())
    assert durable.signal("k:1", "hello").workflow_id == ids[0]


def test_a_taken_key_starts_nothing(durable, published, db_engine):
    wf = declare(durable)
    holder = wf.start({"n": 0}, key="order:7")
    published.clear()

    with pytest.raises(errors.DuplicateWorkflow) as caught:
        wf.start_many([{"n": 1}, {"n": 2}, {"n": 3}], keys=["order:6", "order:7", "order:8"])

    assert caught.value.existing_id == holder
    assert count_runs(db_engine) == 1  # atomic: order:6 was rolled back with the rest
    assert published.sent == []


def test_a_taken_workflow_id_starts_nothing(durable, published, db_engine):
    wf = declare(durable)
    wf.start(workflow_id="taken")

    with pytest.raises(errors.DuplicateWorkflow):
        wf.start_many([{}, {}], workflow_ids=["fresh", "taken"])
    assert count_runs(db_engine) == 1


def test_on_conflict_existing_returns_the_holder(durable, published, db_engine):
    wf = declare(durable)
    holder = wf.start({"n": 0}, key="order:7")
    published.clear()

    ids = wf.start_many([{"n": 1}, {"n": 2}], keys=["order:7", "order:8"],
                        on_conflict="existing")

    assert ids[0] == holder and ids[1] != holder
    assert count_runs(db_engine) == 2
    assert [m.args[0] for m in published.sent] == [ids[1]]  # only the new run
    # Again: nothing new, the same ids back.
    assert wf.start_many([{"n": 1}, {"n": 2}], keys=["order:7", "order:8"],
                         on_conflict="existing") == ids
    assert count_runs(db_engine) == 2


def test_a_finished_holder_keeps_its_key_by_default(durable, published, db_engine):
    wf = declare(durable)
    first = wf.start(key="again")
    drain(durable)
    with pytest.raises(errors.DuplicateWorkflow, match="ended done") as caught:
        wf.start_many([{}], keys=["again"])
    assert caught.value.existing_id == first
    assert wf.start_many([{}], keys=["again"], on_conflict="existing") == [first]


def test_a_finished_holder_frees_its_key_after_finish(durable, published, db_engine):
    wf = declare(durable)
    first = wf.start(key="again", key_reuse="after_finish")
    drain(durable)
    (second,) = wf.start_many([{}], keys=["again"])
    assert second != first


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"states": "abc"}, errors.InvalidArgument),
    ({"states": {"a": 1}}, errors.InvalidArgument),
    ({"states": 5}, errors.InvalidArgument),
    ({"states": [{"x": object()}]}, errors.InvalidPayload),
    ({"states": [[1, 2]]}, errors.InvalidPayload),
    ({"states": [{}, {}], "keys": ["a"]}, errors.InvalidArgument),
    ({"states": [{}, {}], "keys": ["a", "a"]}, errors.InvalidArgument),
    ({"states": [{}], "keys": [""]}, errors.InvalidArgument),
    ({"states": [{}], "keys": [7]}, errors.InvalidArgument),
    ({"states": [{}, {}], "workflow_ids": ["x", "x"]}, errors.InvalidArgument),
    ({"states": [{}], "on_conflict": "skip"}, errors.InvalidArgument),
    ({"states": [{}], "delay": -1}, errors.InvalidArgument),
    ({"states": [{}], "delay": 1, "at": datetime.now(timezone.utc)}, errors.InvalidArgument),
    ({"states": [{}], "at": datetime(2030, 1, 1)}, errors.InvalidArgument),
    ({"states": [{}], "queue": "bad queue"}, errors.InvalidArgument),
])
def test_bad_input_is_a_typed_error_and_starts_nothing(durable, published, db_engine, kwargs,
                                                        error):
    wf = declare(durable)
    states = kwargs.pop("states")
    with pytest.raises(error):
        wf.start_many(states, **kwargs)
    assert count_runs(db_engine) == 0
    assert published.sent == []


def test_empty_batch(durable, published):
    assert declare(durable).start_many([]) == []
    assert published.sent == []


def test_unregistered_workflow(durable, make_durable):
    other = make_durable()
    wf = declare(other)
    other.close()
    from durable_celery.definitions import Workflow

    stray = Workflow(owner=durable._owner, name="bulk", version=1, steps=wf.steps)
    with pytest.raises(errors.UnknownWorkflow):
        stray.start_many([{}])
