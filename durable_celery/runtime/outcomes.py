"""Turn what a step returned (or raised) into a :class:`Transition` to commit.

Pure logic, no I/O: unit-tested without a database.
"""

from __future__ import annotations

import json
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from durable_celery import errors, payloads
from durable_celery.checks import check_seconds, check_signal_name
from durable_celery.definitions import (
    KEEP,
    OUTCOME_TYPES,
    Await,
    ChildSpec,
    Done,
    Fail,
    Next,
    Retry,
    Sleep,
    Spawn,
    Step,
    Workflow,
)
from durable_celery.storage.records import Status, Transition

MAX_TRACEBACK = 8000

@dataclass(frozen=True, slots=True, kw_only=True)
class Visit:
    """The step being decided, as claimed."""

    workflow: Workflow
    step: Step
    attempt: int
    queue: str
    run_queue: str | None
    original_state: Any
    max_payload_bytes: int
    run_ahead: bool       # a Next to a same-queue step may continue in this task
    compensating: bool = False     # ``step`` is a compensation
    compensations: tuple[dict[str, Any], ...] = ()   # the run's stack, top last
    compensation_errors: tuple[Any, ...] = ()
    failure: Any = None            # the failure that started compensating
    single_step: bool = False      # a child of a step function: this step is the last
    key_reuse: str = "reject"      # the key_reuse setting (children with a key)

    def after(self) -> Step | None:
        """The step a plain return goes to (None: the run is done)."""
        return None if self.single_step else self.workflow.after(self.step)

    @property
    def position(self) -> Position:
        wf, run_queue = self.workflow, self.run_queue

        def queue_of(name: str) -> str | None:
            step = wf.compensations.get(name)
            return None if step is None else wf.queue_for(step, run_queue)

        return Position(step=self.step.name, attempt=self.attempt, queue=self.queue,
                        compensating=self.compensating, compensations=self.compensations,
                        compensation_errors=self.compensation_errors, failure=self.failure,
                        queue_of=queue_of)


def _no_queue(name: str) -> str | None:
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Position:
    """Where a run stands when its step (or compensation) ends for good: all the
    compensation transition reads. The executor builds it from the step it ran; the reaper
    from the row of a step whose worker died once too often."""

    step: str
    attempt: int
    queue: str
    compensating: bool = False
    compensations: tuple[dict[str, Any], ...] = ()   # the stack, top last
    compensation_errors: tuple[Any, ...] = ()
    failure: Any = None
    # A compensation's queue from the code, for stack entries that do not carry one.
    queue_of: Callable[[str], str | None] = _no_queue


def error_json(exc: BaseException) -> dict[str, Any]:
    """A storable description of an exception, even one whose ``str()`` raises."""
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__}: str() failed>"
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        tb = ""
    return {"type": payloads.printable(type(exc).__name__, 200),
            "message": payloads.printable(message, 2000),
            "traceback": payloads.printable(tb[-MAX_TRACEBACK:], MAX_TRACEBACK)}


def from_exception(v: Visit, exc: BaseException) -> Transition:
    """A step raised: retry per its policy, else fail. The step's state changes are dropped."""
    error = error_json(exc)
    state = payloads.check(v.original_state, what="state", max_bytes=v.max_payload_bytes)
    attempts = v.attempt + 1
    policy = v.step.retry
    if attempts < policy.max_attempts:
        return Transition(status=Status.COMPENSATING if v.compensating else Status.RUNNABLE,
                          step=v.step.name, queue=v.queue, attempt=attempts,
                          state=state, error=_dumps(error), delay=policy.delay_after(attempts),
                          publish=False, outcome="retry", next_step=v.step.name, consume=False)
    error["attempts"] = attempts
    return _failed(v, state, error)


def invalid(v: Visit, message: str) -> Transition:
    """The step returned something unusable: the run fails (no retry: it would do it again)."""
    state = payloads.check(v.original_state, what="state", max_bytes=v.max_payload_bytes)
    return _failed(v, state, {"type": "InvalidOutcome", "message": message})


def decide(v: Visit, returned: Any, state_after: Any) -> Transition:
    """The transition for a step that returned ``returned`` with ctx.state ``state_after``."""
    try:
        if v.compensating:
            return _decide_compensation(v, returned, state_after)
        t = _decide(v, returned, state_after)
    except errors.DurableCeleryError as exc:
        return invalid(v, exc.message)
    except Exception as exc:  # an outcome holding objects that fail to iterate or print
        return invalid(v, f"the step returned an unusable outcome ({type(exc).__name__}: "
                          f"{_safe_str(exc)})")
    if v.step.compensate is not None and t.outcome in ("next", "sleep", "await", "spawn"):
        # The step completed: its compensation joins the stack (the commit adds its seq),
        # with the queue it runs on (the reaper starts compensations too).
        t = replace(t, comp_push=json.dumps({
            "step": v.step.name, "compensation": v.step.compensate,
            "queue": _compensation_queue(v, v.step.compensate)}))
    return t


