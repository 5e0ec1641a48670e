"""Where the CPU goes per step: ``python -m benchmarks.cpu [--runs N] [--pool prefork|threads]``.

Runs benchmark 1's workloads (without run-ahead, with run-ahead, the plain chain) once each
on the same machine and prints the CPU time per step of each process group: the worker's
pool processes (child) and its main process (parent), the Postgres backends, Redis and this
client. Read from ``/proc`` via psutil before and after each workload, so whatever else runs
on the machine is listed under ``other``. The figures in docs/performance.md come from it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks import services, suites
from benchmarks.durable_app import STEPS
from benchmarks.harness import Bench


def _snapshot() -> dict[int, tuple[str, str, float]]:
    out: dict[int, tuple[str, str, float]] = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = (proc.info["name"] or "", " ".join(proc.info["cmdline"] or []),
                         times.user + times.system)
    return out


def _groups(before: dict[int, Any], after: dict[int, Any], roles: dict[int, str],
            ) -> dict[str, float]:
    groups: dict[str, float] = {}
    for pid, (name, cmdline, cpu) in after.items():
        spent = cpu - before.get(pid, ("", "", 0.0))[2]
        if spent <= 0:
            continue
        if pid in roles:
            group = roles[pid]
        elif name.startswith("postgres") or cmdline.startswith("postgres"):
            group = "postgres"
        elif "redis" in name:
            group = "redis"
        elif pid == os.getpid():
            group = "client"
        else:
            group = "other"
        groups[group] = groups.get(group, 0.0) + spent
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="runs of 10 steps per workload")
    parser.add_argument("--pool", choices=("prefork", "threads"), default="prefork")
    args = parser.parse_args()
    redis_url = services.redis_url(None)
    bench = Bench(admin_url=services.admin_url(None),
                  broker_url=services.broker_url(None, redis_url), redis_url=redis_url,
                  out=Path(os.devnull), quick=False, repeats=1)
    concurrency = 2 if args.pool == "prefork" else 8
    try:
        with bench.pair("cpu", pool=args.pool, concurrency=concurrency) as (ours_q, theirs_q):
            roles: dict[int, str] = {}
            for worker in bench.workers:
                root = psutil.Process(worker.pid)
                roles[root.pid] = f"{worker.side} parent"
                for child in root.children(recursive=True):
                    roles[child.pid] = f"{worker.side} child"
            suites.ours_throughput(bench, ours_q, "chain10_hop", 20)  # warm-up
            suites.ours_throughput(bench, ours_q, "chain10", 20)
            suites.theirs_throughput(bench, theirs_q, 20)
            steps = args.runs * STEPS
            workloads: tuple[tuple[str, Callable[[], float]], ...] = (
                ("ours, no run-ahead", lambda: suites.ours_throughput(
                    bench, ours_q, "chain10_hop", args.runs)),
                ("ours, run-ahead", lambda: suites.ours_throughput(
                    bench, ours_q, "chain10", args.runs)),
                ("plain chain", lambda: suites.theirs_throughput(bench, theirs_q, args.runs)),
            )
            print(f"CPU ms per step, {args.runs} x 10 steps, {args.pool} -c {concurrency}")
            for label, workload in workloads:
                before, started = _snapshot(), time.perf_counter()
                rate = workload()
                groups = _groups(before, _snapshot(), roles)
                parts = ", ".join(f"{name} {spent * 1000 / steps:.2f}"
                                  for name, spent in sorted(groups.items(), key=lambda g: -g[1]))
                total = sum(groups.values()) * 1000 / steps
                print(f"{label:20} {rate:7.0f} steps/s  total {total:.2f}: {parts}  "
                      f"({time.perf_counter() - started:.1f} s)", flush=True)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
