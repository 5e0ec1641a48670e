"""Render a results file as a Markdown table: ``python -m benchmarks.report results.jsonl``
(the last invocation in the file, or ``--invocation ID``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _num(value: Any) -> str:
    if value is None:
        return "never"
    value = float(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _side(side: dict[str, Any] | None) -> str:
    if not side:
        return ""
    return f"{_num(side['median'])} [{_num(side['min'])}..{_num(side['max'])}]"


def render(records: list[dict[str, Any]]) -> str:
    head = next(r for r in records if r["kind"] == "invocation")
    lines = [f"Invocation {head['invocation']} at {head['at']}: {head.get('cpus')} CPUs, "
             f"Python {head['python']}, broker {head['broker']}, repeats {head['repeats']}"
             + (", quick" if head.get("quick") else "")
             + (f"; calibration {head['postgres_commits_per_s']:,} commits/s, load "
                + " ".join(f"{x:.1f}" for x in head["load_average"])
                if "postgres_commits_per_s" in head else ""),
             "",
             "| benchmark | measurement | pool | variant | unit | ours median [min..max] "
             "| theirs median [min..max] | ours/theirs | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] == "result":
            ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
            target = ""
            if "target" in r:
                target = f"{r['target']}: {'met' if r['target_met'] else '**missed**'}"
            lines.append(f"| {r['benchmark']} | {r['metric']} | {r['pool']} | {r['variant']} "
                         f"| {r['unit']} | {_side(r['ours'])} | {_side(r.get('theirs'))} "
                         f"| {ratio} | {target} |")
        elif r["kind"] == "error":
            lines.append(f"| {r['benchmark']} | ERROR: {r['error']} | | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--invocation", default=None)
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line]
    invocations = [r["invocation"] for r in records if r["kind"] == "invocation"]
    if not invocations:
        print("no invocation in this file", file=sys.stderr)
        return 1
    wanted = args.invocation or invocations[-1]
    print(render([r for r in records if r.get("invocation") == wanted]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
