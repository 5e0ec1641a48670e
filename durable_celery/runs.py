"""Start runs and read them: the domain service behind ``wf.start``, ``wf.start_many``,
``durable.get_workflow``, ``list_workflows``, ``workflow_steps`` and ``wait_result``.

Handed what it uses (store, registry, publisher, readiness, settings, the endings
listener); never the Durable. Starting inside the caller's own transaction (the outbox) is
one helper, :func:`in_callers_transaction`, shared with signals.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from durable_celery import errors, payloads
from durable_celery.checks import (
    MAX_BATCH,
    batch,
    batch_identifiers,
    check_identifier,
    check_key_reuse,
    check_limit,
    check_name,
    check_priority,
    check_seconds,
    check_when,
)
from durable_celery.definitions import Registry, Workflow
from durable_celery.runtime import explain
from durable_celery.runtime.publisher import Publisher
from durable_celery.runtime.readiness import Readiness
from durable_celery.settings import Settings
from durable_celery.storage import flow as storage_flow
from durable_celery.storage import outbox
from durable_celery.storage.flow import NO_POLICY
from durable_celery.storage.listener import Endings
from durable_celery.storage.records import (
    STATUSES,
    TERMINAL,
    Dispatch,
    Run,
    Status,
    StepRecord,
)
from durable_celery.storage.store import Store

SAFETY_POLL = 5.0  # seconds: a waiter reads the status at least this often


def in_callers_transaction(bound: outbox.Bound, apply: Callable[[Any], Any],
                           publish: Callable[[Any], Any],
                           visible: Callable[[Any], Callable[[], bool]]) -> Any:
    """Run ``apply(conn)`` in the caller's transaction (``bound``: their SQLAlchemy
    Connection or Session); if it found something to publish, publish it once the caller
    commits (or the coordinator does, if the caller dies first). ``visible(found)`` tells,
    from another connection, whether that commit happened."""
    with bound.execute() as conn:
        found = apply(conn)
    if found is not None:
        bound.after_commit(lambda: publish(found), visible=visible(found))
    return found


class Runs:
    """Starts and reads the runs of one Durable's workflows."""

    def __init__(self, *, store: Store, registry: Registry, publisher: Publisher,
                 readiness: Readiness, settings: Settings, endings: Endings,
                 url: Any) -> None:
        self.store = store
        self.registry = registry
        self.publisher = publisher
        self.readiness = readiness
        self.settings = settings
        self.endings = endings
        self.url = url

    # ------------------------------------------------------------------ starts

    def start(self, wf: Workflow, state: Any, *, workflow_id: str | None = None,
              key: str | None = None, delay: float | None = None, at: datetime | None = None,
              queue: str | None = None, priority: int | None = None,
              concurrency_key: str | None = None, connection: Any = None,
              what: str = "state", key_reuse: str | None = None,
              deadline: Any = None) -> str:
        if not self.registry.owns(wf):
            raise errors.UnknownWorkflow(f"workflow {wf.name!r} is not registered here")
        first = wf.first
        state = {} if state is None else state
        text = payloads.check_object(state, what=what, max_bytes=self.settings.max_payload_bytes)
        if workflow_id is not None:
            check_identifier(workflow_id, "workflow_id")
        if key is not None:
            check_identifier(key, "key")
        if concurrency_key is not None:
            check_identifier(concurrency_key, "concurrency_key")
        policy = check_key_reuse(key_reuse, self.settings.key_reuse)
        prio = check_priority(priority)
        if queue is not None:
            check_name(queue, "queue")
        check_when(delay, at)
        control = wf.start_policy(state, deadline=deadline,
                                  max_payload_bytes=self.settings.max_payload_bytes)
        bound = None if connection is None else outbox.Bound(connection, self.url)
        self.readiness.ensure()
        options: dict[str, Any] = {
            "workflow": wf.name, "version": wf.version, "step": first.name,
            "queue": wf.queue_for(first, queue), "run_queue": queue, "state": text, "key": key,
            "delay": float(delay or 0.0), "at": at, "priority": prio,
            "concurrency_key": concurrency_key, "key_reuse": policy, "policy": control}
        dispatch = Dispatch(workflow_id="", workflow=wf.name, step=first.name, seq=0,
                            queue=wf.queue_for(first, queue), priority=prio)
        if bound is None:
            run_id, publish = self.store.start(workflow_id=workflow_id, **options)
            if publish:
                self.publisher.publish(replace(dispatch, workflow_id=run_id))
            return run_id
        # In the caller's transaction: published after its commit (or by the coordinator).
        new_id = workflow_id or str(uuid.uuid4())
        started: list[str] = []

        def insert(conn: Any) -> str | None:
            found = self.store.start_on(conn, new_id, parent_id=None, forked_from=None,
                                        app_version=None, redispatch=outbox.OUTBOX_DELAY,
                                        **options)
            if found is None:
                raise errors.DuplicateWorkflow(f"key {key!r} is contended", existing_id=None,
                                               key=key)
            started.append(found[0])
            return found[0] if found[1] else None

        in_callers_transaction(
            bound, insert,
            publish=lambda rid: self.publisher.publish(replace(dispatch, workflow_id=rid)),
            visible=lambda rid: lambda: self.store.exists(rid))
        return started[0]

    def start_many(self, wf: Workflow, states: Any, *, keys: Any = None,
                   workflow_ids: Any = None, delay: float | None = None,
                   at: datetime | None = None, queue: str | None = None,
                   on_conflict: str = "raise", key_reuse: str | None = None) -> list[str]:
        if not self.registry.owns(wf):
            raise errors.UnknownWorkflow(f"workflow {wf.name!r} is not registered here")
        first = wf.first
        if on_conflict not in ("raise", "existing"):
            raise errors.InvalidArgument(
                f"on_conflict must be 'raise' or 'existing', got {on_conflict!r}"[:300])
        items = batch(states, "states")
        if len(items) > MAX_BATCH:
            raise errors.InvalidArgument(f"at most {MAX_BATCH} runs per start_many call, "
                                         f"got {len(items)}")
        texts = [payloads.check_object({} if st is None else st, what=f"state #{i}",
                                       max_bytes=self.settings.max_payload_bytes)
                 for i, st in enumerate(items)]
        key_list = batch_identifiers(keys, "keys", len(items))
        policy = check_key_reuse(key_reuse, self.settings.key_reuse)
        id_list = batch_identifiers(workflow_ids, "workflow_ids", len(items))
        if queue is not None:
            check_name(queue, "queue")
        check_when(delay, at)
        if not items:
            return []
        controls = [wf.start_policy({} if st is None else st,
                                    max_payload_bytes=self.settings.max_payload_bytes)
                    for st in items]
        self.readiness.ensure()
        target_queue = wf.queue_for(first, queue)
        if any(c is not NO_POLICY for c in controls):
            if wf.debounce is not None or wf.singleton is not None:
                raise errors.InvalidArgument(
                    f"start_many cannot start workflow {wf.name!r}: it has debounce= or "
                    "singleton=, which decide one start at a time; call start() per run")
            # Throttles, rate limits, deadlines: each run takes its tokens in order, in one
            # transaction (all or nothing, as start_many always is).
            each_ids, _, to_publish = self.store.start_each(
                workflow=wf.name, version=wf.version, step=first.name, queue=target_queue,
                run_queue=queue, states=texts, keys=key_list, workflow_ids=id_list,
                delay=float(delay or 0.0), at=at, existing=on_conflict == "existing",
                key_reuse=policy, policies=controls)
            self.publisher.publish_many([
                Dispatch(workflow_id=run_id, workflow=wf.name, step=first.name, seq=0,
                         queue=target_queue, priority=0) for run_id in to_publish])
            return each_ids
        run_ids, new, publish = self.store.start_many(
            workflow=wf.name, version=wf.version, step=first.name, queue=target_queue,
            run_queue=queue, states=texts, keys=key_list, workflow_ids=id_list,
            delay=float(delay or 0.0), at=at, existing=on_conflict == "existing",
            key_reuse=policy)
        if publish:
            self.publisher.publish_many([
                Dispatch(workflow_id=run_id, workflow=wf.name, step=first.name, seq=0,
                         queue=target_queue, priority=0) for run_id in new])
        return run_ids

    # ------------------------------------------------------------------ queries

    def get(self, workflow_id: str) -> Run:
        check_identifier(workflow_id, "workflow_id")
        self.readiness.ensure()
        run = self.store.get(workflow_id)
        if run is None:
            raise errors.WorkflowNotFound(f"no run {workflow_id!r}", workflow_id=workflow_id)
        return run

    def list_runs(self, name: str | None = None, status: str | None = None,
             limit: int = 100) -> list[Run]:
        if name is not None:
            check_name(name, "workflow name")
        if status is not None and status not in STATUSES:
            raise errors.InvalidArgument(f"unknown status {status!r}; one of {sorted(STATUSES)}")
        check_limit(limit)
        self.readiness.ensure()
        return self.store.list_runs(workflow=name, status=status, limit=limit)

    def explain(self, workflow_id: str) -> dict[str, Any]:
        check_identifier(workflow_id, "workflow_id")
        self.readiness.ensure()
        row = storage_flow.explain_row(self.store.db, workflow_id,
                                       stale_after=self.settings.stale_after)
        if row is None:
            raise errors.WorkflowNotFound(f"no run {workflow_id!r}", workflow_id=workflow_id)
        return explain.explain(row)

    def history(self, workflow_id: str) -> list[StepRecord]:
        check_identifier(workflow_id, "workflow_id")
        self.readiness.ensure()
        steps = self.store.history(workflow_id)
        if not steps and self.store.get(workflow_id) is None:
            raise errors.WorkflowNotFound(f"no run {workflow_id!r}", workflow_id=workflow_id)
        return steps

    def wait_result(self, workflow_id: str, timeout: float | None = None) -> Any:
        check_identifier(workflow_id, "workflow_id")
        if timeout is not None:
            check_seconds(timeout, "timeout")
        self.readiness.ensure()
        deadline = None if timeout is None else time.monotonic() + timeout
        found = self.store.status(workflow_id)
        pause = 0.005
        while True:
            if found is not None and found[0] in TERMINAL:
                return _outcome(workflow_id, *found)
            with self.endings.watch(workflow_id) as ended:
                # Registered before this read: an end committed after it is not missed.
                found = self.store.status(workflow_id)
                if found is not None and found[0] in TERMINAL:
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if found is None:
                        raise errors.WorkflowNotFound(
                            f"no run {workflow_id!r}" + (
                                f" (none appeared within {timeout}s)" if timeout else ""),
                            workflow_id=workflow_id)
                    raise errors.WaitTimeout(
                        f"run {workflow_id} is still {found[0]} after {timeout}s",
                        workflow_id=workflow_id, status=found[0])
                if found is None or ended is None:
                    # Not started yet, or no listener: look again soon.
                    time.sleep(pause if left is None else min(pause, left))
                    pause = min(pause * 1.5, 0.25)
                else:
                    # Woken by the run's end (or a listener reconnect); a notification
                    # lost anyway costs at most SAFETY_POLL.
                    ended.wait(SAFETY_POLL if left is None else min(left, SAFETY_POLL))
            found = self.store.status(workflow_id)


def _outcome(workflow_id: str, status: str, result: Any, error: Any) -> Any:
    """A terminal run's result, or its failure raised."""
    if status == Status.DONE:
        return result
    if status == Status.CANCELLED:
        raise errors.WorkflowCancelled(f"run {workflow_id} was cancelled",
                                       workflow_id=workflow_id, error=error)
    what = "failed" if status == Status.FAILED else f"failed ({status})"
    raise errors.WorkflowFailed(f"run {workflow_id} {what}: {_describe(error)}",
                                workflow_id=workflow_id, error=error, run_status=status)


def _describe(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)
