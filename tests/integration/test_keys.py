"""Business keys keep their promise: one run per key, also after it ended (``key_reuse``),
however the starts race; the same through ``durable_celery.start`` and ``@durable.task``."""

from __future__ import annotations

import threading

import pytest

from durable_celery import (
    ConfigurationError,
    Done,
    DuplicateWorkflow,
    Fail,
    InvalidArgument,
    NoTarget,
)
from durable_celery.testing import drain
from tests.integration.support import q, rows, start_threads, wait_for


def declare(durable, name="keyed", outcome=None):
    wf = durable.workflow(name)

    @wf.step
    def only(ctx):
        if ctx.state.get("fail"):
            return Fail("asked to fail")
        return Done(ctx.state.get("n"))

    return wf


def test_a_finished_run_keeps_its_key_by_default(durable, published):
    wf = declare(durable)
    first = wf.start({"n": 1}, key="order:42")
    drain(durable)
    assert durable.get_workflow(first).status == "done"
    with pytest.raises(DuplicateWorkflow, match="ended done") as caught:
        wf.start({"n": 2}, key="order:42")
    assert caught.value.existing_id == first
    assert caught.value.status == 409
    assert caught.value.details["existing_status"] == "done"
    # Nothing was started, nothing published for the refused start.
    assert [r["id"] for r in rows(durable_engine(durable), "SELECT id FROM {S}.runs")] == [first]


def test_a_failed_run_keeps_its_key_by_default(durable, published):
    wf = declare(durable)
    first = wf.start({"fail": True}, key="order:43")
    drain(durable)
    assert durable.get_workflow(first).status == "failed"
    with pytest.raises(DuplicateWorkflow, match="ended failed"):
        wf.start({}, key="order:43")


@pytest.mark.parametrize(("policy", "ending", "free"), [
    ("reject", {}, False), ("reject", {"fail": True}, False),
    ("after_failure", {}, False), ("after_failure", {"fail": True}, True),
    ("after_finish", {}, True), ("after_finish", {"fail": True}, True),
])
def test_key_reuse_policies(durable, published, policy, ending, free):
    wf = declare(durable)
    first = wf.start({**ending, "n": 1}, key="k", key_reuse=policy)
    with pytest.raises(DuplicateWorkflow, match="live run"):  # live: always held
        wf.start({}, key="k", key_reuse=policy)
    drain(durable)
    if free:
        assert wf.start({"n": 2}, key="k") != first
    else:
        with pytest.raises(DuplicateWorkflow) as caught:
            wf.start({"n": 2}, key="k")
        assert caught.value.existing_id == first


def test_a_cancelled_run_frees_its_key_after_failure_only(durable, published):
    wf = declare(durable)
    kept = wf.start({}, key="a")
    loose = wf.start({}, key="b", key_reuse="after_failure")
    durable.cancel_workflow(kept, "c1")
    durable.cancel_workflow(loose, "c2")
    with pytest.raises(DuplicateWorkflow, match="ended cancelled"):
        wf.start({}, key="a")
    assert wf.start({}, key="b") != loose


def test_the_setting_chooses_the_default(make_durable):
    durable = make_durable(key_reuse="after_finish")
    wf = declare(durable)
    first = wf.start({}, key="k")
    drain(durable)
    assert wf.start({}, key="k") != first
    with pytest.raises(ConfigurationError, match="key_reuse"):
        make_durable(key_reuse="sometimes")


@pytest.mark.parametrize("bad", ["never", "", 1, True, ["reject"]])
def test_a_bad_policy_is_a_typed_error_and_starts_nothing(durable, published, bad):
    wf = declare(durable)
    with pytest.raises(InvalidArgument, match="key_reuse"):
        wf.start({}, key="k", key_reuse=bad)
    with pytest.raises(InvalidArgument, match="key_reuse"):
        wf.start_many([{}], keys=["k"], key_reuse=bad)
    with pytest.raises(InvalidArgument, match="key_reuse"):
        wf.child({}, key="k", key_reuse=bad)
    assert rows(durable_engine(durable), "SELECT id FROM {S}.runs") == []
    assert published.sent == []


