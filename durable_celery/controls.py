"""Cancel, resume and fork runs, idempotently by request key; health and bootstrap checks.

Shared by the Python API (``durable.cancel_workflow`` ...), the by-name Celery tasks
(``durable_celery.cancel_workflow`` ...) and the CLI. Every request names a key; the mutation
and the key's record commit in one transaction, so a retried request replays the stored
response instead of acting twice (see :mod:`durable_celery.storage.controls`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from functools import partial
from typing import Any

from durable_celery import errors, payloads
from durable_celery.checks import MAX_SECONDS, MAX_VERSION, check_identifier, check_request_key
from durable_celery.definitions import Registry
from durable_celery.runtime.publisher import Publisher
from durable_celery.runtime.readiness import Readiness
from durable_celery.storage import migrate as migrate_mod
from durable_celery.storage.controls import ControlOutcome, ControlStore, ForkSource
from durable_celery.storage.engine import EngineHolder

log = logging.getLogger("durable_celery.controls")

MAX_REASON = 2000
MAX_TTL_DAYS = 3650
# Tables the code needs; bootstrap checks them unless told otherwise.
CORE_TABLES = ("schema_version", "runs", "steps", "signals", "workers")
IDEMPOTENCY_TABLE = "control_requests"

_INTEGER = re.compile(r"^\s*[+-]?\d{1,9}\s*$")
_DIGITS = re.compile(r"^\s*([+-]?)(\d+)\s*$")


# ---------------------------------------------------------------------------- validation

def check_workflow_id(value: Any, field: str = "workflow_id") -> str:
    try:
        return check_identifier(value, field)
    except errors.InvalidArgument as exc:
        raise errors.InvalidRequest(exc.message, field=field) from None


def _number(value: Any, field: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise errors.InvalidRequest(f"{field} must be a number in [{low:g}, {high:g}], got "
                                    f"{value!r}"[:300], field=field)
    return float(value)


def parse_start_step(value: Any) -> int:
    """The 1-based step number to fork from; 1 (the original input) when missing, not an
    integer, or <= 1. Integers, integral floats and numeric strings count."""
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, str):
        match = _DIGITS.match(value)
        if match is None:
            return 1
        sign, digits = match.groups()
        if len(digits.lstrip("0")) > 18:  # beyond any history; int() refuses > 4300 digits
            return 1 if sign == "-" else 10**18
        return max(int(sign + digits), 1)
    integral = isinstance(value, int) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer())
    return max(int(value), 1) if integral else 1


def _version(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and _INTEGER.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise errors.InvalidRequest(
            f"application_version must be a workflow version (an int in 1..{MAX_VERSION}), "
            f"got {value!r}"[:300],
            field="application_version")
    return value


# ---------------------------------------------------------------------------- controls

class Controls:
    """The control plane of one Durable: handed the database, the workflow registry (to
    check a fork's version and step), the publisher and readiness."""

    def __init__(self, *, holder: EngineHolder, registry: Registry, publisher: Publisher,
                 readiness: Readiness, redispatch_after: float) -> None:
        self.registry = registry
        self.publisher = publisher
        self.readiness = readiness
        self.store = ControlStore(holder, redispatch_after=redispatch_after)
        self._cleanup_lock = threading.Lock()
        self._last_cleanup: tuple[int, float] | None = None  # (pid, monotonic time)

    # ------------------------------------------------------------------ requests

    def cancel(self, workflow_id: Any, request_key: Any, *, reason: Any = None,
               ttl_days: Any = 7, cleanup_interval_seconds: Any = 300) -> dict[str, Any]:
        key, wid, ttl = self._common(workflow_id, request_key, ttl_days, cleanup_interval_seconds)
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON
                                   or not payloads.storable(reason)):
            raise errors.InvalidRequest(
                f"reason must be a string of at most {MAX_REASON} characters, without NUL or "
                "lone surrogates", field="reason")

        def mutation(conn: Any) -> ControlOutcome:
            changed, wakes = self.store.cancel(conn, wid, reason)
            return ControlOutcome(response=self._response(key, bool(changed)), dispatches=wakes)

        return self._request(key, "cancel", wid, ttl, mutation)

    def resume(self, workflow_id: Any, request_key: Any, *, ttl_days: Any = 7,
               cleanup_interval_seconds: Any = 300) -> dict[str, Any]:
        key, wid, ttl = self._common(workflow_id, request_key, ttl_days, cleanup_interval_seconds)

        def mutation(conn: Any) -> ControlOutcome:
            dispatches = self.store.resume(conn, wid)
            return ControlOutcome(response=self._response(key, dispatches is not None),
                           dispatches=dispatches or [])

        return self._request(key, "resume", wid, ttl, mutation)

    def fork(self, workflow_id: Any, request_key: Any, *, start_step: Any = None,
             new_workflow_id: Any = None, application_version: Any = None, ttl_days: Any = 7,
             cleanup_interval_seconds: Any = 300) -> dict[str, Any]:
        key, wid, ttl = self._common(workflow_id, request_key, ttl_days, cleanup_interval_seconds)
        new_id = None if new_workflow_id is None else check_workflow_id(
            new_workflow_id, "new_workflow_id")
        version = _version(application_version)
        number = parse_start_step(start_step)
        mutation = partial(self._fork, key=key, source_id=wid, new_id=new_id, version=version,
                           number=number)
        return self._request(key, "fork", wid, ttl, mutation)

    def _fork(self, conn: Any, *, key: str, source_id: str, new_id: str | None,
              version: int | None, number: int) -> ControlOutcome:
        source = self.store.fork_source(conn, source_id)
        if source is None:
            raise errors.WorkflowNotFound(f"no run {source_id!r} to fork",
                                          workflow_id=source_id)
        version = source.version if version is None else version
        wf = self._definition(source, version)
        # Completed-step number N (1-based, as workflow_steps lists them): copy the history
        # before it, start from the state before it, run the step it ran. Past the end means
        # the last completed step; no history (or N <= 1) means the original input.
        number = min(number, len(source.history))
        if number >= 2:
            _, step, _ = source.history[number - 1]
            state: Any = source.history[number - 2][2]
            copied = number - 1
        else:
            step, state, copied = self._first_step(source, wf), None, 0
        if wf is not None and step not in wf.steps:
            raise errors.InvalidRequest(
                f"version {version} of workflow {source.workflow!r} has no step {step!r} to "
                f"fork from; its steps: {list(wf.steps)}", field="application_version")
        queue = wf.queue_for(wf.resolve(step), source.run_queue) if wf is not None \
            else (source.run_queue or source.queue)
        dispatch = self.store.fork(
            conn, source_id=source_id, new_id=new_id, version=version, step=step, queue=queue,
            seq=copied, state=json.dumps(state) if copied else None,
            app_version=None if version == source.version else str(version),
            compensations=json.dumps(_compensations(wf, source, copied)))
        if dispatch is None:
            raise errors.DuplicateWorkflow(f"workflow_id {new_id!r} is already in use",
                                           existing_id=new_id)
        response = self._response(key, True)
        response["workflow_id"] = dispatch.workflow_id
        return ControlOutcome(response=response, dispatches=[dispatch])

    def _definition(self, source: ForkSource, version: int) -> Any:
        """The registered workflow the fork runs, when this process knows the workflow."""
        known = self.registry.versions(source.workflow)
        if not known:
            return None  # e.g. the CLI without -A: trust the stored names
        if version not in known:
            raise errors.InvalidRequest(
                f"workflow {source.workflow!r} has no registered version {version}; "
                f"registered: {sorted(known)}", field="application_version")
        return self.registry.get(source.workflow, version)

    @staticmethod
    def _first_step(source: ForkSource, wf: Any) -> str:
        if source.single_step:  # a child that runs one step of its workflow
            return source.history[0][1] if source.history else source.step
        if wf is not None:
            return str(wf.first.name)
        return source.history[0][1] if source.history else source.step

    # ------------------------------------------------------------------ plumbing

    def _common(self, workflow_id: Any, request_key: Any, ttl_days: Any,
                cleanup_interval: Any) -> tuple[str, str, float]:
        key = check_request_key(request_key)
        wid = check_workflow_id(workflow_id)
        ttl = _number(ttl_days, "ttl_days", low=1e-6, high=MAX_TTL_DAYS) * 86400.0
        interval = _number(cleanup_interval, "cleanup_interval_seconds", low=0, high=MAX_SECONDS)
        self.readiness.ensure()
        self._maybe_cleanup(interval)
        return key, wid, ttl

    @staticmethod
    def _response(key: str, changed: bool) -> dict[str, Any]:
        return {"ok": True, "changed": changed, "idempotency_key": key,
                "idempotency_replayed": False}

    def _request(self, key: str, action: str, target: str, ttl: float,
                 mutation: Any) -> dict[str, Any]:
        outcome, replayed = self.store.request(key=key, action=action, target=target,
                                               ttl_seconds=ttl, mutation=mutation)
        if not replayed and outcome.dispatches:
            self.publisher.publish_many(list(outcome.dispatches))
        return dict(outcome.response)

    def _maybe_cleanup(self, interval: float) -> None:
        """Delete expired records at most once per ``interval`` seconds in this process."""
        now, pid = time.monotonic(), os.getpid()
        with self._cleanup_lock:
            last = self._last_cleanup
            if last is not None and last[0] == pid and now - last[1] < interval:
                return
            self._last_cleanup = (pid, now)
        try:
            self.cleanup()
        except errors.StorageError:
            log.warning("could not delete expired control requests", exc_info=True)

    def cleanup(self) -> int:
        """Delete every expired idempotency record (the coordinator's GC also calls this)."""
        total = 0
        while True:
            n = self.store.delete_expired(1000)
            total += n
            if n < 1000:
                return total

    # ------------------------------------------------------------------ preflight

    def health(self) -> dict[str, str]:
        self.store.ping()
        return {"status": "ok"}

    def bootstrap(self, *, check_idempotency_table: bool = True,
                  required_tables: Any = None, strict: bool = False) -> dict[str, Any]:
        tables = _table_names(required_tables)
        checks: list[dict[str, Any]] = []

        def add(name: str, ok: bool | None, message: str, **details: Any) -> bool:
            checks.append({"name": name, "ok": ok, "status": _label(ok), "message": message,
                           "details": details})
            return bool(ok)

        connected = True
        try:
            self.store.ping()
            add("database_connection", True, "connected")
        except errors.StorageError as exc:
            connected = add("database_connection", False, f"cannot connect: {exc.message}")
        if connected:
            expected = migrate_mod.latest_version()
            applied = self.store.applied_versions()
            current = max(applied, default=0)
            if applied == list(range(1, expected + 1)):
                add("schema_version", True, f"schema at version {current}",
                    expected=expected, current=current)
            else:
                hint = "run `durable-celery migrate`" if current < expected else \
                    "this code is older than the database schema"
                add("schema_version", False,
                    f"schema at version {current}, this code expects {expected}: {hint}",
                    expected=expected, current=current, applied=applied)
            missing = self.store.missing_tables(tables)
            add("required_tables", not missing,
                "all required tables present" if not missing
                else f"missing tables: {', '.join(missing)}", missing=missing, required=tables)
            if check_idempotency_table:
                absent = self.store.missing_tables([IDEMPOTENCY_TABLE])
                add("idempotency_table", not absent,
                    "idempotency table present" if not absent
                    else f"missing idempotency table {migrate_mod.SCHEMA}.{IDEMPOTENCY_TABLE}",
                    table=f"{migrate_mod.SCHEMA}.{IDEMPOTENCY_TABLE}")
        else:
            for name in ("schema_version", "required_tables") + (
                    ("idempotency_table",) if check_idempotency_table else ()):
                add(name, None, "skipped: no database connection")
        ok = all(c["ok"] for c in checks)
        report = {"ok": ok, "status": "ok" if ok else "failed", "checks": checks}
        if strict and not ok:
            failed = next(c for c in checks if not c["ok"])
            raise errors.BootstrapError(
                f"bootstrap check {failed['name']} failed: {failed['message']}",
                check=failed["name"], details=failed["details"], checks=checks)
        return report


def _label(ok: bool | None) -> str:
    return "skipped" if ok is None else ("ok" if ok else "failed")


def _table_names(value: Any) -> list[str]:
    if value is None:
        return list(CORE_TABLES)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip()
                                                       for v in value):
        raise errors.InvalidRequest("required_tables must be a list of table names",
                                    field="required_tables")
    return [v.strip() for v in value]


def _compensations(wf: Any, source: ForkSource, copied: int) -> list[dict[str, Any]]:
    """The compensation stack of a fork: the copied steps that completed and declare one."""
    if wf is None:
        return []
    stack = []
    for (seq, step, _), outcome in zip(source.history[:copied], source.outcomes[:copied],
                                       strict=False):
        declared = wf.steps.get(step)
        if declared is not None and declared.compensate is not None \
                and outcome in ("next", "sleep", "await", "spawn"):
            undo = wf.compensations.get(declared.compensate)
            queue = wf.queue_for(undo, source.run_queue) if undo is not None else source.queue
            stack.append({"step": step, "compensation": declared.compensate, "seq": seq,
                          "queue": queue})
    return stack
