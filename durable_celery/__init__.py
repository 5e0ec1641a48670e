"""durable_celery: durable workflows on Celery and Postgres."""

from __future__ import annotations

from durable_celery.app import Durable
from durable_celery.definitions import (
    Await,
    ChildSpec,
    Done,
    Fail,
    Next,
    Retry,
    RetryPolicy,
    Sleep,
    Spawn,
    Workflow,
    foreach,
    parallel,
)
from durable_celery.errors import (
    BootstrapError,
    ConfigurationError,
    ControlError,
    DuplicateWorkflow,
    DurableCeleryError,
    IdempotencyConflict,
    InvalidArgument,
    InvalidPayload,
    InvalidRequest,
    InvalidSchedule,
    NoTarget,
    ScheduleNotFound,
    StorageError,
    Throttled,
    UnknownStep,
    UnknownWorkflow,
    WaitTimeout,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowNotFound,
)
from durable_celery.flow import Debounce, RateLimit, Singleton, Throttle
from durable_celery.runtime.context import Context
from durable_celery.storage.records import Child, Run, Signal, SignalResult, StepRecord
from durable_celery.storage.schedules import Schedule
from durable_celery.tasks import TaskHandle

__version__ = "0.1.0"

__all__ = [
    "Await",
    "BootstrapError",
    "Child",
    "ChildSpec",
    "ConfigurationError",
    "Context",
    "ControlError",
    "Debounce",
    "Done",
    "DuplicateWorkflow",
    "Durable",
    "DurableCeleryError",
    "Fail",
    "IdempotencyConflict",
    "InvalidArgument",
    "InvalidPayload",
    "InvalidRequest",
    "InvalidSchedule",
    "Next",
    "NoTarget",
    "RateLimit",
    "Retry",
    "RetryPolicy",
    "Run",
    "Schedule",
    "ScheduleNotFound",
    "Signal",
    "SignalResult",
    "Singleton",
    "Sleep",
    "Spawn",
    "StepRecord",
    "StorageError",
    "TaskHandle",
    "Throttle",
    "Throttled",
    "UnknownStep",
    "UnknownWorkflow",
    "WaitTimeout",
    "Workflow",
    "WorkflowCancelled",
    "WorkflowFailed",
    "WorkflowNotFound",
    "foreach",
    "parallel",
]
