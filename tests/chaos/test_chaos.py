"""Chaos: hundreds of runs while workers are killed or frozen, the broker and the database
restart, and messages are duplicated or lost. Every run must finish once, with the right
result, every committed step's side effect present, every signal applied exactly once, and
re-executions only where the scenario's chaos explains them. See docs/reliability.md."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.chaos import harness
from tests.chaos.conftest import REPORT
from tests.chaos.harness import STALE_AFTER, Scenario

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.timeout(300)]

Chaos = Callable[..., Scenario]


def settle(scenario: Scenario, request: pytest.FixtureRequest,
           allowed: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Wait for the runs, account for every one of them, report, and fail on any problem."""
    scenario.wait_finished()
    figures, problems = scenario.account(allowed)
    REPORT.append(harness.report_line(figures))
    harness.write_summary(figures)
    # As record_property does (its fixture warns under junit_family xunit2).
    request.node.user_properties.extend((f"chaos_{k}", v) for k, v in figures.items())
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])
    assert figures["done"] == figures["runs"] >= 1
    return figures


def test_sigkill_random_workers(chaos: Chaos, request: pytest.FixtureRequest) -> None:
    """1. SIGKILL a random worker (its whole process group) every few seconds; restart it."""
    # Two copies of each signal, a few seconds apart: kombu's Redis transport takes a
    # message off the queue and records it as unacknowledged in two commands, so a worker
    # killed between them loses that message outright (the broker's window, not ours).
    scenario = chaos("sigkill", blind=True, signal_copies=2)
    rng = random.Random()
    scenario.begin()
    while scenario.chaos_window():
        scenario.idle(rng.uniform(1.5, 3.0))
        # Prefer a worker that is running a step right now (else any worker that is up).
        ready = [w for w in scenario.live_workers() if w.ready()] or scenario.live_workers()
        busy = [w for w in ready if scenario.executing_on(scenario.worker_ids(w))]
        victim = rng.choice(busy or ready)
        scenario.tally.held_at_kill += len(scenario.executing_on(scenario.worker_ids(victim)))
        scenario.kill_worker(victim)
        scenario.replace_worker(victim)
    killed = scenario.tally.killed_groups
    figures = settle(scenario, request, lambda effect: effect["pgid"] in killed)
    # The kills hit running steps: the reaper gave them to other workers.
    assert figures["kills"] >= 5 and figures["held_at_kill"] >= 1, figures
    assert figures["reaped"] >= 1, figures


def test_redis_restarts(chaos: Chaos, request: pytest.FixtureRequest) -> None:
    """2. Kill the broker (SIGKILL) mid-run and start it again seconds later, twice."""
    scenario = chaos("redis", blind=True)
    scenario.begin()
    for at in (6.0, 16.0):
        scenario.idle_until(at)
        scenario.outage("redis", scenario.redis.kill, scenario.redis.start, seconds=5.0)
        scenario.tally.redis_restarts += 1
    # Nothing was killed: a step may have run without committing only in a worker that
    # exited by itself (and was restarted, as a supervisor would).
    exited = scenario.exited_groups
    figures = settle(scenario, request, lambda effect: effect["pgid"] in exited)
    assert figures["redis_restarts"] == 2, figures
    reconnected(scenario)


def test_postgres_restarts(chaos: Chaos, request: pytest.FixtureRequest) -> None:
    """3. Stop Postgres (fast shutdown) mid-run and start it again seconds later, twice."""
    scenario = chaos("postgres", blind=True)
    scenario.begin()
    for at in (6.0, 16.0):
        scenario.idle_until(at)
        scenario.outage("postgres", scenario.pg.stop, scenario.pg.start, seconds=4.0)
        scenario.tally.postgres_restarts += 1
    # A step caught by the outage may run again once its commit failed for good: only
    # executions recorded around an outage are explained.
    figures = settle(scenario, request,
                     harness.within(scenario.tally.outages, before=3.0, after=20.0))
    assert figures["postgres_restarts"] == 2, figures
    # Every step that ran again is one whose commit was given up (then released and re-run)
    # or whose claim was handed back or reclaimed: nothing was half-applied.
    assert figures["re_executions"] <= (figures["commit_failed"] + figures["abandoned"]
                                        + figures["reaped"]), figures
    reconnected(scenario)


