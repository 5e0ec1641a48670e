"""The composition examples run as documented (inline, through the real claim/commit code;
what they would publish is recorded instead of sent)."""

from __future__ import annotations

import importlib
import sys

import pytest

from durable_celery import WorkflowFailed
from durable_celery.testing import drain
from tests.integration.support import Recorder


@pytest.fixture
def example(database_url, redis_url, clean_db, monkeypatch):
    loaded = []

    def load(name):
        monkeypatch.setenv("DURABLE_CELERY_DATABASE_URL", database_url)
        monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
        sys.modules.pop(f"examples.{name}", None)
        module = importlib.import_module(f"examples.{name}")
        Recorder().install(module.durable, monkeypatch)
        loaded.append(module)
        return module

    yield load
    for module in loaded:
        module.durable.close()
        module.app.close()


def test_trip_saga_cancels_hotel_then_flight(example):
    saga = example("trip_saga")
    wid = saga.trip.start({"traveller": "ada", "card": "declined"})
    drain(saga.durable)
    with pytest.raises(WorkflowFailed) as info:
        saga.durable.wait_result(wid, timeout=5)
    assert info.value.run_status == "compensated"
    assert info.value.error["message"] == "payment declined"
    state = saga.durable.get_workflow(wid).state
    assert "flight" not in state and "hotel" not in state
    assert state["flight_cancelled"].startswith("FL-") and state["hotel_cancelled"]
    steps = [(s.step, s.outcome) for s in saga.durable.workflow_steps(wid)]
    assert steps[-2:] == [("cancel_hotel", "compensated"), ("cancel_flight", "compensated")]
    ok = saga.trip.start({"traveller": "bob", "card": "valid"})
    drain(saga.durable)
    assert set(saga.durable.wait_result(ok, timeout=5)) == {"flight", "hotel"}


def test_dashboard_renders_what_came_back(example):
    dash = example("dashboard_parallel")
    wid = dash.dashboard.start({"region": "eu"})
    down = dash.dashboard.start({"region": "us", "tickets_down": True})
    drain(dash.durable)
    assert dash.durable.wait_result(wid, timeout=5) == {
        "region": "eu", "panels": {"sales": 1200, "users": 314, "open_tickets": 7},
        "missing": []}
    result = dash.durable.wait_result(down, timeout=5)
    assert result["panels"] == {"sales": 900, "users": 314}
    assert result["missing"] == ["ticket system unreachable"]


def test_bulk_email_reports_every_recipient(example):
    mail = example("bulk_email")
    recipients = [f"u{i}@example.com" for i in range(30)] + ["nope"]
    wid = mail.campaign.start({"subject": "hi", "recipients": recipients})
    drain(mail.durable)
    assert mail.durable.wait_result(wid, timeout=5) == {"sent": 30, "not_sent": 1}


def test_approval_approve_reject_and_timeout(example):
    ex = example("approval")
    small = ex.approval.start({"amount": 100}, key="expense:1")
    large = ex.approval.start({"amount": 5000}, key="expense:2")
    silent = ex.approval.start({"amount": 100, "deadline": 3600}, key="expense:3")
    drain(ex.durable)
    ex.durable.signal("expense:1", "manager", {"approved": True, "by": "grace"})
    ex.durable.signal("expense:2", "manager", {"approved": True, "by": "grace"})
    drain(ex.durable)
    assert ex.durable.get_workflow(large).status == "awaiting"  # finance has not answered
    ex.durable.signal("expense:2", "finance", {"approved": False, "by": "linus"})
    drain(ex.durable)
    assert ex.durable.wait_result(small, timeout=5) == {"approved": True, "by": ["grace"]}
    assert ex.durable.wait_result(large, timeout=5) == {"approved": False,
                                                        "reason": "rejected by ['finance']"}
    drain(ex.durable, expire_awaits=True)
    assert ex.durable.wait_result(silent, timeout=5) == {
        "approved": False, "reason": "no answer in time from ['manager']"}


def test_flow_control_example_starts_and_explains(example, capsys):
    flow = example("flow_control")
    flow.main()
    out = capsys.readouterr().out
    assert "one sync run: {'" in out and out.count("'") >= 2
    assert "why is the second report waiting? queued behind live run" in out
    drain(flow.durable)
    runs = flow.durable.list_workflows(limit=100)
    assert {r.status for r in runs} == {"done"}
    charged = [r for r in runs if r.workflow == "payments"]
    assert len(charged) == 20