def _safe_str(value: Any) -> str:
    try:
        return payloads.printable(str(value), 300)
    except Exception:
        return "<unprintable>"


def _decide(v: Visit, returned: Any, state_after: Any) -> Transition:
    wf, step = v.workflow, v.step
    if not isinstance(returned, OUTCOME_TYPES):
        if returned is None or isinstance(returned, dict):
            new_state = state_after if returned is None else returned
            following = v.after()
            if following is None:
                return _done(v, returned, _state(v, new_state))
            return _next(v, following, _state(v, new_state))
        if v.after() is None:
            return _done(v, returned, _state(v, state_after))
        raise errors.InvalidOutcome(
            f"step {step.name!r} returned a {type(returned).__name__}; a step that is not the "
            "last must return an outcome (Next, Sleep, ...), a dict (the new state) or None"
        )
    state = _state(v, state_after if returned.state is KEEP else returned.state)
    if isinstance(returned, Next):
        if returned.run_ahead is not None and not isinstance(returned.run_ahead, bool):
            raise errors.InvalidOutcome(
                f"Next run_ahead must be True, False or None, got {returned.run_ahead!r}")
        return _next(v, wf.resolve(returned.step), state, returned.run_ahead)
    if isinstance(returned, Done):
        return _done(v, returned.result, state)
    if isinstance(returned, Fail):
        reason = returned.reason
        try:
            payloads.check(reason, what="Fail reason", max_bytes=v.max_payload_bytes)
        except errors.InvalidPayload:
            try:
                reason = payloads.printable(repr(reason), 2000)
            except Exception:
                reason = f"<unprintable {type(reason).__name__}>"
        message = payloads.printable(reason if isinstance(reason, str) else
                                     payloads.check(reason, what="reason", max_bytes=10**7), 2000)
        if reason is None or not message.strip():  # Fail() or Fail(""): say what happened
            message = f"step {v.step.name!r} returned Fail without a reason"
        return _failed(v, state, {"type": "Fail", "message": message, "reason": reason})
    if isinstance(returned, Retry):
        delay = _seconds(returned.delay, "Retry delay")
        return Transition(status=Status.RUNNABLE, step=step.name, queue=v.queue, attempt=v.attempt + 1,
                          state=state, delay=delay, publish=delay == 0, outcome="retry",
                          next_step=step.name, consume=False)
    if isinstance(returned, Sleep):
        target = _following(v, returned.next, "Sleep")
        if (returned.seconds is None) == (returned.until is None):
            raise errors.InvalidOutcome("Sleep needs exactly one of seconds= or until=")
        until: datetime | None = None
        delay = 0.0
        if returned.until is not None:
            if not isinstance(returned.until, datetime) or returned.until.tzinfo is None:
                raise errors.InvalidOutcome("Sleep until= must be a timezone-aware datetime")
            until = returned.until
        else:
            delay = _seconds(returned.seconds, "Sleep seconds")
        return Transition(status=Status.RUNNABLE, step=target.name, queue=_queue(v, target),
                          attempt=0, state=state, delay=delay, until=until,
                          publish=until is None and delay == 0, outcome="sleep",
                          next_step=target.name)
    if isinstance(returned, Await):
        target = _following(v, returned.next, "Await")
        names = signal_names(returned.names)
        deadline = None
        if returned.timeout is not None:
            deadline = _seconds(returned.timeout, "Await timeout")
        return Transition(status=Status.AWAITING, step=target.name, queue=_queue(v, target),
                          attempt=0, state=state, await_names=names, deadline=deadline,
                          outcome="await", next_step=target.name,
                          await_all=returned.mode == "all")
    if isinstance(returned, Spawn):
        target = _following(v, returned.next, "Spawn")
        if not returned.children:  # nothing to wait for: continue at once
            return replace(_next(v, target, state), outcome="spawn")
        rows, count = _children(v, returned, state)
        return Transition(status=Status.AWAITING_CHILDREN, step=target.name,
                          queue=_queue(v, target), attempt=0, state=state, outcome="spawn",
                          next_step=target.name, children=rows, children_count=count,
                          spawn_cap=returned.concurrency)
    raise AssertionError(f"unhandled outcome {returned!r}")  # pragma: no cover


