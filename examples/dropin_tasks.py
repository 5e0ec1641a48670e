"""Ordinary Celery tasks made durable by changing the decorator (``@app.task`` -> ``@durable.task``).

Run a worker:   celery -A examples.dropin_tasks worker --loglevel=INFO
Call tasks:     python -m examples.dropin_tasks

Configuration comes from the environment: CELERY_BROKER_URL and
DURABLE_CELERY_DATABASE_URL (e.g. postgresql+psycopg://postgres@localhost/postgres).
"""

from __future__ import annotations

import os
import uuid

from celery import Celery

from durable_celery import Durable

app = Celery("shop", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))
durable = Durable(app)  # database URL from DURABLE_CELERY_DATABASE_URL


@durable.task                                   # was: @app.task
def add(x, y):
    return x + y


@durable.task(bind=True, max_retries=5, default_retry_delay=2)   # was: @app.task(bind=True, ...)
def charge(self, order_id, amount):
    """``self.retry`` is a durable retry: the attempt and its due time are committed."""
    if self.request.retries < 1:  # pretend the provider is flaky once
        raise self.retry(countdown=1)
    # self.request.idempotency_key is stable across re-runs of this call: pass it on.
    return {"order": order_id, "charged": amount, "ref": self.request.idempotency_key}


@durable.task(autoretry_for=(ConnectionError,), retry_backoff=True, max_retries=8)
def notify(email, text):
    return {"to": email, "text": text}


@durable.task
def nightly_report(kind):
    return {"report": kind}


# Fires once per occurrence however many workers run (re-declaring is harmless).
if os.environ.get("DURABLE_CELERY_DATABASE_URL"):
    nightly_report.schedule("nightly-report", "0 2 * * *", args=["daily"],
                            timezone="Europe/Berlin")


def main() -> None:
    print("add:", add.delay(2, 3).get(timeout=60))
    order = f"o-{uuid.uuid4().hex[:8]}"
    # One charge per account at a time, high priority; a reminder in an hour, durably.
    handle = charge.apply_async((order, 100), concurrency_key="account:7", priority=8)
    reminder = notify.apply_async(("a@example.com", "still there?"), countdown=3600)
    print("charge:", handle.get(timeout=60))
    print("reminder:", reminder.id, reminder.status)  # PENDING: a timer in Postgres


if __name__ == "__main__":
    main()
