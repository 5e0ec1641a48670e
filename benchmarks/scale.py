"""Benchmark 6: throughput with a big history and many parked runs, and the EXPLAIN of every
hot statement. Rows are seeded with set-based SQL (generate_series)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import sqlalchemy as sa

from benchmarks.harness import Bench
from durable_celery.storage import store, sweeps

SEED_FINISHED = """
INSERT INTO durable_celery.runs (id, workflow, version, queue, status, step, seq, visit,
    attempt, state, input, result, eligible_at, created_at, updated_at, finished_at)
SELECT 'seed-' || g, 'chain10', 1, 'seeded', 'done', 's9', 10, 10, 0, '{}', '{}', 'null',
       t, t, t, t
FROM generate_series(%(lo)s::int, %(hi)s::int) AS g,
     LATERAL (SELECT now() - interval '1 day' + g * interval '10 microseconds' AS t) AS x
"""

SEED_HISTORY = """
INSERT INTO durable_celery.steps (run_id, seq, step, attempt, outcome, next_step, state,
    started_at, finished_at, worker)
SELECT 'seed-' || g, s, 's' || (s - 1), 0, CASE WHEN s = 10 THEN 'done' ELSE 'next' END,
       CASE WHEN s < 10 THEN 's' || s END, '{}', NULL, now() - interval '1 day', 'seed'
FROM generate_series(%(lo)s::int, %(hi)s::int) AS g, generate_series(1, %(history)s::int) AS s
"""

# Half wait for a signal (with a deadline), half sleep: both an hour away.
SEED_PARKED = """
INSERT INTO durable_celery.runs (id, workflow, version, queue, status, step, seq, visit, state,
    input, eligible_at, dispatch_at, await_names, await_deadline)
SELECT 'parked-' || g, CASE WHEN g %% 2 = 0 THEN 'resume' ELSE 'timer' END, 1, 'parked',
       CASE WHEN g %% 2 = 0 THEN 'awaiting' ELSE 'runnable' END,
       CASE WHEN g %% 2 = 0 THEN 'resumed' ELSE 'woke' END, 1, 1, '{}', '{}',
       now() + interval '1 hour',
       CASE WHEN g %% 2 = 0 THEN NULL ELSE now() + interval '1 hour' END,
       CASE WHEN g %% 2 = 0 THEN ARRAY['go'] END,
       CASE WHEN g %% 2 = 0 THEN now() + interval '1 hour' END