def signal_names(names: Any) -> list[str]:
    """Validate one signal name or a collection of them; returns a sorted unique list."""
    items = [names] if isinstance(names, str) else names
    try:
        collected = list(items)
    except TypeError:
        raise errors.InvalidArgument(f"signal names must be a string or strings, got {names!r}") \
            from None
    if not collected:
        raise errors.InvalidArgument("Await needs at least one signal name")
    for name in collected:
        check_signal_name(name)
    return sorted(set(collected))


def _seconds(value: Any, what: str) -> float:
    return check_seconds(value, what, errors.InvalidOutcome)


def _following(v: Visit, target: Any, what: str) -> Step:
    if target is not None:
        return v.workflow.resolve(target)
    following = v.after()
    if following is None:
        raise errors.InvalidOutcome(
            f"{what} from the last step {v.step.name!r} needs next= (no step follows it)"
        )
    return following


def _queue(v: Visit, step: Step) -> str:
    return v.workflow.queue_for(step, v.run_queue)


def _state(v: Visit, state: Any) -> str:
    return payloads.check_object(state, what="state", max_bytes=v.max_payload_bytes)


def _next(v: Visit, target: Step, state: str, run_ahead: bool | None = None) -> Transition:
    queue = _queue(v, target)
    allowed = _ahead_allowed(v.workflow, target) if run_ahead is None else run_ahead
    # A step with time limits is always a task of its own: its message carries them.
    limited = target.time_limit is not None or target.soft_time_limit is not None
    ahead = v.run_ahead and queue == v.queue and allowed and not limited
    return Transition(status=Status.EXECUTING if ahead else Status.RUNNABLE, step=target.name,
                      queue=queue, attempt=0, state=state, publish=not ahead, outcome="next",
                      next_step=target.name)


def _ahead_allowed(wf: Workflow, target: Step) -> bool:
    if target.run_ahead is not None:
        return target.run_ahead
    return wf.run_ahead is not False


def _done(v: Visit, result: Any, state: str) -> Transition:
    text = payloads.check(result, what="result", max_bytes=v.max_payload_bytes)
    return Transition(status=Status.DONE, step=v.step.name, queue=v.queue, attempt=v.attempt,
                      state=state, result=text, outcome="done", next_step=None)


def _failed(v: Visit, state: str, error: dict[str, Any]) -> Transition:
    return failed(v.position, state, error)


def _dumps(value: Any) -> str:
    return payloads.check(value, what="error", max_bytes=10**7)


# ----------------------------------------------------------------------------- Spawn


def _resolve_child(v: Visit, target: Any) -> tuple[Workflow, Step]:
    """The registered workflow (and first step) a child spec names."""
    registry = v.workflow.owner.registry
    if isinstance(target, Workflow):
        if not registry.owns(target):
            raise errors.UnknownWorkflow(
                f"cannot spawn workflow {target.name!r} v{target.version}: it is not "
                "registered with this Durable", workflow=target.name)
        target.check()
        return target, target.first
    found = registry.step_of(target)
    if found is not None:
        found[0].check()
        return found
    label = getattr(target, "__name__", repr(target))
    raise errors.UnknownWorkflow(
        f"cannot spawn {label!r}: it is not a step of a registered workflow (declare it with "
        "@wf.step on a workflow of this Durable)", workflow=str(label)[:200])


def _children(v: Visit, spawn: Spawn, parent_state: str) -> tuple[str, int]:
    """The JSON rows of a Spawn's children (states are embedded as checked JSON text)."""
    cap = spawn.concurrency
    ids: set[str] = set()
    keys: set[str] = set()
    parts: list[str] = []
    for index, item in enumerate(spawn.children):
        spec = item if isinstance(item, ChildSpec) else ChildSpec(target=item)
        wf, step = _resolve_child(v, spec.target)
        if spec.state is KEEP:
            state = parent_state
        else:
            state = payloads.check_object(spec.state, what=f"child {index} state",
                                          max_bytes=v.max_payload_bytes)
        workflow_id = spec.workflow_id or str(uuid.uuid4())
        if workflow_id in ids:
            raise errors.InvalidOutcome(f"Spawn names workflow_id {workflow_id!r} twice")
        ids.add(workflow_id)
        if spec.key is not None:
            if spec.key in keys:
                raise errors.InvalidOutcome(f"Spawn names key {spec.key!r} twice")
            keys.add(spec.key)
        head = {"id": workflow_id, "workflow": wf.name, "version": wf.version,
                "queue": wf.queue_for(step, spec.queue), "run_queue": spec.queue,
                "step": step.name, "key": spec.key, "idx": index,
                "key_reuse": spec.key_reuse or v.key_reuse,
                "held": cap is not None and index >= cap,
                "single": not isinstance(spec.target, Workflow)}
        parts.append(json.dumps(head)[:-1] + ', "state": ' + state + "}")
    return "[" + ",".join(parts) + "]", len(parts)


