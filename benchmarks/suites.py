"""Benchmarks 1-5, 7 and 8 (6 is in scale.py). Each runs our workload and its plain-Celery
twin on the same broker, pool and machine, repeated, and reports through ``Bench.report``."""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks import plain_app
from benchmarks.harness import Bench, percentile
from benchmarks.scale import seed_parked

POLL = 0.1

RECOVERY_SETTINGS = {"heartbeat_interval": 1.0, "stale_after": 5.0, "sweep_interval": 1.0}


# ---------------------------------------------------------------------- measuring one side


def ours_throughput(bench: Bench, queue: str, workflow: str, runs: int) -> float:
    """Start ``runs`` runs (one start_many) and wait for all; steps per second."""
    wf = bench.ours(queue).durable.get_definition(workflow)
    t0 = time.time()
    ids = wf.start_many([{}] * runs)
    deadline = time.monotonic() + 600
    while True:
        done, failed, end = bench.sql(
            "SELECT count(*) FILTER (WHERE status = 'done'), "
            "count(*) FILTER (WHERE status IN ('failed', 'cancelled')), "
            "extract(epoch FROM max(finished_at)) FROM durable_celery.runs "
            "WHERE id = ANY(%s)", (ids,))[0]
        if failed:
            raise RuntimeError(f"{failed} benchmark runs failed")
        if done == runs:
            return runs * 10 / (float(end) - t0)
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done}/{runs} runs done after 600 s")
        time.sleep(POLL)


def theirs_throughput(bench: Bench, queue: str, runs: int) -> float:
    """Publish ``runs`` chains of 10 tasks and wait for every last task; steps per second."""
    app = bench.theirs(queue)
    key = bench.key("tp")
    t0 = time.time()
    for _ in range(runs):
        plain_app.chain10(app, key).apply_async()
    deadline = time.monotonic() + 600
    while bench.redis.llen(key) < runs:
        if time.monotonic() > deadline:
            raise RuntimeError("plain chains did not finish in 600 s")
        time.sleep(POLL)
    end = max(float(v) for v in bench.redis.lrange(key, 0, -1))
    return runs * 10 / (end - t0)


# Benchmark 2: the client learns that a run ended the way a user does, with
# ``durable.wait_result()``, which blocks on LISTEN (the runs_notify_done trigger of the
# schema) instead of polling; the twin's client blocks on BLPOP. Polling would take CPU,
# on two cores, from the worker and Postgres it measures.
def ours_latency(bench: Bench, queue: str, workflow: str) -> float:
    """From before ``start()`` to ``wait_result()`` returning the run's result."""
    durable = bench.ours(queue).durable
    wf = durable.get_definition(workflow)
    t0 = time.time()
    wid = wf.start({})
    durable.wait_result(wid, timeout=30)
    return time.time() - t0


def theirs_latency(bench: Bench, queue: str) -> float:
    app = bench.theirs(queue)
    key = bench.key("lat")
    t0 = time.time()
    plain_app.chain10(app, key).apply_async()
    if bench.redis.blpop([key], timeout=30) is None:
        raise RuntimeError("plain chain did not finish in 30 s")
    return time.time() - t0


# ---------------------------------------------------------------------- 1. throughput


def throughput(bench: Bench) -> None:
    runs = 100 if bench.quick else 500
    for pool, concurrency in (("prefork", 2), ("threads", 8)):
        bench.truncate()
        label = f"{pool} -c {concurrency}"
        with bench.pair(f"tp-{pool}", pool=pool, concurrency=concurrency) as (oq, tq):
            ours_throughput(bench, oq, "chain10", 20)  # warm-up: imports, connections, prepares
            ours_throughput(bench, oq, "chain10_hop", 20)
            theirs_throughput(bench, tq, 20)
            ahead, hop, chain = [], [], []
            for _ in range(bench.repeats):
                ahead.append(ours_throughput(bench, oq, "chain10", runs))
                hop.append(ours_throughput(bench, oq, "chain10_hop", runs))
                chain.append(theirs_throughput(bench, tq, runs))
        bench.report("throughput", f"{runs} x 10 steps", "steps/s", ours=ahead, theirs=chain,
                     variant="run-ahead", pool=label, target=">= 2.0x",
                     check=lambda r: r >= 2.0)
        bench.report("throughput", f"{runs} x 10 steps", "steps/s", ours=hop, theirs=chain,
                     variant="no run-ahead", pool=label, target=">= 0.8x",
                     check=lambda r: r >= 0.8)


