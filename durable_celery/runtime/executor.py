"""Execute one message: claim, run the step outside any transaction, commit, run ahead."""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

from durable_celery import errors
from durable_celery.definitions import Registry, Workflow
from durable_celery.runtime import limits, outcomes
from durable_celery.runtime.context import Context
from durable_celery.runtime.hooks import Hooks
from durable_celery.runtime.publisher import Publisher
from durable_celery.runtime.readiness import Readiness
from durable_celery.runtime.worker import ProcessIdentity
from durable_celery.settings import Settings
from durable_celery.storage.records import Claim, Committed, Dispatch, Status, Transition
from durable_celery.storage.store import Store
from durable_celery.storage.sweeps import CLAIM_AHEAD, TAKE_UP_EARLY

log = logging.getLogger("durable_celery.runtime")

EARLY_TRIES = 3
HOLD_CHECK_AHEAD = 0.005  # seconds before the due time an early claim checks it still holds
MAX_COUNTDOWN = 60.0  # a message held by a worker longer than this is sent again
COMMIT_RETRIES = (0.05, 0.25, 1.0, 2.0)
# A rate-limit slot at most this many seconds away is waited for in the task; a later one
# parks the run as a timer.
PARK_AFTER = 0.05


class Executor:
    """Runs the steps of one Durable's workflows in this process.

    Handed what it uses: the run store, the workflow registry, the publisher, this
    process's identity, readiness (migrations once per process), the settings and the
    hooks (every decision is reported to ``hooks.event``; the step runs inside
    ``hooks.run_step``).
    """

    def __init__(self, *, store: Store, registry: Registry, publisher: Publisher,
                 identity: ProcessIdentity, readiness: Readiness, settings: Settings,
                 hooks: Hooks) -> None:
        self.store = store
        self.registry = registry
        self.publisher = publisher
        self.identity = identity
        self.readiness = readiness
        self.settings = settings
        self.hooks = hooks

    def execute(self, workflow_id: Any, seq: Any, *, early: bool = False,
                run_ahead: bool = True) -> str:
        """Handle the message "run the current step of ``workflow_id`` at ``seq``".

        ``early``: the message was published ahead of the step's due time (a timer, see
        ``timer_lead``) and held by the worker until then. ``run_ahead``: whether this task may
        run further steps itself (not under a Celery time limit). Returns what happened: ``"stale"``
        (dropped), ``"committed"``, ``"lease_lost"``, ``"released"`` (this process lacks the
        workflow version), ``"early"`` (sent again for later), ``"rate_limited"`` (parked as
        a timer until its rate-limit slot) or ``"bad_message"``.
        """
        if not isinstance(workflow_id, str) or isinstance(seq, bool) or not isinstance(seq, int):
            self.hooks.event("bad_message", None)
            log.error("dropping a malformed durable message: %r, %r", workflow_id, seq)
            return "bad_message"
        self.readiness.ensure(wait=False)
        worker_id = self.identity.get().ensure()
        claimed = self._claim(workflow_id, seq, worker_id)
        if claimed is None and early:
            resent, claimed = self._claim_when_due(workflow_id, seq, worker_id)
            if resent:
                return "early"
        if claimed is None:
            self.hooks.event("stale", None)
            return "stale"
        claim, started_at = claimed
        return self.run_claimed(claim, worker_id, started_at, run_ahead=run_ahead)


    def _claim(self, workflow_id: str, seq: int, worker_id: str,
               ) -> tuple[Claim, datetime] | None:
        lease = uuid.uuid4().hex
        try:
            return self.store.claim(workflow_id, seq, worker_id, ahead=CLAIM_AHEAD, lease=lease)
        except errors.StorageError as exc:
            if exc.transient:
                # The claim may have committed with its answer lost on the way back: the run
                # would then stay executing under this live process. The heartbeat thread
                # releases it by this lease once the database answers (a no-op if it never
                # landed). Either way the message is gone: the run is then published again.
                self.identity.get().orphan_lease(workflow_id, lease, resend=True)
            raise




    def _claim_when_due(self, workflow_id: str, seq: int, worker_id: str,
                        ) -> tuple[bool, tuple[Claim, datetime] | None]:
        """A timer's message arrived before the step is due by the database's clock (this
        host's clock runs ahead of it, or the eta fired a little early): wait out a short
        remainder and claim; send a long one again with that countdown. Returns (sent again,
        the claim)."""
        for _ in range(EARLY_TRIES):
            wait = self.store.seconds_until_eligible(workflow_id, seq)
            if wait is None:
                return False, None  # due now (the claim lost for another reason), or not runnable
            if wait > 4 * CLAIM_AHEAD:  # never hold a pool slot long: send it again for later
                self.hooks.event("early", None)
                row = self.store.get(workflow_id)
                if row is not None and row.seq == seq:
                    eta = time.time() + min(wait, MAX_COUNTDOWN) - TAKE_UP_EARLY
                    self.publisher.publish(Dispatch(workflow_id=workflow_id, workflow=row.workflow,
                                              step=row.step, seq=seq, queue=row.queue,
                                              priority=row.priority, eta=eta))
                return True, None
            time.sleep(max(wait - CLAIM_AHEAD / 2, 0.0))
            claimed = self._claim(workflow_id, seq, worker_id)
            if claimed is not None:
                return False, claimed
        return False, None


    def run_claimed(self, claim: Claim, worker_id: str, started_at: Any, *,
                    run_ahead: bool = True) -> str:
        """Run steps under ``claim`` until one parks, finishes or leaves this queue.

        Whatever escapes (a step raising BaseException, a soft time limit during the commit,
        the worker shutting down), the claim is handed back first, so the run never waits on a
        live process that stopped working on it.
        """
        holder = [claim]
        try:
            if claim.due_in > 0:
                # A timer claimed just ahead of its due time: start it on the dot, never before,
                # and not at all if it was cancelled (or released) meanwhile. The check runs a
                # few milliseconds before the due time, so its round trip adds no overshoot.
                # (A claim within HOLD_CHECK_AHEAD of the due time is as good as at it.)
                start_at = time.monotonic() + claim.due_in
                if claim.due_in > HOLD_CHECK_AHEAD:
                    time.sleep(claim.due_in - HOLD_CHECK_AHEAD)
                    if not self.store.holds(claim.workflow_id, claim.lease):
                        self.hooks.event("lease_lost", claim)
                        return "lease_lost"
                time.sleep(max(start_at - time.monotonic(), 0.0))
            return self._run_claimed(holder, worker_id, started_at, run_ahead)
        except BaseException:
            self.hooks.event("abandoned", holder[0])
            log.error("run %s step %s: execution interrupted; handing the run back",
                      holder[0].workflow_id, holder[0].step, exc_info=True)
            try:
                self.store.release(holder[0], after=0.0)
            except Exception:
                self.identity.get().orphan(holder[0])
            raise


    def _run_claimed(self, holder: list[Claim], worker_id: str, started_at: Any,
                     run_ahead: bool) -> str:
        claim = holder[0]
        settings = self.settings
        chain = 0
        while True:
            wf = self.registry.find(claim.workflow, claim.version)
            step = None
            if wf is not None:
                steps = wf.compensations if claim.compensating else wf.steps
                step = steps.get(claim.step)
            if wf is None or step is None:
                # Another deployment's version or a renamed step: give the run back, untouched.
                self.hooks.event("released", claim)
                log.error("workflow %s v%s step %s is not registered in this process; releasing "
                          "run %s", claim.workflow, claim.version, claim.step, claim.workflow_id)
                self.store.release(claim, after=settings.redispatch_after)
                return "released"
            chain += 1
            visit = outcomes.Visit(
                workflow=wf, step=step, attempt=claim.attempt, queue=claim.queue,
                run_queue=claim.run_queue, original_state=claim.state,
                max_payload_bytes=settings.max_payload_bytes,
                run_ahead=run_ahead and settings.run_ahead and chain < settings.run_ahead_limit
                and not claim.compensating and not limits.stopping(),
                compensating=claim.compensating, compensations=claim.compensations,
                compensation_errors=claim.compensation_errors, failure=claim.failure,
                single_step=claim.single_step, key_reuse=settings.key_reuse,
            )
            transition = self._late(visit, claim, chain)
            if transition is None:
                gated = self._take_tokens(wf, visit, claim)
                if isinstance(gated, str):
                    return gated
                transition = gated if gated is not None else self._run_step(visit, claim)
            try:
                committed = self._commit(visit, claim, transition, worker_id, started_at)
            except errors.StorageError:
                # The database stayed unreachable: hand the claim to the heartbeat thread, which
                # releases it once the database answers (the step then runs again).
                self.hooks.event("commit_failed", claim)
                log.error("run %s step %s: could not commit the outcome; the step will run again",
                          claim.workflow_id, claim.step, exc_info=True)
                self.identity.get().orphan(claim)
                return "commit_failed"
            if committed is None:
                self.hooks.event("lease_lost", claim)
                log.warning("run %s step %s: lease lost (cancelled or reclaimed); outcome dropped",
                            claim.workflow_id, claim.step)
                return "lease_lost"
            self.hooks.event("steps", claim)  # a step committed
            if committed.dispatch is not None:
                self.publisher.publish(committed.dispatch)
            if committed.wakes:
                self.publisher.publish_many(list(committed.wakes))
            if committed.status != Status.EXECUTING:
                return "committed"
            # Run-ahead: the commit kept our claim on the next step; continue without a hop.
            self.hooks.event("run_ahead", claim)
            claim = holder[0] = replace(
                claim, step=transition.step, seq=committed.seq, visit=committed.seq, attempt=0,
                state=json.loads(transition.state), timed_out=False, signals=(), children=(),
                compensations=_pushed(claim.compensations, transition, committed.seq))
            started_at = None


    def _late(self, visit: outcomes.Visit, claim: Claim, chain: int) -> Transition | None:
        """A step with ``schedule_to_start`` that waited longer than that, once due, for a
        worker (its message queued behind others, or no worker up): it does not run. The
        attempt fails (the retry policy decides) or, with ``on_late="skip"``, the run goes
        on as if the step returned None. A step reached by run-ahead is never late."""
        step = visit.step
        if step.schedule_to_start is None or chain > 1 or claim.compensating:
            return None
        late_by = -claim.due_in
        if late_by <= step.schedule_to_start:
            return None
        self.hooks.event("late", claim)
        log.warning("run %s step %s: not started within schedule_to_start=%ss of being due "
                    "(%.3fs late); %s", claim.workflow_id, claim.step, step.schedule_to_start,
                    late_by, "skipped" if step.on_late == "skip" else "the attempt fails")
        if step.on_late == "skip":
            return outcomes.decide(visit, None, claim.state)
        return outcomes.from_exception(visit, errors.ScheduleToStartTimeout(
            f"step {claim.step!r} was not started within {step.schedule_to_start}s of being "
            f"due ({late_by:.3f}s late)", late_by=late_by))

    def _take_tokens(self, wf: Workflow, visit: outcomes.Visit, claim: Claim,
                     ) -> str | Transition | None:
        """The step's rate limits: take a token from each (one statement). A slot a little
        ahead is slept out here; a later one parks the run as a timer until then (this
        message is done: ``"rate_limited"``). Returns None to run the step now, a label to
        return, or the transition of a key function that raised (the attempt fails)."""
        if not (wf.rate_limits or visit.step.rate_limits) or claim.compensating \
                or claim.has_tokens:
            return None  # the common case: no limit, no statement, no allocation
        try:
            buckets = wf.buckets_for(visit.step, claim.state)
        except errors.InvalidArgument as exc:
            return outcomes.from_exception(visit, exc)
        taken = self.store.take_tokens(claim, buckets, park_after=PARK_AFTER)
        if taken is None:
            self.hooks.event("lease_lost", claim)
            return "lease_lost"
        wait, parked = taken
        if parked:
            self.hooks.event("rate_limited", claim)
            if claim.concurrency_key is not None:
                self.store.hand_off(claim.concurrency_key)
            return "rate_limited"
        if wait > 0:
            time.sleep(wait)
        return None

    def _commit(self, visit: outcomes.Visit, claim: Claim, transition: Transition,
                worker_id: str, started_at: Any) -> Committed | None:
        """Commit, retrying while the database is briefly unreachable.

        A retry after an unknown result is safe: the guard (lease + seq) makes a second apply
        impossible; if the first attempt did commit, the retry finds nothing and returns None,
        and the next step's message comes from the dispatcher's redispatch. An outcome that
        Postgres refuses as data (it should not happen: values are checked first) fails the run
        with the database's message instead of wedging it.
        """
        uncertain = False
        pauses = iter(COMMIT_RETRIES)
        while True:
            try:
                try:
                    committed = self.store.commit(claim, transition, worker=worker_id,
                                                     started_at=started_at)
                except errors.DuplicateWorkflow as exc:  # a Spawn's child id or key is taken
                    # Not a failure to reach the database: no retry pause is used up. The
                    # invalid outcome spawns nothing, so this happens once.
                    transition = outcomes.invalid(visit, exc.message)
                    continue
                if committed is None and uncertain:
                    # The connection may have dropped after the server committed: if so, the
                    # history row is ours and we carry on from what was committed.
                    committed = self.store.landed(claim, worker_id)
                return committed
            except errors.StorageError as exc:
                if not exc.transient:
                    log.error("run %s step %s: outcome refused by the database: %s",
                              claim.workflow_id, claim.step, exc.message)
                    transition = outcomes.invalid(visit, f"outcome could not be stored: {exc.message}")
                    return self.store.commit(claim, transition, worker=worker_id,
                                                started_at=started_at)
                pause = next(pauses, None)
                if pause is None:
                    raise
                uncertain = True
                time.sleep(pause)


    def _run_step(self, visit: outcomes.Visit, claim: Claim) -> Any:
        ctx = Context(
            workflow_id=claim.workflow_id, workflow=claim.workflow, version=claim.version,
            step=claim.step, state=copy.deepcopy(claim.state),
            attempt=claim.attempt, seq=claim.seq, key=claim.key, timed_out=claim.timed_out,
            signals=claim.signals, children=claim.children, compensating=claim.compensating,
            failure=claim.failure,
            idempotency_key=f"{claim.workflow_id}:{claim.step}:{claim.visit}",
        )
        # ctx gets a copy: a step that raises after mutating ctx.state retries from the
        # committed state (visit.original_state).
        try:
            returned = self.hooks.run_step(claim, lambda: visit.step.fn(ctx))
        except errors.LeaseLost:
            raise
        except Exception as exc:
            self.hooks.event("step_errors", claim)
            log.info("run %s step %s attempt %s raised %r", claim.workflow_id, claim.step,
                     claim.attempt, exc)
            return outcomes.from_exception(visit, exc)
        return outcomes.decide(visit, returned, ctx.state)


def _pushed(stack: tuple[dict[str, Any], ...], transition: Transition, seq: int,
            ) -> tuple[dict[str, Any], ...]:
    """The compensation stack after a run-ahead commit (as the commit wrote it)."""
    if transition.comp_push is None:
        return stack
    return (*stack, {**json.loads(transition.comp_push), "seq": seq})