# ----------------------------------------------------------------------------- compensation


def _decide_compensation(v: Visit, returned: Any, state_after: Any) -> Transition:
    """A compensation returned: None or a dict (new state) or Done mean undone; Retry runs
    it again; Fail records its error. Either way the next compensation follows."""
    if isinstance(returned, OUTCOME_TYPES):
        state = _state(v, state_after if returned.state is KEEP else returned.state)
    else:
        state = _state(v, returned if isinstance(returned, dict) else state_after)
    if isinstance(returned, Retry):
        delay = _seconds(returned.delay, "Retry delay")
        return Transition(status=Status.COMPENSATING, step=v.step.name, queue=v.queue,
                          attempt=v.attempt + 1, state=state, delay=delay, publish=delay == 0,
                          outcome="retry", next_step=v.step.name, consume=False)
    if isinstance(returned, Fail):
        reason = returned.reason
        message = reason if isinstance(reason, str) else repr(reason)
        return compensation_done(v.position, state, {"type": "Fail",
                                             "message": payloads.printable(message, 2000)})
    if isinstance(returned, OUTCOME_TYPES) and not isinstance(returned, Done):
        raise errors.InvalidOutcome(
            f"compensation {v.step.name!r} returned {type(returned).__name__}; a compensation "
            "returns None, a dict (the new state), Done, Retry or Fail")
    return compensation_done(v.position, state, None)


# ----------------------------------------------------------------------------- the compensation transition
#
# Its one owner. A step that fails for good starts undoing the completed steps (newest
# first) or fails the run; a compensation that is over (undone, or failed for good) hands
# on to the next one, or ends the run compensated / compensation_failed. The executor comes
# here for a step that raised or returned Fail; the reaper for a step whose worker died
# max_recoveries times (committed through the same guarded COMMIT).


def failed(p: Position, state: str, error: dict[str, Any]) -> Transition:
    """The step at ``p`` failed for good with ``error``."""
    if p.compensating:
        return compensation_done(p, state, error)
    if p.compensations:  # completed steps have compensations: undo them, newest first
        top = p.compensations[-1]
        name = str(top["compensation"])
        text = _dumps(error)
        return Transition(status=Status.COMPENSATING, step=name, queue=_entry_queue(p, top),
                          attempt=0, state=state, error=text, failure=text, publish=True,
                          outcome="fail", next_step=name, compensation_errors="[]")
    # The signals this visit saw stay delivered (not consumed), and its timeout stays: a
    # resumed run runs this step again as the same visit and sees them again.
    return Transition(status=Status.FAILED, step=p.step, queue=p.queue, attempt=p.attempt,
                      state=state, error=_dumps(error), outcome="fail", next_step=None,
                      consume=False)


def compensation_done(p: Position, state: str, error: dict[str, Any] | None) -> Transition:
    """The compensation at ``p`` is over (undone, or failed for good with ``error``): pop
    it; run the next one, or end ``compensated`` (error = the original failure) or
    ``compensation_failed``."""
    stack = list(p.compensations)
    if stack:
        stack.pop()
    errs = list(p.compensation_errors)
    if error is not None:
        errs.append({**error, "compensation": p.step, "attempts": p.attempt + 1})
    outcome = "compensation_failed" if error is not None else "compensated"
    failure = p.failure
    if stack:
        following = str(stack[-1]["compensation"])
        return Transition(status=Status.COMPENSATING, step=following,
                          queue=_entry_queue(p, stack[-1]), attempt=0, state=state,
                          error=_dumps(failure), publish=True, outcome=outcome,
                          next_step=following, compensations=_dumps(stack),
                          compensation_errors=_dumps(errs))
    if errs:
        summary = failure.get("message") if isinstance(failure, dict) else failure
        final: Any = {"type": "CompensationFailed",
                      "message": f"{len(errs)} compensation(s) failed after: {summary}"[:2000],
                      "failure": failure, "compensation_errors": errs}
        status = Status.COMPENSATION_FAILED
    else:
        final, status = failure, Status.COMPENSATED
    return Transition(status=status, step=p.step, queue=p.queue, attempt=p.attempt,
                      state=state, error=_dumps(final), outcome=outcome, next_step=None,
                      compensations="[]", compensation_errors=_dumps(errs))


def _entry_queue(p: Position, entry: dict[str, Any]) -> str:
    """A stack entry's queue (pushed with it), else the code's, else the run's."""
    queue = entry.get("queue") or p.queue_of(str(entry["compensation"]))
    return str(queue) if queue else p.queue


def _compensation_queue(v: Visit, name: str) -> str:
    return v.position.queue_of(name) or v.queue