# ---------------------------------------------------------------------- 2. latency


def latency(bench: Bench) -> None:
    samples = 5 if bench.quick else 20
    bench.truncate()
    with bench.pair("lat", pool="prefork", concurrency=2) as (oq, tq):
        for _ in range(3):  # warm-up (the waiting process's listener starts here)
            ours_latency(bench, oq, "chain10")
            ours_latency(bench, oq, "chain10_hop")
            theirs_latency(bench, tq)
        ahead, hop, chain = [], [], []
        for _ in range(bench.repeats):
            ahead.append(_median([ours_latency(bench, oq, "chain10") for _ in range(samples)]))
            hop.append(_median([ours_latency(bench, oq, "chain10_hop")
                                for _ in range(samples)]))
            chain.append(_median([theirs_latency(bench, tq) for _ in range(samples)]))
    bench.report("latency", f"10 steps end to end (median of {samples})", "ms", ours=ms(ahead),
                 theirs=ms(chain), variant="run-ahead", pool="prefork -c 2",
                 higher_is_better=False, target="<= 1.0x", check=lambda r: r <= 1.0)
    bench.report("latency", f"10 steps end to end (median of {samples})", "ms", ours=ms(hop),
                 theirs=ms(chain), variant="no run-ahead", pool="prefork -c 2",
                 higher_is_better=False)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def ms(values: list[float]) -> list[float]:
    return [v * 1000 for v in values]


# ---------------------------------------------------------------------- 3. signal to resume


def resume(bench: Bench) -> None:
    samples = 20 if bench.quick else 100
    bench.truncate()
    ours_med, ours_p99, theirs_med, theirs_p99 = [], [], [], []
    with bench.pair("sig", pool="prefork", concurrency=2) as (oq, tq):
        built = bench.ours(oq)
        wf = built.durable.get_definition("resume")
        app = bench.theirs(tq)
        with bench.database.connect() as conn:
            for repeat in range(bench.repeats + 1):  # the first round warms up
                ours, theirs = [], []
                for _ in range(samples):
                    wid = wf.start({})
                    _wait_status(conn, wid, "awaiting")
                    key = f"{built.prefix}:resumed:{wid}"
                    built.durable.signal(wid, "go")
                    t0 = time.time()
                    found = bench.redis.blpop([key], timeout=30)
                    if found is None:
                        raise RuntimeError(f"run {wid} did not resume in 30 s")
                    ours.append(float(found[1]) - t0)

                    key = bench.key("sig")
                    app.tasks["bench.mark"].apply_async(args=[key])
                    t0 = time.time()
                    found = bench.redis.blpop([key], timeout=30)
                    if found is None:
                        raise RuntimeError("plain task did not start in 30 s")
                    theirs.append(float(found[1]) - t0)
                if repeat:
                    ours_med.append(_median(ours) * 1000)
                    ours_p99.append(percentile(ours, 99) * 1000)
                    theirs_med.append(_median(theirs) * 1000)
                    theirs_p99.append(percentile(theirs, 99) * 1000)
    twin = "twin: apply_async() returning -> task starting"
    bench.report("resume", f"signal() -> next step (median of {samples})", "ms", ours=ours_med,
                 theirs=theirs_med, pool="prefork -c 2", higher_is_better=False,
                 target="ours < 5 ms", check=lambda _: _median(ours_med) < 5,
                 extra={"twin": twin})
    bench.report("resume", f"signal() -> next step (p99 of {samples})", "ms", ours=ours_p99,
                 theirs=theirs_p99, pool="prefork -c 2", higher_is_better=False,
                 extra={"twin": twin})


