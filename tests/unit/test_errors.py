"""errors: one root, typed subclasses, pickling (Celery moves exceptions between processes)."""

from __future__ import annotations

import inspect
import pickle

import pytest

from durable_celery import errors

ERROR_CLASSES = sorted(
    (cls for _, cls in inspect.getmembers(errors, inspect.isclass)
     if issubclass(cls, errors.DurableCeleryError) and cls.__module__ == errors.__name__),
    key=lambda cls: cls.__name__,
)


def test_the_module_has_the_expected_errors() -> None:
    # Guards the parametrization below against silently testing nothing.
    names = {cls.__name__ for cls in ERROR_CLASSES}
    assert {"DurableCeleryError", "ConfigurationError", "StorageError", "InvalidArgument",
            "InvalidPayload", "UnknownWorkflow", "UnknownStep", "InvalidOutcome",
            "DuplicateWorkflow", "NoTarget", "WorkflowNotFound", "WorkflowFailed",
            "WorkflowCancelled", "WaitTimeout"} <= names


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_pickle_round_trip_keeps_type_message_and_details(cls: type[errors.DurableCeleryError],
                                                          ) -> None:
    original = cls("something went wrong", workflow="shop", attempt=3, extra=[1, {"a": None}])
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is cls
    assert copy.message == "something went wrong"
    assert str(copy) == "something went wrong"
    assert copy.details == {"workflow": "shop", "attempt": 3, "extra": [1, {"a": None}]}
    assert copy.status == original.status
    assert copy.body == original.body


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_default_message_is_the_docstring(cls: type[errors.DurableCeleryError]) -> None:
    error = cls()
    assert error.message == (cls.__doc__ or "").strip()
    assert error.message
    assert pickle.loads(pickle.dumps(error)).message == error.message


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_derives_from_the_root(cls: type[errors.DurableCeleryError]) -> None:
    assert issubclass(cls, errors.DurableCeleryError)
    assert issubclass(cls, Exception)


def test_body_is_jsonable() -> None:
    error = errors.NoTarget("no run", target="order:1", when=object())
    body = error.body
    assert body["error"] == "NoTarget"
    assert body["message"] == "no run"
    assert body["target"] == "order:1"
    assert isinstance(body["when"], str)


@pytest.mark.parametrize("cls, status", [
    (errors.InvalidArgument, 400), (errors.InvalidPayload, 400), (errors.UnknownWorkflow, 404),
    (errors.UnknownStep, 404), (errors.NoTarget, 404), (errors.WorkflowNotFound, 404),
    (errors.DuplicateWorkflow, 409), (errors.StorageError, 503),
    (errors.DurableCeleryError, 500),
])
def test_http_like_statuses(cls: type[errors.DurableCeleryError], status: int) -> None:
    assert cls.status == status


def test_builtin_bases_let_users_catch_the_usual_way() -> None:
    assert issubclass(errors.InvalidArgument, ValueError)
    assert issubclass(errors.InvalidPayload, ValueError)
    assert issubclass(errors.WaitTimeout, TimeoutError)


def test_duplicate_workflow_existing_id() -> None:
    error = errors.DuplicateWorkflow("key taken", existing_id="run-1", key="order:1")
    assert error.existing_id == "run-1"
    assert pickle.loads(pickle.dumps(error)).existing_id == "run-1"


def test_duplicate_workflow_without_an_existing_id() -> None:
    # Store.start raises DuplicateWorkflow(existing_id=None) when a key stays contended.
    # The id must not come back as the string "None", which looks like a real workflow_id.
    error = errors.DuplicateWorkflow("key contended", existing_id=None, key="order:1")
    assert error.existing_id is None


def test_workflow_failed_carries_the_error() -> None:
    error = errors.WorkflowFailed("failed", error={"type": "Fail", "message": "no"})
    assert pickle.loads(pickle.dumps(error)).error == {"type": "Fail", "message": "no"}


def test_lease_lost_is_not_an_exception() -> None:
    assert issubclass(errors.LeaseLost, BaseException)
    assert not issubclass(errors.LeaseLost, Exception)
    assert not issubclass(errors.LeaseLost, errors.DurableCeleryError)
    with pytest.raises(errors.LeaseLost):
        try:
            raise errors.LeaseLost("lost")
        except Exception:  # a user's broad handler must not swallow it
            pytest.fail("except Exception caught LeaseLost")


def test_lease_lost_survives_pickling() -> None:
    copy = pickle.loads(pickle.dumps(errors.LeaseLost("run r1 reclaimed")))
    assert type(copy) is errors.LeaseLost
    assert copy.args == ("run r1 reclaimed",)
