"""Composition with real ``celery worker`` processes: fan-in under concurrency, foreach's
cap asserted from the database while it runs, and a compensation surviving a SIGKILL."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.e2e.conftest import Harness, wait_for
from tests.e2e.workerapp import SETTINGS

pytestmark = pytest.mark.e2e


def test_children_finishing_at_once_on_different_workers_wake_the_parent_once(
        e2e: Harness) -> None:
    """Semantic 2: the children of each parent finish at the same wall-clock moment on
    two worker processes (threads and prefork); each parent's join runs exactly once."""
    e2e.worker("threads", 8, label="threads")
    e2e.worker("prefork", 3, label="prefork")
    parents = [e2e.start("fanout", {"children": 12, "lead": 4}) for _ in range(3)]
    for wid in parents:
        result = e2e.durable.wait_result(wid, timeout=90)
        assert result["statuses"] == ["done"] * 12
        assert result["ns"] == list(range(12))
    pids = set()
    for wid in parents:
        pids.update(e2e.durable.wait_result(wid, timeout=1)["pids"])
        run = e2e.run(wid)
        assert (run.status, run.children_pending) == ("done", 0)
        assert [s.step for s in e2e.durable.workflow_steps(wid)] == ["spread", "gather"]
    assert e2e.db.effects(parents) == {(wid, "gather"): [0] for wid in parents}
    assert len(pids) >= 2, pids  # really more than one process finished children


def test_foreach_never_exceeds_its_concurrency_and_finishes_everything(e2e: Harness) -> None:
    """Semantic 5: 1,000 items, concurrency 10, workers able to run 18 at once; a sampler
    checks the database while it runs."""
    e2e.worker("threads", 16, label="threads")
    e2e.worker("prefork", 2, label="prefork")
    # Each item takes 100 ms: long next to a release, a publish, a claim and a commit even
    # on a loaded machine, so the ten slots really fill up (the lower bound below).
    wid = e2e.start("bulk", {"count": 1000, "cap": 10, "pause": 0.1})
    samples: list[tuple[int, int]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def sample() -> None:
        try:
            while not stop.is_set():
                row = e2e.db.rows(
                    "SELECT count(*) FILTER (WHERE status = 'executing'), "
                    "count(*) FILTER (WHERE finished_at IS NULL AND NOT held) "
                    "FROM durable_celery.runs WHERE parent_id = %s", wid)[0]
                samples.append((int(row[0]), int(row[1])))
                time.sleep(0.01)
        except BaseException as exc:  # reported below
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result: Any = e2e.durable.wait_result(wid, timeout=300)
    finally:
        stop.set()
        sampler.join(10)
    assert not errors, errors
    assert result["done"] == 1000 and result["items"] == list(range(1000))
    executing = max(s[0] for s in samples)
    started = max(s[1] for s in samples)
    assert len(samples) > 50, len(samples)
    assert executing <= 10 and started <= 10, (executing, started)
    assert executing >= 5, executing  # the cap was really approached, not trivially met
    assert e2e.db.scalar("SELECT count(*) FROM durable_celery.runs WHERE parent_id = %s "
                         "AND status = 'done'", wid) == 1000


def test_a_compensation_survives_a_sigkill(e2e: Harness) -> None:
    """Semantic 6: SIGKILL during the middle compensation; the reaper hands it to another
    worker; it runs again, and the compensation that already finished does not."""
    killed = e2e.worker("prefork", 1, label="killed")
    wid = e2e.start("saga", {"block": 60, "block_on": "killed"})

    def marker(step: str) -> Any:
        rows = e2e.db.rows("SELECT attempt, at FROM public.e2e_effects WHERE workflow_id = %s "
                           "AND step = %s ORDER BY at", wid, step)
        return rows

    wait_for(lambda: marker("undo_b:start"), timeout=30, what="undo_b to start")
    run = e2e.run(wid)
    assert (run.status, run.step) == ("compensating", "undo_b")
    killed.kill()
    e2e.worker("prefork", 1, label="rescuer")
    e2e.wait_status(wid, "compensated", timeout=SETTINGS["stale_after"] + 40)
    effects = e2e.db.effects([wid])
    assert effects == {
        (wid, "book_a"): [0], (wid, "book_b"): [0], (wid, "book_c"): [0], (wid, "pay"): [0],
        (wid, "undo_c:start"): [0], (wid, "undo_c:done"): [0],
        (wid, "undo_b:start"): [0, 1], (wid, "undo_b:done"): [1],
        (wid, "undo_a:start"): [0], (wid, "undo_a:done"): [0],
    }
    order = [step for step, in e2e.db.rows(
        "SELECT step FROM public.e2e_effects WHERE workflow_id = %s AND step LIKE 'undo%%' "
        "ORDER BY at", wid)]
    assert order == ["undo_c:start", "undo_c:done", "undo_b:start", "undo_b:start",
                     "undo_b:done", "undo_a:start", "undo_a:done"]
    run = e2e.run(wid)
    assert run.error["message"] == "payment failed"
    history = [(s.step, s.outcome) for s in e2e.durable.workflow_steps(wid)]
    assert history[-3:] == [("undo_c", "compensated"), ("undo_b", "compensated"),
                            ("undo_a", "compensated")]
