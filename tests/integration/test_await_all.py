"""Await(mode="all"): the run wakes once every named signal has arrived; on timeout the next
step sees the ones that did. mode="any" (the default) is unchanged."""

from __future__ import annotations

import pytest

from durable_celery import Await, Done, InvalidArgument, Next
from durable_celery.testing import drain
from tests.integration.support import run_row, scalar, start_threads


def declare(durable, mode="all", timeout=None):
    wf = durable.workflow(f"gather_{mode}")

    @wf.step
    def wait(ctx):
        return Await(["legal", "finance"], timeout=timeout, mode=mode)

    @wf.step
    def decide(ctx):
        return Done({"got": sorted(s.name for s in ctx.signals), "timed_out": ctx.timed_out})

    return wf


def test_all_waits_for_every_name(durable, published, db_engine):
    wf = declare(durable)
    wid = wf.start()
    drain(durable)
    assert durable.signal(wid, "legal", "ok").woke is False
    assert durable.signal(wid, "legal", "again").woke is False  # a second of the same name
    drain(durable)
    assert durable.get_workflow(wid).status == "awaiting"
    assert durable.signal(wid, "finance", "ok").woke is True
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == {"got": ["finance", "legal", "legal"],
                                                   "timed_out": False}
    assert run_row(db_engine, wid)["await_all"] is False


def test_all_signals_that_arrived_before_the_park_wake_it_at_once(durable, published):
    wf = declare(durable)
    wid = wf.start(delay=3600)
    durable.signal(wid, "finance", 1)
    durable.signal(wid, "legal", 2)
    drain(durable)  # collapses the start delay; the park finds both in the inbox
    assert durable.wait_result(wid, timeout=5)["got"] == ["finance", "legal"]


def test_on_timeout_the_step_sees_the_partial_set(durable, published):
    wf = declare(durable, timeout=3600)
    wid = wf.start()
    drain(durable)
    durable.signal(wid, "legal", "ok")
    drain(durable)
    assert durable.get_workflow(wid).status == "awaiting"
    drain(durable, expire_awaits=True)
    assert durable.wait_result(wid, timeout=5) == {"got": ["legal"], "timed_out": True}


def test_any_wakes_on_the_first(durable, published):
    wf = declare(durable, mode="any")
    wid = wf.start()
    drain(durable)
    assert durable.signal(wid, "finance", "ok").woke is True
    drain(durable)
    assert durable.wait_result(wid, timeout=5)["got"] == ["finance"]


@pytest.mark.parametrize("round_", range(3))
def test_all_with_signals_arriving_at_once_wakes_once(make_durable, monkeypatch, round_):
    durable = make_durable(pool_size=6)
    from tests.integration.support import Recorder

    sent = Recorder().install(durable, monkeypatch)
    wf = durable.workflow("many")
    names = [f"n{i}" for i in range(5)]

    @wf.step
    def wait(ctx):
        return Await(names, mode="all")

    @wf.step
    def done(ctx):
        return Done(sorted(s.name for s in ctx.signals))

    wid = wf.start()
    drain(durable)
    sent.clear()
    threads = start_threads([lambda n=n: durable.signal(wid, n) for n in names])
    woke = [t.value(timeout=30).woke for t in threads]
    assert woke.count(True) == 1
    assert len(sent.for_run(wid)) == 1
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == names


def test_a_bad_mode_is_refused():
    with pytest.raises(InvalidArgument, match="Await mode must be 'any' or 'all'"):
        Await("x", mode="most")


def test_await_all_survives_the_fast_path(durable, published, db_engine):
    """Invariant (holds): Await(mode='all') commits through the transaction (parking), a
    partial set of signals does not wake it, the full set does, and the next step's Next
    (fast path) consumes them all."""
    wf = durable.workflow("seam_all")

    @wf.step
    def park(ctx):
        return Await({"a", "b"}, mode="all")

    @wf.step
    def seen(ctx):
        return Next("end", state={"names": sorted(s.name for s in ctx.signals)})

    @wf.step
    def end(ctx):
        return Done(ctx.state["names"])

    wid = wf.start()
    drain(durable)
    durable.signal(wid, "a")
    drain(durable)
    assert durable.get_workflow(wid).status == "awaiting"
    durable.signal(wid, "b")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["a", "b"]
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals WHERE run_id = :id "
                             "AND consumed_at IS NULL", id=wid) == 0