def test_concurrent_starts_of_one_key_start_one_run(durable, published):
    wf = declare(durable)
    barrier = threading.Barrier(8)

    def start():
        barrier.wait(5)
        try:
            return wf.start({}, key="race")
        except DuplicateWorkflow as exc:
            return ("dup", exc.existing_id)

    results = [t.value() for t in start_threads([start] * 8)]
    winners = [r for r in results if not isinstance(r, tuple)]
    assert len(winners) == 1
    assert {r[1] for r in results if isinstance(r, tuple)} == set(winners)


def test_a_start_racing_the_holders_end_is_still_refused(durable, published, db_engine):
    """The holder's terminal commit is in flight (its row locked) while a start with its
    key arrives: the start waits on the key index, then finds the key still held."""
    wf = declare(durable)
    holder = wf.start({}, key="edge")
    with db_engine.connect() as locker:
        tx = locker.begin()
        locker.execute(q("UPDATE {S}.runs SET status = 'done', finished_at = now() "
                         "WHERE id = :id"), {"id": holder})
        (racer,) = start_threads([lambda: wf.start({}, key="edge")])
        wait_for(lambda: blocked(db_engine), what="the start to wait on the key")
        tx.commit()
    with pytest.raises(DuplicateWorkflow) as caught:
        racer.value()
    assert caught.value.existing_id == holder


def blocked(engine):
    from tests.integration.support import lock_waiters

    return lock_waiters(engine) >= 1


def test_a_signal_to_a_finished_key_says_finished(durable, published):
    wf = declare(durable)
    wf.start({}, key="order:7")
    drain(durable)
    with pytest.raises(NoTarget) as caught:
        durable.signal("order:7", "go")
    assert caught.value.details["reason"] == "finished"
    with pytest.raises(NoTarget) as missing:
        durable.signal("order:8", "go")
    assert missing.value.details["reason"] == "missing"


def test_by_name_start_keeps_the_key_and_is_idempotent_after_the_end(durable, published):
    """A redelivered ``durable_celery.start`` (same message id) finds its run, also once
    that run finished, whatever its key policy; another message with the key is refused."""
    declare(durable, "r_charge")
    task = durable.app.tasks["durable_celery.start"]
    kw = {"workflow": "r_charge", "state": {"n": 100}, "key": "order:42",
          "key_reuse": "after_finish"}
    first = task.apply(kwargs=kw, task_id="msg-1").get()
    drain(durable)
    again = task.apply(kwargs=kw, task_id="msg-1").get()
    drain(durable)
    assert again == first == "msg-1"
    found = rows(durable_engine(durable), "SELECT id, status, result FROM {S}.runs "
                                          "WHERE key = 'order:42'")
    assert found == [{"id": "msg-1", "status": "done", "result": 100}]
    # The default policy, through the task: another message with the same key is refused
    # (logged) and answers with the run that holds the key.
    kw2 = {"workflow": "r_charge", "state": {"n": 1}, "key": "order:43"}
    assert task.apply(kwargs=kw2, task_id="msg-2").get() == "msg-2"
    drain(durable)
    assert task.apply(kwargs=kw2, task_id="msg-3").get() == "msg-2"
    assert len(rows(durable_engine(durable), "SELECT id FROM {S}.runs WHERE key = 'order:43'")) == 1


def test_dropin_task_keys_follow_the_policy(durable, published):
    @durable.task
    def charge(amount):
        return amount

    first = charge.apply_async((10,), key="pay:1")
    drain(durable)
    with pytest.raises(DuplicateWorkflow, match="ended done"):
        charge.apply_async((10,), key="pay:1")
    loose = charge.apply_async((5,), key="pay:2", key_reuse="after_finish")
    drain(durable)
    assert charge.apply_async((5,), key="pay:2").id != loose.id
    assert first.get(timeout=5) == 10


def test_child_keys_follow_the_policy(durable, published):
    from durable_celery import Spawn

    leaf = declare(durable, "leaf")
    parent = durable.workflow("parent")

    @parent.step
    def fan(ctx):
        return Spawn([leaf.child({"n": 1}, key="leaf:1")])

    @parent.step
    def join(ctx):
        return Done([c.status for c in ctx.children])

    first = parent.start({})
    drain(durable)
    assert durable.wait_result(first, timeout=1) == ["done"]
    # The finished child keeps its key: a second spawn of it fails that parent, clearly.
    second = parent.start({})
    drain(durable)
    run = durable.get_workflow(second)
    assert run.status == "failed"
    assert "already used" in run.error["message"] or "held" in run.error["message"]


def durable_engine(durable):
    return durable._holder.engine
