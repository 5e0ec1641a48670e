"""The benchmark harness still runs: ``python -m benchmarks.run --only latency --quick``
(real workers of both sides) finishes and writes a result with both sides measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_quick_latency_benchmark_runs(admin_url: str, redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "latency", "--quick",
         "--database-url", admin_url, "--redis-url", redis_url, "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    results = [r for r in records if r["kind"] == "result"]
    assert {r["variant"] for r in results} == {"run-ahead", "no run-ahead"}
    for record in results:
        assert record["benchmark"] == "latency" and record["unit"] == "ms"
        assert 0 < record["ours"]["median"] < 10_000
        assert 0 < record["theirs"]["median"] < 10_000
        assert record["ratio"] == pytest.approx(record["ours"]["median"]
                                                / record["theirs"]["median"])
    assert "ours/theirs" in done.stdout
    assert not [r for r in records if r["kind"] == "error"]


def test_small_scale_benchmark_explains_every_hot_statement(admin_url: str, redis_url: str,
                                                            tmp_path: Path) -> None:
    # The EXPLAIN of benchmark 6 runs every hot statement with made-up parameters: a
    # statement that gains a parameter must not break it (it did once, unnoticed).
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "scale", "--quick",
         "--scale-rows", "2000", "--scale-history", "2", "--scale-parked", "200",
         "--database-url", admin_url, "--redis-url", redis_url, "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=200, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    [plans] = [r for r in records if r["kind"] == "plans"]
    assert {"claim", "commit", "dispatch_due", "reap", "gc"} <= set(plans["plans"])
    assert all(plan.strip() for plan in plans["plans"].values())
    [result] = [r for r in records if r["kind"] == "result"]
    assert result["benchmark"] == "scale" and result["ours"]["median"] > 0
