""""Why isn't it running?": what a run waits for, and when that should clear, from one
row of ``storage.flow.EXPLAIN``. Pure: unit-tested without a database.

Each reason is a dict with ``kind``, a human ``message`` and the facts behind it
(names, times as ISO 8601 strings, run ids). The first reason is the one that holds the
run now; the others are what follows (a deadline, say).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from durable_celery.storage.records import TERMINAL, Status


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def _seconds(later: Any, now: Any) -> float | None:
    if isinstance(later, datetime) and isinstance(now, datetime):
        return round((later - now).total_seconds(), 3)
    return None


def _limits(items: Any) -> str:
    names = [f"{i.get('name')}" + (f"[{i.get('key')}]" if i.get("key") else "")
             for i in (items or ()) if isinstance(i, dict)]
    return ", ".join(names) or "?"


def reasons(row: dict[str, Any]) -> list[dict[str, Any]]:
    """What holds the run in ``row`` (see the module doc)."""
    now = row["now"]
    status = row["status"]
    found: list[dict[str, Any]] = []
    if status in TERMINAL:
        found.append({"kind": "finished", "status": status, "at": _iso(row["finished_at"]),
                      "message": f"the run ended {status}"})
        return found
    waiting = row.get("waiting_for") or {}
    if status == Status.EXECUTING or (status == Status.COMPENSATING and row["owner"]):
        if row["owner_alive"]:
            found.append({"kind": "executing", "worker": row["owner"],
                          "since": _iso(row["started_at"]),
                          "message": f"step {row['step']!r} is executing on {row['owner']} "
                                     f"since {_iso(row['started_at'])}"})
        else:
            found.append({"kind": "worker_lost", "worker": row["owner"],
                          "since": _iso(row["started_at"]),
                          "message": f"step {row['step']!r} was claimed by {row['owner']}, "
                                     "whose heartbeat is stale: the reaper will run it again"})
    elif status == Status.AWAITING:
        names = list(row["await_names"] or ())
        mode = "all of" if row["await_all"] else "one of"
        item: dict[str, Any] = {
            "kind": "signal", "names": names, "mode": "all" if row["await_all"] else "any",
            "since": _iso(row["updated_at"]), "deadline": _iso(row["await_deadline"]),
            "pending": sorted(row["pending_signals"] or ())}
        until = f", until {_iso(row['await_deadline'])}" if row["await_deadline"] else ""
        item["message"] = (f"waiting for {mode} signals {names} since "
                           f"{_iso(row['updated_at'])}{until}")
        found.append(item)
    elif status == Status.AWAITING_CHILDREN:
        total, pending = int(row["children_total"] or 0), int(row["children_pending"] or 0)
        found.append({"kind": "children", "pending": pending, "total": total,
                      "message": f"waiting for its children: {pending} of {total} not finished"})
    elif row["held"]:
        if waiting.get("kind") == "singleton" or row["singleton_key"]:
            holder = row["singleton_holder"] or waiting.get("behind")
            found.append({"kind": "singleton", "key": row["singleton_key"], "behind": holder,
                          "message": f"queued behind live run {holder} of singleton key "
                                     f"{row['singleton_key']!r}"})
        else:
            found.append({"kind": "foreach_cap", "parent": row["parent_id"],
                          "message": f"held by its parent {row['parent_id']}'s foreach "
                                     "concurrency cap: it starts when a sibling finishes"})
    elif row["later"]:
        kind = waiting.get("kind")
        due = _iso(row["eligible_at"])
        if kind in ("rate_limit", "throttle"):
            what = "rate-limit token" if kind == "rate_limit" else "throttle slot"
            found.append({"kind": kind, "limits": waiting.get("limits"), "until": due,
                          "message": f"waiting for a {what} of {_limits(waiting.get('limits'))}, "
                                     f"next at {due}"})
        elif kind == "debounce":
            found.append({"kind": "debounce", "key": waiting.get("key"),
                          "starts": waiting.get("starts"), "until": due,
                          "message": f"debouncing key {waiting.get('key')!r} "
                                     f"({waiting.get('starts')} start(s) so far): starts at {due}"
                                     " unless another start pushes it back"})
        elif row["attempt"] and row["last_outcome"] == "retry":
            found.append({"kind": "retry", "attempt": row["attempt"], "until": due,
                          "message": f"retry backoff: attempt {row['attempt'] + 1} of step "
                                     f"{row['step']!r} at {due}"})
        else:
            found.append({"kind": "timer", "until": due, "in_seconds": _seconds(row["eligible_at"], now),
                          "message": f"sleeping until {due}"})
    else:
        # Due now: with a concurrency key another run holds, or its message on its way.
        if row["key_holder"]:
            found.append({"kind": "concurrency_key", "key": row["concurrency_key"],
                          "held_by": row["key_holder"],
                          "message": f"concurrency key {row['concurrency_key']!r} is held by "
                                     f"run {row['key_holder']}"})
        elif row["dispatched_at"] is not None:
            sends = int(row["dispatch_count"] or 0)
            queued: dict[str, Any] = {
                "kind": "queued", "queue": row["queue"], "since": _iso(row["dispatched_at"]),
                "sends": sends, "message": f"its message is on queue {row['queue']!r} since "
                                           f"{_iso(row['dispatched_at'])}"}
            if sends > 1:
                queued["message"] += (f"; overdue: sent {sends} times (no worker took it up"
                                      " in time)")
            found.append(queued)
        else:
            found.append({"kind": "dispatch", "at": _iso(row["dispatch_at"]),
                          "message": f"due; the dispatcher publishes it at "
                                     f"{_iso(row['dispatch_at'])}"})
    if not row["live_workers"] and status not in TERMINAL:
        found.append({"kind": "no_worker",
                      "message": "no live worker: nothing will run it until one starts"})
    if row["deadline_at"] is not None:
        found.append({"kind": "deadline", "at": _iso(row["deadline_at"]),
                      "in_seconds": _seconds(row["deadline_at"], now),
                      "message": f"the run fails if not finished by {_iso(row['deadline_at'])}"})
    return found


def explain(row: dict[str, Any]) -> dict[str, Any]:
    """The ``explain`` object of a run: its position and why it is where it is."""
    found = reasons(row)
    return {"workflow_id": row["id"], "workflow": row["workflow"], "version": row["version"],
            "status": row["status"], "step": row["step"], "attempt": row["attempt"],
            "queue": row["queue"], "summary": found[0]["message"], "reasons": found}
