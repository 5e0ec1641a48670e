"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--only NAME ...]``.

Every benchmark runs our workload and its plain-Celery twin in this one invocation, on the
same broker, pool and machine, repeats, and prints median [min..max] and ours/theirs.
Results are appended to a JSON-lines file (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import scale, services, suites
from benchmarks.harness import Bench

BENCHMARKS: dict[str, str] = {
    "throughput": "1. 500 runs x 10 steps vs 500 chains of 10 tasks (prefork -c 2, threads -c 8)",
    "latency": "2. one 10-step run end to end vs one 10-task chain (median of 20)",
    "resume": "3. durable.signal() returning -> next step starting (median, p99 of 100)",
    "timer": "4. Sleep(seconds=1) overshoot with 10,000 runs sleeping an hour",
    "recovery": "5. SIGKILL a worker mid-step -> step running again elsewhere",
    "scale": "6. throughput with 1,000,000 finished + 100,000 parked runs vs empty; EXPLAIN",
    "starts": "7. runs started per second, one by one and with start_many()",
    "memory": "8. worker RSS with 100,000 parked runs vs none",
    "flow": "9. flow control: a non-binding limit's cost, a saturated limiter, per-key fairness",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                        help="run only this benchmark (repeatable): " + ", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs, samples and repeats (a smoke run, not a measurement)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repetitions per measurement (default 3; 1 with --quick)")
    parser.add_argument("--database-url", default=None,
                        help="an admin Postgres URL (a private database is created and dropped)"
                             f"; env {services.DATABASE_ENV}; default postgres@127.0.0.1:5432, "
                             "else an embedded server")
    parser.add_argument("--broker-url", default=None,
                        help=f"the broker both sides use; env {services.BROKER_ENV}; default the "
                             "Redis below")
    parser.add_argument("--redis-url", default=None,
                        help=f"Redis for timestamps and counters; env {services.REDIS_ENV}; "
                             "default 127.0.0.1:6379, else an embedded server")
    parser.add_argument("--scale-rows", type=int, default=None,
                        help="finished runs seeded by the scale benchmark (default 1,000,000; "
                             "100,000 with --quick)")
    parser.add_argument("--scale-history", type=int, default=10,
                        help="history rows per seeded finished run (default 10)")
    parser.add_argument("--scale-parked", type=int, default=None,
                        help="parked runs seeded by the scale benchmark (default 100,000; "
                             "10,000 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/results.jsonl"),
                        help="JSON-lines file the results are appended to")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, text in BENCHMARKS.items():
            print(f"{name:<11} {text}")
        return 0
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    selected = args.only or list(BENCHMARKS)

    redis_url = services.redis_url(args.redis_url)
    bench = Bench(admin_url=services.admin_url(args.database_url),
                  broker_url=services.broker_url(args.broker_url, redis_url),
                  redis_url=redis_url, out=args.out, quick=args.quick, repeats=repeats)
    rows = args.scale_rows or (100_000 if args.quick else 1_000_000)
    parked = args.scale_parked or (10_000 if args.quick else 100_000)
    runners: dict[str, Callable[[Bench], None]] = {
        "throughput": suites.throughput, "latency": suites.latency, "resume": suites.resume,
        "timer": suites.timers, "recovery": suites.recovery, "starts": suites.starts,
        "memory": suites.memory, "flow": suites.flow,
        "scale": lambda b: scale.scale(b, rows=rows, history=args.scale_history, parked=parked),
    }
    failed = []
    print(f"database {bench.database.name}; broker {bench.broker_url.split('://')[0]}; "
          f"repeats {repeats}; results -> {args.out}; worker logs in {bench.logs}", flush=True)
    print(f"calibration: Postgres {bench.calibration['postgres_commits_per_s']:,} single-row "
          "commits/s on one connection; load average "
          + " ".join(f"{x:.1f}" for x in bench.calibration["load_average"]), flush=True)
    try:
        for name in BENCHMARKS:
            if name not in selected:
                continue
            started = time.monotonic()
            print(f"== {BENCHMARKS[name]}", flush=True)
            try:
                runners[name](bench)
            except Exception as exc:
                failed.append(name)
                traceback.print_exc()
                bench.write({"kind": "error", "invocation": bench.invocation,
                             "benchmark": name, "error": repr(exc)})
            print(f"   ({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        bench.close()
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