def reconnected(scenario: Scenario) -> None:
    """Every worker that lived through the last outage ran steps after it ended."""
    last_end = scenario.tally.outages[-1][2]
    survivors = {w.pid for w in scenario.workers
                 if w.alive() and w.started_at is not None and w.started_at < last_end}
    active = scenario.groups_active_after(last_end)
    assert survivors, "no worker lived through the last outage"
    assert survivors <= active, (
        f"workers {sorted(survivors - active)} ran nothing after the last outage")


def test_paused_worker_is_reclaimed(chaos: Chaos, request: pytest.FixtureRequest) -> None:
    """4. SIGSTOP a worker while it runs a step, longer than stale_after, then SIGCONT it:
    its runs are reclaimed and run elsewhere; its late commits are refused."""
    scenario = chaos("sigstop", blind=True)
    scenario.begin()
    tally = scenario.tally
    while tally.pauses < 3 and scenario.chaos_window(extra=15.0):
        scenario.idle(1.0)
        worker = pause_a_busy_worker(scenario)
        if worker is None:
            continue
        scenario.idle(STALE_AFTER + 3.0)
        worker.signal_group(signal.SIGCONT)
    paused = tally.paused_groups
    figures = settle(scenario, request, lambda effect: effect["pgid"] in paused)
    assert tally.pauses >= 1 and tally.held_while_paused >= 1, figures
    # Reclaimed: the step each paused process held was committed by another process.
    for wid, seq, ids in tally.held:
        entry = next(h for h in scenario.history_of(wid) if h[0] == seq + 1)
        assert entry[4] not in ids, (
            f"run {wid}: the step held at seq {seq} by paused processes {ids} was not "
            f"reclaimed; {entry[4]} committed it after SIGCONT: {entry}. Transactions the "
            f"paused processes had open while stopped: {tally.paused_transactions}")
    # Refused: the paused processes woke up, finished their steps, and lost the lease.
    assert scenario.lease_lost_in(paused) >= 1, figures


def pause_a_busy_worker(scenario: Scenario) -> harness.Worker | None:
    """SIGSTOP the process group of a worker that is executing a step right now and still
    holds it once stopped; returns that worker, or None if none was busy."""
    for worker in random.sample(scenario.live_workers(), len(scenario.live_workers())):
        ids = scenario.worker_ids(worker)
        if not ids or not scenario.executing_on(ids):
            continue
        worker.signal_group(signal.SIGSTOP)
        time.sleep(0.3)  # a commit already on its way lands before we look
        held = scenario.executing_on(ids)
        if not held:  # it finished in between: try again later
            worker.signal_group(signal.SIGCONT)
            continue
        scenario.tally.pauses += 1
        scenario.tally.paused_groups.add(worker.pid)
        scenario.tally.held_while_paused += len(held)
        scenario.tally.held.extend((wid, seq, ids) for wid, seq in held)
        scenario.tally.paused_transactions += scenario.open_transactions(worker)
        return worker
    return None


def test_duplicated_and_dropped_messages(chaos: Chaos, request: pytest.FixtureRequest) -> None:
    """5. Every durable message is published twice and one in ten is silently dropped (in the
    workers and in the starter); signals are sent twice and one in ten copies is lost."""
    scenario = chaos("dup-drop", faults="dup-drop", duplicate_signals=True, drop_signals=True)
    scenario.begin()
    figures = settle(scenario, request, lambda effect: False)
    dropped = figures["message_dropped"] + figures.get("starter_dropped", 0)
    duplicated = figures["message_duplicated"] + figures.get("starter_duplicated", 0)
    assert dropped >= 1 and duplicated >= 1 and figures["signal_dropped"] >= 1, figures
    # A duplicate is refused by the claim; a drop is re-sent by the dispatcher: nothing ran
    # twice.
    assert figures["re_executions"] == 0, figures