def _wait_status(conn: Any, wid: str, status: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while conn.execute("SELECT status FROM durable_celery.runs WHERE id = %s", (wid,),
                       prepare=True).fetchone()[0] != status:
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {wid} never became {status}")
        time.sleep(0.001)


# ---------------------------------------------------------------------- 4. timer precision


def timers(bench: Bench) -> None:
    samples = 20 if bench.quick else 100
    others = 1000 if bench.quick else 10_000
    spacing = 0.02
    bench.truncate()
    ours_med, ours_p99, theirs_med, theirs_p99 = [], [], [], []
    with bench.pair("timer", pool="prefork", concurrency=2) as (oq, tq):
        wf = bench.ours(oq).durable.get_definition("timer")
        for chunk in range(0, others, 5000):  # sleeping for an hour (their first step is due then)
            wf.start_many([{}] * min(5000, others - chunk), delay=3600)
        app = bench.theirs(tq)
        eta = app.tasks["bench.eta"]
        far = time.time() + 3600
        for _ in range(others):  # Celery's twin: ETA tasks an hour away, held by the worker
            eta.apply_async(args=[bench.key("never"), far], countdown=3600)
        for repeat in range(bench.repeats + 1):
            ids = []
            for _ in range(samples):
                ids.append(wf.start({"sleep": 1.0}))
                time.sleep(spacing)
            key = bench.key("eta")
            for _ in range(samples):
                due = time.time() + 1.0
                eta.apply_async(args=[key, due], eta=_utc(due))
                time.sleep(spacing)
            deadline = time.monotonic() + 120
            while True:
                rows = bench.sql(
                    "SELECT (r.result->>'started')::float8 - extract(epoch FROM h.finished_at) - 1 "
                    "FROM durable_celery.runs AS r JOIN durable_celery.steps AS h "
                    "ON h.run_id = r.id AND h.seq = 1 WHERE r.id = ANY(%s) AND r.status = 'done'",
                    (ids,))
                if len(rows) == samples and bench.redis.llen(key) == samples:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timers: {len(rows)}/{samples} done after 120 s")
                time.sleep(0.5)
            if repeat:
                ours = [float(r[0]) for r in rows]
                theirs = [float(v) for v in bench.redis.lrange(key, 0, -1)]
                ours_med.append(_median(ours) * 1000)
                ours_p99.append(percentile(ours, 99) * 1000)
                theirs_med.append(_median(theirs) * 1000)
                theirs_p99.append(percentile(theirs, 99) * 1000)
    note = {"others_sleeping": others, "twin": "apply_async(eta=now+1s) with the same number "
            "of ETA tasks an hour away"}
    bench.report("timer", f"Sleep(1) overshoot (median of {samples})", "ms", ours=ours_med,
                 theirs=theirs_med, pool="prefork -c 2", higher_is_better=False,
                 target="ours < 5 ms", check=lambda _: _median(ours_med) < 5, extra=note)
    bench.report("timer", f"Sleep(1) overshoot (p99 of {samples})", "ms", ours=ours_p99,
                 theirs=theirs_p99, pool="prefork -c 2", higher_is_better=False,
                 target="ours < 50 ms", check=lambda _: _median(ours_p99) < 50, extra=note)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _utc(epoch: float) -> Any:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc)


# ---------------------------------------------------------------------- 5. recovery


def recovery(bench: Bench) -> None:
    repeats = max(bench.repeats, 1)
    settings = RECOVERY_SETTINGS
    bound = settings["stale_after"] + settings["sweep_interval"]
    bench.truncate()
    ours_times: list[float] = []
    theirs_times: list[float] = []
    for side in ("ours", "theirs"):
        for r in range(repeats):
            queue = bench.queue(f"rec-{side}-{r}")
            victim_label = f"victim-{side}-{r}"
            victim = bench.worker(side, queue, concurrency=1, label=victim_label,
                                  settings=settings,
                                  env={"BENCH_VISIBILITY_TIMEOUT": str(settings["stale_after"])})
            if side == "ours":
                built = bench.ours(queue, settings)
                wid = built.durable.get_definition("hold").start({"victim": victim_label})
                key = f"{built.prefix}:hold:{wid}"
            else:
                key = bench.key("hold")
                bench.theirs(queue).tasks["bench.hold"].apply_async(args=[key, victim_label])
            first = bench.redis.blpop([key], timeout=30)
            if first is None or not _text(first[1]).startswith(victim_label):
                raise RuntimeError(f"recovery: the victim did not start the step ({first})")
            standby = bench.worker(side, queue, concurrency=2, label=f"standby-{side}-{r}",
                                   settings=settings,
                                   env={"BENCH_VISIBILITY_TIMEOUT": str(settings["stale_after"])})
            time.sleep(0.5)
            victim.kill()
            t_kill = time.time()
            again = bench.redis.blpop([key], timeout=60)
            if again is None:
                elapsed = float("inf")
            else:
                label, at = _text(again[1]).split()
                if not label.startswith("standby"):
                    raise RuntimeError(f"recovery: the step restarted on {label}")
                elapsed = float(at) - t_kill
            (ours_times if side == "ours" else theirs_times).append(elapsed)
            standby.stop()
    bench.report("recovery", "SIGKILL -> step running elsewhere", "s", ours=ours_times,
                 theirs=theirs_times, pool="prefork", higher_is_better=False,
                 target=f"<= stale_after + sweep_interval = {bound:.0f} s",
                 check=lambda _: max(ours_times) <= bound,
                 extra={"settings": settings, "twin": "acks_late + reject_on_worker_lost, "
                        f"Redis visibility_timeout = {settings['stale_after']} s "
                        "(inf: not redelivered within 60 s)"})


