"""Human input: an expense waits for a manager's decision, with a deadline; no answer in
time is a rejection. Large expenses need both the manager and finance (Await mode="all").

Run a worker:     celery -A examples.approval worker --loglevel=INFO
Request one:      python -m examples.approval

Your web app answers with a signal (e.g. from the manager's "approve" button):
    durable.signal("expense:42", "manager", {"approved": True, "by": "grace"})

Configuration comes from the environment: CELERY_BROKER_URL and
DURABLE_CELERY_DATABASE_URL.
"""

from __future__ import annotations

import os
import uuid

from celery import Celery

from durable_celery import Await, Done, Durable

app = Celery("expenses", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))
durable = Durable(app)

LARGE = 1000
DEADLINE = 3 * 24 * 3600  # three days, durably: no worker waits meanwhile

approval = durable.workflow("expense_approval", version=1)


@approval.step
def request_approval(ctx):
    # Email the approvers a link here; they answer with durable.signal(...).
    approvers = ["manager", "finance"] if ctx.state["amount"] >= LARGE else ["manager"]
    ctx.state["approvers"] = approvers
    return Await(approvers, mode="all", timeout=ctx.state.get("deadline", DEADLINE))


@approval.step
def decide(ctx):
    answers = {s.name: s.payload for s in ctx.signals}
    if ctx.timed_out:
        missing = sorted(set(ctx.state["approvers"]) - set(answers))
        return Done({"approved": False, "reason": f"no answer in time from {missing}"})
    refusals = [name for name, answer in answers.items() if not answer.get("approved")]
    if refusals:
        return Done({"approved": False, "reason": f"rejected by {sorted(refusals)}"})
    return Done({"approved": True, "by": sorted(a.get("by", n) for n, a in answers.items())})


def main() -> None:
    expense = uuid.uuid4().hex[:8]
    wid = approval.start({"amount": 250, "what": "train tickets"}, key=f"expense:{expense}")
    print(f"expense {expense} waits for approval (run {wid})")
    # What the manager's "approve" button does (dedup_key: a double click is harmless):
    durable.signal(f"expense:{expense}", "manager", {"approved": True, "by": "grace"},
                   dedup_key=f"{expense}:manager")
    print(durable.wait_result(wid, timeout=60))


if __name__ == "__main__":
    main()
