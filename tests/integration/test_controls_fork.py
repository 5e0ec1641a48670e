"""Fork: a new run from completed-step number N of another (history before N copied, the
state before N, step N run again), from the input when N is missing / not an integer /
<= 1, clamped past the end; new ids, application versions, and refused requests."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from durable_celery import Done, Fail, Next, Spawn
from durable_celery.errors import (
    ControlError,
    DuplicateWorkflow,
    InvalidRequest,
    WorkflowNotFound,
)
from durable_celery.testing import drain
from tests.integration.support import rows, run_row, scalar

STEPS = ("a", "b", "c", "d")


def declare(durable: Any, calls: list, *, version: int = 1, tag: str = "") -> Any:
    """a -> b -> c -> d -> Done(trail); each step appends its name (+ tag) to the trail."""
    wf = durable.workflow("pipeline", version=version, run_ahead=False)

    def make(name: str, nxt: str | None) -> None:
        def fn(ctx):
            calls.append((ctx.workflow_id, name + tag, copy.deepcopy(ctx.state)))
            ctx.state["trail"] = [*ctx.state.get("trail", []), name + tag]
            return Next(nxt) if nxt else Done(ctx.state["trail"])
        fn.__name__ = name
        wf.step(fn)

    for i, name in enumerate(STEPS):
        make(name, STEPS[i + 1] if i + 1 < len(STEPS) else None)
    return wf


def history(engine: Any, wid: str) -> list[dict]:
    return rows(engine, "SELECT seq, step, attempt, outcome, state, started_at, finished_at, "
                        "worker FROM {S}.steps WHERE run_id = :id ORDER BY seq", id=wid)


@pytest.fixture
def source(durable, published, db_engine):
    calls: list = []
    wf = declare(durable, calls)
    wid = wf.start({"input": 7}, queue=None)
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["a", "b", "c", "d"]
    assert [(s.seq, s.step) for s in durable.workflow_steps(wid)] == list(
        zip(range(1, 5), STEPS, strict=True))
    calls.clear()
    published.clear()
    return wid, calls


def ran(calls: list, wid: str) -> list[tuple[str, Any]]:
    return [(step, state) for (w, step, state) in calls if w == wid]


@pytest.mark.parametrize("start_step", [None, 0, 1, -3, True, False, 2.5, "two", "",
                                        "1", [2], {"n": 2}])
def test_fork_from_the_input(durable, published, db_engine, source, start_step):
    wid, calls = source
    answer = durable.fork_workflow(wid, "f-input", start_step=start_step)
    assert set(answer) == {"ok", "changed", "idempotency_key", "idempotency_replayed",
                           "workflow_id"}
    assert (answer["ok"], answer["changed"], answer["idempotency_replayed"]) == \
        (True, True, False)
    new_id = answer["workflow_id"]
    row = run_row(db_engine, new_id)
    assert (row["status"], row["step"], row["seq"], row["forked_from"]) == \
        ("runnable", "a", 0, wid)
    assert row["state"] == {"input": 7} and row["input"] == {"input": 7}
    assert history(db_engine, new_id) == []
    assert [(m.name, m.args) for m in published.for_run(new_id)] == \
        [("durable.pipeline.a", [new_id, 0])]
    drain(durable)
    assert durable.wait_result(new_id, timeout=5) == ["a", "b", "c", "d"]
    assert [s for s, _ in ran(calls, new_id)] == list(STEPS)
    assert ran(calls, new_id)[0][1] == {"input": 7}


@pytest.mark.parametrize("start_step", [2, 2.0, "2", " 2 ", "+2"])
def test_fork_at_step_two(durable, published, db_engine, source, start_step):
    wid, calls = source
    src_history = history(db_engine, wid)
    new_id = durable.fork_workflow(wid, "f-2", start_step=start_step)["workflow_id"]
    row = run_row(db_engine, new_id)
    assert (row["step"], row["seq"], row["status"]) == ("b", 1, "runnable")
    assert row["state"] == src_history[0]["state"] == {"input": 7, "trail": ["a"]}
    assert row["input"] == {"input": 7}
    assert history(db_engine, new_id) == src_history[:1]  # copied as it was
    assert [m.args for m in published.for_run(new_id)] == [[new_id, 1]]
    drain(durable)
    assert durable.wait_result(new_id, timeout=5) == ["a", "b", "c", "d"]
    assert ran(calls, new_id) == [
        ("b", {"input": 7, "trail": ["a"]}), ("c", {"input": 7, "trail": ["a", "b"]}),
        ("d", {"input": 7, "trail": ["a", "b", "c"]})]
    assert [h["seq"] for h in history(db_engine, new_id)] == [1, 2, 3, 4]
    assert durable.get_workflow(new_id).forked_from == wid


def test_fork_at_each_step_number(durable, published, db_engine, source):
    wid, calls = source
    src_history = history(db_engine, wid)
    forks = {}
    for number in (3, 4):
        new_id = durable.fork_workflow(wid, f"f-{number}", start_step=number)["workflow_id"]
        forks[number] = new_id
        row = run_row(db_engine, new_id)
        assert (row["step"], row["seq"]) == (STEPS[number - 1], number - 1)
        assert row["state"] == src_history[number - 2]["state"]
        assert history(db_engine, new_id) == src_history[:number - 1]
    drain(durable)
    for number, new_id in forks.items():
        assert durable.wait_result(new_id, timeout=5) == ["a", "b", "c", "d"]
        assert [s for s, _ in ran(calls, new_id)] == list(STEPS[number - 1:])


@pytest.mark.parametrize("start_step", [5, 99, "1000", 10**9, 1e12, "99999999999"])
def test_fork_past_the_end_reruns_the_last_completed_step(durable, published, db_engine,
                                                          source, start_step):
    wid, calls = source
    src_history = history(db_engine, wid)
    new_id = durable.fork_workflow(wid, "f-end", start_step=start_step)["workflow_id"]
    row = run_row(db_engine, new_id)
    assert (row["step"], row["seq"]) == ("d", 3)
    assert row["state"] == src_history[2]["state"]
    assert history(db_engine, new_id) == src_history[:3]
    drain(durable)
    assert ran(calls, new_id) == [("d", {"input": 7, "trail": ["a", "b", "c"]})]
    assert durable.wait_result(new_id, timeout=5) == ["a", "b", "c", "d"]


def test_fork_of_a_run_without_history_starts_from_the_input(durable, published, db_engine):
    calls: list = []
    wf = declare(durable, calls)
    wid = wf.start({"fresh": True})
    new_id = durable.fork_workflow(wid, "f-nohist", start_step=3)["workflow_id"]
    row = run_row(db_engine, new_id)
    assert (row["step"], row["seq"], row["state"]) == ("a", 0, {"fresh": True})
    assert history(db_engine, new_id) == []
    # The source itself is untouched and still runs.
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == list(STEPS)
    assert durable.wait_result(new_id, timeout=5) == list(STEPS)


def test_fork_leaves_the_source_alone(durable, published, db_engine, source):
    wid, _ = source
    before = run_row(db_engine, wid), history(db_engine, wid)
    durable.fork_workflow(wid, "f-src", start_step=3)
    drain(durable)
    assert (run_row(db_engine, wid), history(db_engine, wid)) == before


def test_fork_with_a_chosen_id(durable, published, db_engine, source):
    wid, _ = source
    answer = durable.fork_workflow(wid, "f-named", new_workflow_id="my-fork", start_step=2)
    assert answer["workflow_id"] == "my-fork"
    assert run_row(db_engine, "my-fork")["forked_from"] == wid
    drain(durable)
    assert durable.wait_result("my-fork", timeout=5) == list(STEPS)


def test_fork_whose_new_id_collides(durable, published, db_engine, source):
    wid, _ = source
    with pytest.raises(DuplicateWorkflow) as info:
        durable.fork_workflow(wid, "f-self", new_workflow_id=wid)
    assert info.value.status == 409
    assert isinstance(info.value, ControlError)
    assert info.value.body["error"] == "DuplicateWorkflow"
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE forked_from = :s",
                  s=wid) == 0
    assert run_row(db_engine, wid)["status"] == "done"
    assert len(published) == 0


@pytest.mark.parametrize("bad", ["", "   ", "x" * 201, 12, b"bytes", ["id"], "nul\x00", "lone \ud800"])
def test_fork_with_an_invalid_new_id_is_a_400(durable, published, db_engine, source, bad):
    wid, _ = source
    with pytest.raises(InvalidRequest) as info:
        durable.fork_workflow(wid, "f-bad-id", new_workflow_id=bad)
    assert info.value.status == 400
    assert info.value.body["error"] == "InvalidRequest"
    assert info.value.body["field"] == "new_workflow_id"
    assert scalar(db_engine, "SELECT count(*) FROM {S}.control_requests") == 0
    # The key was not consumed by the refused request.
    assert durable.fork_workflow(wid, "f-bad-id")["idempotency_replayed"] is False


def test_fork_of_a_missing_source_is_a_404(durable, published, db_engine):
    declare(durable, [])
    with pytest.raises(WorkflowNotFound) as info:
        durable.fork_workflow("ghost", "f-ghost")
    assert (info.value.status, info.value.body["error"]) == (404, "WorkflowNotFound")
    assert isinstance(info.value, ControlError)
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0
    assert len(published) == 0


# ---------------------------------------------------------------------------- versions


@pytest.fixture
def two_versions(durable, published, db_engine):
    calls: list = []
    v1 = declare(durable, calls)
    declare(durable, calls, version=2, tag="2")
    wid = v1.start({"input": 1})
    drain(durable)
    calls.clear()
    published.clear()
    return wid, calls


@pytest.mark.parametrize("version", [2, "2", " 2 "])
def test_fork_onto_another_registered_version(durable, published, db_engine, two_versions,
                                               version):
    wid, calls = two_versions
    new_id = durable.fork_workflow(wid, "f-v2", start_step=3,
                                   application_version=version)["workflow_id"]
    row = run_row(db_engine, new_id)
    assert row["version"] == 2 and row["app_version"] == "2"
    assert (row["step"], row["seq"]) == ("c", 2)
    drain(durable)
    assert [s for s, _ in ran(calls, new_id)] == ["c2", "d2"]
    assert durable.wait_result(new_id, timeout=5) == ["a", "b", "c2", "d2"]


def test_fork_defaults_to_the_source_version(durable, published, db_engine, two_versions):
    wid, _ = two_versions
    new_id = durable.fork_workflow(wid, "f-v-default")["workflow_id"]
    assert run_row(db_engine, new_id)["version"] == 1
    drain(durable)
    assert durable.wait_result(new_id, timeout=5) == list(STEPS)
    assert durable.fork_workflow(wid, "f-v1", application_version=1)["workflow_id"] != new_id


@pytest.mark.parametrize("version", [3, "3", 0, -1, "0", True, 1.5, "v2", "", [2]])
def test_fork_onto_an_unknown_or_invalid_version_is_a_400(durable, published, db_engine,
                                                           two_versions, version):
    wid, _ = two_versions
    with pytest.raises(InvalidRequest) as info:
        durable.fork_workflow(wid, "f-v-bad", application_version=version)
    assert info.value.status == 400
    assert info.value.body["field"] == "application_version"
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE forked_from = :s",
                  s=wid) == 0
    assert len(published) == 0


def test_fork_onto_a_version_without_the_start_step_is_refused(durable, published, db_engine):
    """v2 has no step "c": a fork of v1's step 3 onto v2 could never run (every worker
    would release it). It must be refused as invalid, creating nothing."""
    calls: list = []
    v1 = declare(durable, calls)
    v2 = durable.workflow("pipeline", version=2, run_ahead=False)

    @v2.step
    def a(ctx):
        return Done("v2")

    wid = v1.start({})
    drain(durable)
    published.clear()
    with pytest.raises(ControlError) as info:
        durable.fork_workflow(wid, "f-v2-nostep", start_step=3, application_version=2)
    assert info.value.status == 400
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE forked_from = :s",
                  s=wid) == 0
    assert len(published) == 0


def test_fork_with_an_out_of_range_version_is_a_400(make_durable, db_engine):
    """The workflow is not registered in this process (e.g. the CLI without -A): the
    version is trusted, but one Postgres cannot store is still invalid input."""
    owner = make_durable()
    wf = declare(owner, [])
    wid = wf.start({})
    drain(owner)
    stranger = make_durable()
    with pytest.raises(InvalidRequest) as info:
        stranger.fork_workflow(wid, "f-huge-version", application_version=2**31)
    assert info.value.status == 400
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE forked_from = :s",
                  s=wid) == 0
    # A plausible version is trusted: the run row records it.
    new_id = stranger.fork_workflow(wid, "f-v7", application_version=7)["workflow_id"]
    assert run_row(db_engine, new_id)["version"] == 7


def test_forking_a_child_started_from_a_step_function_runs_only_that_step(durable, published,
                                                                          db_engine):
    """Regression: a child spawned from a step function runs that one step (single_step). A fork
    of it starts at the workflow's FIRST step (not the step the child ran), without
    single_step, so it runs the whole workflow."""
    ran: list[str] = []
    tools = durable.workflow("seam_tools")

    @tools.step
    def first(ctx):
        ran.append("first")

    @tools.step
    def middle(ctx):
        ran.append("middle")
        return {"m": True}

    @tools.step
    def last(ctx):
        ran.append("last")
        return Done("last")

    parent = durable.workflow("seam_parent")

    @parent.step
    def fan(ctx):
        return Spawn([middle])

    @parent.step
    def join(ctx):
        return Done([c.result for c in ctx.children])

    wid = parent.start()
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [{"m": True}]
    assert ran == ["middle"]
    child = scalar(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p", p=wid)
    ran.clear()
    fork = durable.fork_workflow(child, "fork-child")["workflow_id"]
    drain(durable)
    assert ran == ["middle"], f"the fork of a one-step child ran {ran}"
    assert durable.wait_result(fork, timeout=5) == {"m": True}


def test_forking_a_compensated_saga_from_its_last_step(durable, published):
    """Regression: a compensated run's history ends with compensation rows ('undo', outcome
    'compensated'). A fork "past the end" (the last completed step, as _fork documents)
    picks that row and is refused with InvalidRequest "has no step 'undo'"; forking at the
    compensation's number is refused the same way. Compensation rows should not count as
    completed steps to fork from."""
    ran: list[str] = []
    wf = durable.workflow("seam_fork_saga")

    @wf.step(compensate="undo")
    def reserve(ctx):
        ran.append("reserve")

    @wf.step
    def pay(ctx):
        ran.append("pay")
        if ctx.state.get("forked"):
            return Done("paid")
        return Fail("declined")

    @wf.compensation
    def undo(ctx):
        ran.append("undo")

    wid = wf.start()
    drain(durable)
    assert durable.get_workflow(wid).status == "compensated"
    assert [s.step for s in durable.workflow_steps(wid)] == ["reserve", "pay", "undo"]
    ran.clear()
    fork = durable.fork_workflow(wid, "fork-saga-end", start_step=99)["workflow_id"]
    drain(durable)
    assert ran[:1] == ["pay"] and durable.get_workflow(fork).forked_from == wid