# ---------------------------------------------------------------------- 7. starts


def starts(bench: Bench) -> None:
    single = 200 if bench.quick else 1000
    bulk = 2000 if bench.quick else 10_000
    bench.truncate()
    oq, tq = bench.queue("starts-d"), bench.queue("starts-p")
    wf = bench.ours(oq).durable.get_definition("chain10")
    task = bench.theirs(tq).tasks["bench.step"]
    wf.start({})
    task.apply_async()
    o1, o2, t1, t2 = [], [], [], []
    for _ in range(bench.repeats):
        t0 = time.perf_counter()
        for _ in range(single):
            wf.start({})
        o1.append(single / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(single):
            task.apply_async()
        t1.append(single / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for offset in range(0, bulk, 1000):
            wf.start_many([{}] * min(1000, bulk - offset))
        o2.append(bulk / (time.perf_counter() - t0))
        app = bench.theirs(tq)
        t0 = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for _ in range(bulk):
                task.apply_async(producer=producer)
        t2.append(bulk / (time.perf_counter() - t0))
    bench.report("starts", f"one by one ({single})", "runs/s", ours=o1, theirs=t1,
                 variant="start()", extra={"twin": "apply_async() of one task"})
    bench.report("starts", f"bulk ({bulk}, 1000 per call)", "runs/s", ours=o2, theirs=t2,
                 variant="start_many()",
                 extra={"twin": "apply_async() of one task, one producer for all"})


# ---------------------------------------------------------------------- 8. memory


def memory(bench: Bench) -> None:
    parked = 10_000 if bench.quick else 100_000
    bench.truncate()
    oq, tq = bench.queue("mem-d"), bench.queue("mem-p")
    ours = bench.worker("ours", oq, pool="prefork", concurrency=2)
    theirs = bench.worker("theirs", tq, pool="prefork", concurrency=2)
    try:
        def settle(worker_rss: Any, queue: str, side: str) -> float:
            # Some work first (so both sides have imported and connected), then sample.
            if side == "ours":
                ours_throughput(bench, queue, "chain10", 100)
            else:
                theirs_throughput(bench, queue, 100)
            time.sleep(3)
            samples = []
            for _ in range(5):
                samples.append(float(worker_rss()))
                time.sleep(0.4)
            return _median(samples)

        before_o = [settle(ours.rss, oq, "ours") for _ in range(bench.repeats)]
        before_t = [settle(theirs.rss, tq, "theirs") for _ in range(bench.repeats)]
        seed_parked(bench, parked)
        app = bench.theirs(tq)
        eta = app.tasks["bench.eta"]
        far = time.time() + 3600
        with app.producer_or_acquire() as producer:
            for _ in range(parked):
                eta.apply_async(args=["never", far], countdown=3600, producer=producer)
        deadline = time.monotonic() + 300
        while bench.redis.llen(tq) and time.monotonic() < deadline:
            time.sleep(1)  # the worker takes every ETA message into memory
        time.sleep(5)  # several coordinator passes over the parked rows
        after_o = [settle(ours.rss, oq, "ours") for _ in range(bench.repeats)]
        after_t = [settle(theirs.rss, tq, "theirs") for _ in range(bench.repeats)]
    finally:
        ours.stop()
        theirs.stop()
    mib = 1024 * 1024
    growth_o = [(a - b) / mib for a, b in zip(after_o, before_o, strict=True)]
    growth_t = [(a - b) / mib for a, b in zip(after_t, before_t, strict=True)]
    noise = (max(before_o) - min(before_o)) / mib
    bench.report("memory", "worker RSS, no parked runs", "MiB", ours=[v / mib for v in before_o],
                 theirs=[v / mib for v in before_t], pool="prefork -c 2",
                 higher_is_better=False)
    bench.report("memory", f"worker RSS, {parked} parked", "MiB", ours=[v / mib for v in after_o],
                 theirs=[v / mib for v in after_t], pool="prefork -c 2",
                 higher_is_better=False,
                 extra={"twin": f"{parked} ETA tasks an hour away"})
    bench.report("memory", f"RSS growth with {parked} parked", "MiB", ours=growth_o,
                 theirs=growth_t, pool="prefork -c 2", higher_is_better=False,
                 target="ours within noise (< 5 MiB)",
                 check=lambda _: _median(growth_o) < max(5.0, 2 * noise),
                 extra={"baseline_spread_mib": noise})


# ---------------------------------------------------------------------- 9. flow control


def _wait_done(bench: Bench, ids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while bench.sql("SELECT count(*) FROM durable_celery.runs WHERE id = ANY(%s) "
                    "AND status <> 'done'", (ids,))[0][0]:
        if time.monotonic() > deadline:
            raise RuntimeError("flow benchmark runs did not finish")
        time.sleep(POLL)


def _commits(bench: Bench) -> int:
    return int(bench.sql("SELECT xact_commit FROM pg_stat_database "
                         "WHERE datname = current_database()")[0][0])


def flow(bench: Bench) -> None:
    """(a) chain10 with a limit on every step that never binds vs chain10: the cost of a
    used limit (an unused one runs no statement). (b) 200 starts under a 50/s limit: the
    rate achieved, and Postgres commits per second while saturated vs idle. (c) 10,000 runs
    of tenant A queued under a per-tenant 100/s limit; tenant B's runs start within their
    own limit (start to step, vs the same with no backlog)."""
    runs = 100 if bench.quick else 300
    bench.truncate()
    bench.sql("TRUNCATE durable_celery.rate_buckets")
    with bench.pair("flow", pool="prefork", concurrency=2) as (oq, _tq):
        ours_throughput(bench, oq, "chain10", 20)
        ours_throughput(bench, oq, "chain10_limited", 20)
        plain, limited = [], []
        for _ in range(bench.repeats):
            plain.append(ours_throughput(bench, oq, "chain10", runs))
            limited.append(ours_throughput(bench, oq, "chain10_limited", runs))
        bench.report("flow", f"{runs} x 10 steps, a limit on each", "steps/s", ours=limited,
                     theirs=plain, variant="non-binding", pool="prefork -c 2",
                     extra={"twin": "the same workflow without a limit"})

        durable = bench.ours(oq).durable
        saturated = durable.get_definition("saturated")
        before, t0 = _commits(bench), time.monotonic()
        time.sleep(2.0)
        idle = (_commits(bench) - before) / (time.monotonic() - t0)
        n = 100 if bench.quick else 200
        before, t0 = _commits(bench), time.monotonic()
        ids = [saturated.start({}) for _ in range(n)]
        _wait_done(bench, ids)
        elapsed = time.monotonic() - t0
        busy = (_commits(bench) - before) / elapsed
        started = sorted(durable.get_workflow(i).result["started"] for i in ids)
        rate = (n - 1) / (started[-1] - started[0])
        bench.report("flow", f"{n} starts under 50/s", "starts/s", ours=[rate],
                     variant="saturated", pool="prefork -c 2", target="<= 50.5",
                     check=lambda r: r <= 50.5)
        bench.report("flow", "Postgres commits/s while saturated", "commits/s", ours=[busy],
                     variant="saturated", pool="prefork -c 2",
                     extra={"idle_commits_per_s": idle, "per_start": busy / rate})

        tenant = durable.get_definition("tenant")
        backlog = 1000 if bench.quick else 10_000

        def b_latency() -> list[float]:
            out = []
            for _ in range(20):
                t = time.time()
                wid = tenant.start({"tenant": "b"})
                durable.wait_result(wid, timeout=30)
                out.append(durable.get_workflow(wid).result["started"] - t)
                time.sleep(0.02)
            return out

        quiet = b_latency()
        for offset in range(0, backlog, 1000):
            tenant.start_many([{"tenant": "a"}] * min(1000, backlog - offset))
        loaded = b_latency()
        bench.report("flow", f"tenant B start->step, A has {backlog:,} queued", "ms",
                     ours=ms(loaded), theirs=ms(quiet), variant="per-key 100/s",
                     pool="prefork -c 2", higher_is_better=False,
                     extra={"twin": "tenant B with no backlog of A"})
        bench.sql("DELETE FROM durable_celery.runs WHERE state ->> 'tenant' = 'a'")
