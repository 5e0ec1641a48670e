"""Errors raised by durable_celery.

Every error derives from :class:`DurableCeleryError`; its docstring is the default message.
Errors that carry data keep it in attributes and survive pickling (Celery moves exceptions
between processes). Errors that must unwind user code (a lost lease) derive from
``BaseException`` so that a step's ``except Exception`` cannot swallow them.
"""

from __future__ import annotations

from typing import Any


class DurableCeleryError(Exception):
    """durable_celery error."""

    status: int = 500

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.details = details
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.details))

    @property
    def body(self) -> dict[str, Any]:
        """A JSON-able description, for HTTP answers and CLI output."""
        return {"error": type(self).__name__, "message": self.message, **_jsonable(self.details)}


def _rebuild(cls: type[DurableCeleryError], message: str, details: dict[str, Any]) -> Any:
    return cls(message, **details)


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else repr(v)
            for k, v in details.items()}


class ConfigurationError(DurableCeleryError):
    """durable_celery is not configured correctly."""


class StorageError(DurableCeleryError):
    """The database could not be reached or refused the statement."""

    status = 503

    @property
    def transient(self) -> bool:
        """True when trying again later may succeed (connection lost, server restarting)."""
        return bool(self.details.get("transient"))


class NotReady(StorageError):
    """durable_celery cannot use its database yet (unreachable, or its schema not migrated);
    it tries again after a backoff (``retry_in`` seconds)."""

    @property
    def transient(self) -> bool:
        return True

    @property
    def retry_in(self) -> float:
        return float(self.details.get("retry_in") or 0.0)


class InvalidArgument(DurableCeleryError, ValueError):
    """Invalid argument."""

    status = 400


class InvalidPayload(InvalidArgument):
    """State, payload or result is not JSON that Postgres can store."""


class UnknownWorkflow(InvalidArgument):
    """No workflow is registered under this name and version."""

    status = 404


class UnknownStep(InvalidArgument):
    """The workflow has no step of this name."""

    status = 404


class InvalidSchedule(InvalidArgument):
    """A cron expression, time zone or catch-up mode is not valid."""


class ScheduleNotFound(DurableCeleryError):
    """No schedule has this name."""

    status = 404


class InvalidOutcome(DurableCeleryError):
    """A step returned something that is not an outcome or JSON."""


class ControlError(DurableCeleryError):
    """A control request (cancel, resume, fork) was refused."""

    status = 400


class InvalidRequest(ControlError, InvalidArgument):
    """The control request is invalid."""

    status = 400


class IdempotencyConflict(ControlError):
    """This request key was already used by another request, or by one that failed."""

    status = 409


class BootstrapError(DurableCeleryError):
    """A preflight check failed."""

    status = 503

    @property
    def check(self) -> str | None:
        found = self.details.get("check")
        return None if found is None else str(found)


class DuplicateWorkflow(ControlError):
    """A live run already holds this key, or this workflow_id is taken."""

    status = 409

    @property
    def existing_id(self) -> str | None:
        found = self.details.get("existing_id")
        return None if found is None else str(found)


class NoTarget(DurableCeleryError):
    """No live run has this workflow_id or key."""

    status = 404


class WorkflowNotFound(ControlError):
    """No run has this workflow_id."""

    status = 404


class WorkflowFailed(DurableCeleryError):
    """The run ended failed."""

    @property
    def error(self) -> Any:
        return self.details.get("error")

    @property
    def run_status(self) -> str:
        """``failed``, ``compensated`` or ``compensation_failed``."""
        return str(self.details.get("run_status") or "failed")


class ScheduleToStartTimeout(DurableCeleryError):
    """A step with ``schedule_to_start`` was not started in time once due: the attempt
    failed without running (``late_by``: seconds past the allowance)."""


class DeadlineExceeded(DurableCeleryError):
    """A run's deadline passed before it finished (the error a run ends with)."""


class Throttled(DurableCeleryError):
    """A start refused by a workflow's ``Throttle(drop=True)``: nothing was stored.
    ``retry_after`` says in how many seconds a start with that key would be accepted."""

    @property
    def retry_after(self) -> float:
        return float(self.details.get("retry_after") or 0.0)


class WorkflowCancelled(DurableCeleryError):
    """The run was cancelled."""


class WaitTimeout(DurableCeleryError, TimeoutError):
    """The run did not finish within the timeout."""


class LeaseLost(BaseException):
    """This worker no longer owns the run: its outcome was dropped."""
