"""Flow control: protect what your workflows call.

- payments: the card provider takes 50 calls a second in all (every worker together), and
  each merchant at most 5 a second, so one merchant's burst never starves the others;
- sync_user: a burst of "user updated" events becomes one sync, 10 s after the last event
  (at most 60 s after the first), with every changed field collected;
- daily_report: never two reports of the same day at once; a second start waits its turn;
- quote: a price quote is worthless after 30 s in the queue, and the whole run must finish
  within 5 minutes.

Run a worker:   celery -A examples.flow_control worker --loglevel=INFO
Start some:     python -m examples.flow_control
Ask why one waits:   durable-celery explain <workflow_id> -A examples.flow_control

Configuration comes from the environment: CELERY_BROKER_URL and
DURABLE_CELERY_DATABASE_URL.
"""

from __future__ import annotations

import os

from celery import Celery

from durable_celery import Debounce, Done, Durable, Next, RateLimit, Singleton

app = Celery("shop", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))
durable = Durable(app)

# One bucket shared by every step that calls the provider (the name makes it shared).
PROVIDER = RateLimit(limit=50, period=1.0, name="card-provider")
PER_MERCHANT = RateLimit(limit=5, period=1.0, name="card-provider-merchant",
                         key=lambda state: state["merchant"])

payments = durable.workflow("payments")


@payments.step
def validate(ctx):
    if ctx.state["amount"] <= 0:
        return Done({"status": "rejected"})
    return Next("charge")


@payments.step(rate_limit=[PROVIDER, PER_MERCHANT], retry={"max_attempts": 5})
def charge(ctx):
    # Call the provider here (ctx.idempotency_key as its idempotency key).
    return Done({"status": "charged", "merchant": ctx.state["merchant"]})


def collect(pending, new):
    """Debounce merge: one sync with every field any of the events changed."""
    return {"user": new["user"], "fields": sorted(set(pending["fields"]) | set(new["fields"]))}


sync_user = durable.workflow("sync_user", debounce=Debounce(
    seconds=10, max_wait=60, key=lambda state: state["user"], keep=collect))


@sync_user.step
def push(ctx):
    return Done({"synced": ctx.state["fields"]})


daily_report = durable.workflow("daily_report", singleton=Singleton(
    key=lambda state: state["day"], on_conflict="queue"))


@daily_report.step
def build(ctx):
    return Done({"day": ctx.state["day"], "rows": 1234})


quote = durable.workflow("quote", deadline=300)


@quote.step(schedule_to_start=30, on_late="fail")
def price(ctx):
    return Done({"price": 42})


def main() -> None:
    charges = [payments.start({"merchant": f"m{n % 3}", "amount": 10 + n}) for n in range(20)]
    sync = [sync_user.start({"user": 7, "fields": [f]}) for f in ("email", "name", "email")]
    reports = [daily_report.start({"day": "2026-12-08"}) for _ in range(2)]
    print("charges:", len(charges), "| one sync run:", set(sync), "| reports:", reports)
    print("why is the second report waiting?", durable.explain(reports[1])["summary"])


if __name__ == "__main__":
    main()