FROM generate_series(1, %(n)s::int) AS g
ON CONFLICT DO NOTHING
"""


def seed_parked(bench: Bench, n: int) -> None:
    bench.sql(SEED_PARKED, {"n": n})
    bench.sql("ANALYZE durable_celery.runs")


def seed_finished(bench: Bench, n: int, history: int) -> float:
    """Seed ``n`` finished runs with ``history`` steps each; returns seconds taken."""
    t0 = time.monotonic()
    batch = 200_000
    for lo in range(1, n + 1, batch):
        hi = min(n, lo + batch - 1)
        bench.sql(SEED_FINISHED, {"lo": lo, "hi": hi})
        bench.sql(SEED_HISTORY, {"lo": lo, "hi": hi, "history": history})
    bench.sql("VACUUM ANALYZE durable_celery.runs")
    bench.sql("VACUUM ANALYZE durable_celery.steps")
    return time.monotonic() - t0


def scale(bench: Bench, *, rows: int, history: int, parked: int) -> None:
    from benchmarks.suites import ours_throughput

    runs = 100 if bench.quick else 500
    bench.truncate()
    queue = bench.queue("scale-d")
    worker = bench.worker("ours", queue, pool="prefork", concurrency=2)
    try:
        bench.sql("CHECKPOINT")  # both sides start from a written-out database
        ours_throughput(bench, queue, "chain10", 20)
        empty = [ours_throughput(bench, queue, "chain10", runs) for _ in range(bench.repeats)]
        print(f"scale: seeding {rows:,} finished runs x {history} steps and {parked:,} parked "
              "runs...", flush=True)
        took = seed_finished(bench, rows, history)
        seed_parked(bench, parked)
        print(f"scale: seeded in {took:.0f} s", flush=True)
        # The bulk load leaves gigabytes of dirty pages and a checkpoint in progress: write
        # them out, so the measurement sees a big database, not the load's aftermath.
        bench.sql("CHECKPOINT")
        ours_throughput(bench, queue, "chain10", 20)
        full = [ours_throughput(bench, queue, "chain10", runs) for _ in range(bench.repeats)]
        plans = explain_hot(bench)
    finally:
        worker.stop()
    ratio = [f / statistics.median(empty) for f in full]
    bench.report("scale", f"throughput, {rows:,} finished + {parked:,} parked", "steps/s",
                 ours=full, theirs=empty, variant="run-ahead", pool="prefork -c 2",
                 target=">= 0.9x of empty", check=lambda r: r >= 0.9,
                 extra={"theirs_means": "the same, on an empty database",
                        "history_per_run": history, "seed_seconds": took,
                        "per_repeat_ratio": ratio})
    seq_scans = {name: plan for name, plan in plans.items() if "Seq Scan" in plan}
    bench.write({"kind": "plans", "invocation": bench.invocation, "rows": rows,
                 "parked": parked, "plans": plans, "seq_scans": sorted(seq_scans)})
    path = bench.out.with_suffix(".plans.txt")
    path.write_text("\n\n".join(f"-- {name}\n{plan}" for name, plan in plans.items()) + "\n")
    print(f"scale: EXPLAIN of {len(plans)} hot statements in {path}; "
          f"sequential scans: {sorted(seq_scans) or 'none'}", flush=True)


def explain_hot(bench: Bench) -> dict[str, str]:
    """EXPLAIN (no ANALYZE: nothing runs) each hot statement with realistic parameters."""
    built = bench.ours(bench.queue("explain"))
    holder = built.durable._holder
    live = bench.sql("SELECT id FROM durable_celery.runs WHERE status = 'done' "
                     "AND id NOT LIKE 'seed-%' LIMIT 1")
    run_id = live[0][0] if live else "seed-1"
    p: dict[str, Any] = {
        "id": run_id, "seq": 3, "owner": "w", "lease": "l", "limit": 500, "redispatch": 60.0,
        "max_backoff": 3600.0, "stale": 30.0, "max_recoveries": 10, "retention": 604800.0,
        "status": "runnable", "step": "s3", "queue": "q", "attempt": 0, "state": "{}",
        "result": None, "error": None, "delay": 0.0, "until": None, "publish": False,
        "await_names": None, "deadline": None, "terminal": False, "ran_step": "s2",
        "ran_attempt": 0, "outcome": "next", "next_step": "s3", "started_at": None,
        "worker": "w", "consume": True, "names": ["go"], "target": run_id, "run_id": run_id,
        "name": "go", "payload": "null", "dedup_key": None, "key": None,
        "workflow": "chain10", "version": 1, "run_queue": None, "priority": 0, "at": None,
        "parent_id": None, "forked_from": None, "app_version": None, "after": 0.0,
        "ids": [run_id], "hostname": "h", "pid": 1, "nodename": None, "ahead": 0.025,
        "lead": 0.05, "await_all": False, "children_pending": 0,
    }
    hot = {
        "claim": store.CLAIM, "commit": store.COMMIT, "release": store.RELEASE,
        "wake_from_inbox (park)": store.WAKE_FROM_INBOX, "landed": store.LANDED,
        "start": store.START, "find_conflict": store.FIND_CONFLICT,
        "lock_target (signal)": store.LOCK_TARGET, "insert_signal": store.INSERT_SIGNAL,
        "dispatch_due": sweeps.DISPATCH_DUE, "expire_awaits": sweeps.EXPIRE_AWAITS,
        "next_due": sweeps.NEXT_DUE, "reap": sweeps.REAP,
        "delete_dead_workers": sweeps.DELETE_DEAD_WORKERS, "gc": sweeps.GC,
        "heartbeat": sweeps.HEARTBEAT, "release_owned": sweeps.RELEASE_OWNED,
        "get_run": store.GET_RUN, "status (wait_result)": store.STATUS,
        "history": store.HISTORY,
    }
    plans: dict[str, str] = {}
    with holder.begin() as conn:
        for name, statement in hot.items():
            text = sa.text("EXPLAIN (COSTS OFF) " + statement.text)
            # Parameters not named above (the compensation stack, a failure...) are NULL.
            params = {**dict.fromkeys(statement.compile().params), **p}
            rows = conn.execute(text, params).all()
            plans[name] = "\n".join(r[0] for r in rows)
        conn.rollback()
    return plans
