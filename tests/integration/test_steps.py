"""Commit before dispatch; messages carry ids and a sequence number only; duplicate, stale
and malformed messages are dropped without running the step."""

from __future__ import annotations

import base64
import json
import threading

import pytest
import redis

from durable_celery import Done
from durable_celery.testing import drain
from tests.integration.support import Worker, rows, run_row, scalar


def three_steps(durable, effects, *, gate=None, entered=None):
    wf = durable.workflow("pipeline", run_ahead=False)

    @wf.step
    def first(ctx):
        if entered is not None:
            entered.set()
        if gate is not None:
            assert gate.wait(5)
        effects.append(("first", ctx.attempt))
        ctx.state["first"] = True
        return None

    @wf.step
    def second(ctx):
        effects.append(("second", ctx.attempt))
        return {**ctx.state, "second": True}

    @wf.step
    def third(ctx):
        effects.append(("third", ctx.attempt))
        return Done(sorted(ctx.state))

    return wf


def test_commit_is_visible_before_the_next_message_is_published(durable, published, db_engine,
                                                                queue):
    effects: list = []
    wf = three_steps(durable, effects)
    seen_at_publish: list = []

    def look_at_db(message):
        # Runs inside send_task: what another process would see when the message lands.
        wid, _ = message.args
        seen_at_publish.append((
            scalar(db_engine, "SELECT seq FROM {S}.runs WHERE id = :id", id=wid),
            scalar(db_engine, "SELECT count(*) FROM {S}.steps WHERE run_id = :id", id=wid),
        ))

    published.on_send = look_at_db
    wid = wf.start({"n": 1})
    assert [(m.name, m.args) for m in published.sent] == [("durable.pipeline.first", [wid, 0])]

    assert durable.executor.execute(wid, 0) == "committed"
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("runnable", "second", 1)
    history = rows(db_engine, "SELECT seq, step, outcome, state FROM {S}.steps WHERE run_id = :id",
                   id=wid)
    assert history == [{"seq": 1, "step": "first", "outcome": "next",
                        "state": {"n": 1, "first": True}}]

    # The second message: published after the commit, and carrying ids + seq only.
    assert seen_at_publish == [(0, 0), (1, 1)]
    message = published.sent[-1]
    assert message.name == "durable.pipeline.second"
    assert message.args == [wid, 1]
    assert not message.kwargs
    assert message.options["queue"] == queue
    assert message.options["serializer"] == "json"
    assert json.loads(json.dumps(message.args)) == [wid, 1]


def test_duplicate_message_runs_the_step_once(durable, published, db_engine):
    effects: list = []
    gate, entered = threading.Event(), threading.Event()
    wf = three_steps(durable, effects, gate=gate, entered=entered)
    wid = wf.start()

    first = Worker(lambda: durable.executor.execute(wid, 0))
    first.start()
    assert entered.wait(5)
    # The same message delivered again while the first copy is still running the step.
    assert durable.executor.execute(wid, 0) == "stale"
    gate.set()
    assert first.value() == "committed"
    # ... and once more after the commit (a redelivery after a broker hiccup).
    assert durable.executor.execute(wid, 0) == "stale"

    assert effects == [("first", 0)]
    assert run_row(db_engine, wid)["seq"] == 1
    assert scalar(db_engine, "SELECT count(*) FROM {S}.steps WHERE run_id = :id", id=wid) == 1


def test_stale_sequence_numbers_are_dropped(durable, published, db_engine):
    effects: list = []
    wf = three_steps(durable, effects)
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    assert durable.executor.execute(wid, 1) == "committed"
    before = run_row(db_engine, wid)
    stale_before = durable.stats().get("stale", 0)

    for seq in (0, 1, 7):  # two old messages and one from a future that never happened
        assert durable.executor.execute(wid, seq) == "stale"

    assert durable.stats().get("stale", 0) - stale_before == 3
    assert effects == [("first", 0), ("second", 0)]
    assert run_row(db_engine, wid) == before
    assert durable.executor.execute(wid, 2) == "committed"
    assert durable.wait_result(wid, timeout=1) == ["first", "second"]


def test_malformed_messages_are_dropped(durable, published, db_engine):
    effects: list = []
    wf = three_steps(durable, effects)
    wid = wf.start()
    before = run_row(db_engine, wid)
    bad_before = durable.stats().get("bad_message", 0)

    malformed = [(wid, "0"), (wid, 0.0), (wid, True), (wid, None), ([wid], 0), (None, 0),
                 (42, 0), ({"id": wid}, 0), (wid.encode(), 0)]
    for workflow_id, seq in malformed:
        assert durable.executor.execute(workflow_id, seq) == "bad_message", (workflow_id, seq)

    assert durable.stats().get("bad_message", 0) - bad_before == len(malformed)
    assert effects == []
    assert run_row(db_engine, wid) == before


def test_the_broker_message_is_plain_json(durable, redis_url, queue):
    """The real publish path: what lands in Redis is JSON with [workflow_id, seq] only."""
    wf = durable.workflow("wire")

    @wf.step
    def only(ctx):
        return Done(ctx.state)

    client = redis.Redis.from_url(redis_url)
    try:
        wid = wf.start({"secret": "state stays in Postgres"})
        # Priority 0 (the default) is kombu's priority 9 on Redis: its own list.
        assert client.llen(queue) == 0
        raw = client.lrange(f"{queue}\x06\x169", 0, -1)
        assert len(raw) == 1
        envelope = json.loads(raw[0])
        assert envelope["content-type"] == "application/json"
        assert envelope["headers"]["task"] == "durable.wire.only"
        assert envelope["properties"]["body_encoding"] == "base64"
        body = json.loads(base64.b64decode(envelope["body"]))
        args, kwargs, _embed = body
        assert args == [wid, 0]
        assert kwargs == {}
        assert b"secret" not in raw[0]
        assert envelope["properties"]["priority"] == 9
    finally:
        client.delete(queue, f"{queue}\x06\x169")
        client.close()


class Interrupted(BaseException):
    """Like KeyboardInterrupt or a cancellation: not an Exception."""


def test_a_step_raising_a_base_exception_hands_the_run_back(durable, published, db_engine):
    wf = durable.workflow("interrupted")
    attempts = []

    @wf.step
    def only(ctx):
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            raise Interrupted()
        return Done("ok")

    wid = wf.start()
    with pytest.raises(Interrupted):
        durable.executor.execute(wid, 0)
    row = run_row(db_engine, wid)
    assert (row["status"], row["owner"], row["lease"]) == ("runnable", None, None)
    drain(durable)
    assert durable.wait_result(wid, timeout=1) == "ok"