def test_postgres_crashes(chaos: Chaos, request: pytest.FixtureRequest) -> None:
    """6. Crash Postgres (``pg_ctl stop -m immediate``: no checkpoint, WAL recovery at the
    next start) mid-run, twice; signals from a blind sender (never re-sent)."""
    scenario = chaos("pg-crash", blind=True)
    scenario.begin()
    for at in (6.0, 16.0):
        scenario.idle_until(at)
        scenario.outage("postgres-crash", scenario.pg.crash, scenario.pg.start, seconds=4.0)
        scenario.tally.postgres_restarts += 1
    figures = settle(scenario, request,
                     harness.within(scenario.tally.outages, before=3.0, after=20.0))
    assert figures["postgres_restarts"] == 2 and figures["signal_resends"] == 0, figures
    # Besides commits given up and reclaims: a claim commits with synchronous_commit off,
    # so a crash may undo one its worker already had; the step then runs elsewhere, and the
    # first worker's commit is refused ("lease lost"). Nothing is applied twice.
    assert figures["re_executions"] <= (figures["commit_failed"] + figures["abandoned"]
                                        + figures["reaped"] + figures["lease_lost"]), figures
    reconnected(scenario)


def test_redis_without_persistence(chaos: Chaos, request: pytest.FixtureRequest) -> None:
    """7. A Redis without persistence is stopped with SHUTDOWN NOSAVE, twice: its queues and
    every message workers held unacknowledged are gone. Step messages come back from
    Postgres; signals by name were applied as received. The blind sender sends each signal
    twice, a few seconds apart, and never again; a signal message still queued in Redis when
    it shut down had reached no worker and is gone with it (what a Redis without
    persistence promises): the harness notes those and sends them again once Redis is back."""
    scenario = chaos("redis-nosave", blind=True, persistent_redis=False, signal_copies=2)
    scenario.begin()
    for at in (6.0, 16.0):
        scenario.idle_until(at)
        scenario.outage("redis-nosave", scenario.redis_nosave, scenario.redis_back,
                        seconds=3.0)
        scenario.tally.redis_restarts += 1
    exited = scenario.exited_groups
    figures = settle(scenario, request, lambda effect: effect["pgid"] in exited)
    assert figures["redis_restarts"] == 2 and figures["signal_resends"] == 0, figures
    reconnected(scenario)


def test_mixed_workload_under_overlapping_chaos(chaos: Chaos,
                                                request: pytest.FixtureRequest) -> None:
    """8. The mixed workload -- the chaos workflow, sagas (some declined and compensated),
    foreach with a cap of 2, a drop-in task started with a countdown, blind signals by
    name -- while every kind of chaos hits at once, twice: a worker is SIGKILLed, another
    is frozen past stale_after, Redis (no persistence) shuts down without saving and
    Postgres crashes."""
    scenario = chaos("storm", blind=True, persistent_redis=False, mixed=True, signal_copies=2)
    scenario.begin()
    for at in (6.0, 18.0):
        scenario.idle_until(at)
        storm(scenario)
    tally = scenario.tally
    broken = tally.killed_groups | tally.paused_groups | scenario.exited_groups
    near_outage = harness.within(tally.outages, before=3.0, after=20.0)
    figures = settle(scenario, request,
                     lambda effect: effect["pgid"] in broken or near_outage(effect))
    assert tally.kills == 2 and tally.pauses >= 1, figures
    assert figures["redis_restarts"] == 2 and figures["postgres_restarts"] == 2, figures
    assert figures["signal_resends"] == 0, figures
    assert figures["kinds"]["order"] and figures["kinds"]["batch"], figures


def storm(scenario: Scenario) -> None:
    """Kill one worker, freeze another, and take Redis and Postgres down, all at once."""
    tally = scenario.tally
    ready = [w for w in scenario.live_workers() if w.ready()] or scenario.live_workers()
    busy = [w for w in ready if scenario.executing_on(scenario.worker_ids(w))]
    victim = random.choice(busy or ready)
    tally.held_at_kill += len(scenario.executing_on(scenario.worker_ids(victim)))
    scenario.kill_worker(victim)
    frozen = next((w for w in scenario.live_workers() if w is not victim and w.ready()), None)
    if frozen is not None:
        frozen.signal_group(signal.SIGSTOP)
        tally.pauses += 1
        tally.paused_groups.add(frozen.pid)
    began = harness.now()
    scenario.redis_nosave()
    scenario.pg.crash()
    scenario.idle(4.0)
    scenario.pg.start()
    scenario.redis_back()
    tally.outages.append(("storm", began, harness.now()))
    tally.redis_restarts += 1
    tally.postgres_restarts += 1
    scenario.replace_worker(victim)
    scenario.idle(STALE_AFTER + 3.0 - 4.0)
    if frozen is not None:
        frozen.signal_group(signal.SIGCONT)
