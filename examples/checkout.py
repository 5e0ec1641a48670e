"""A checkout workflow to copy from.

Run a worker:     celery -A examples.checkout worker --loglevel=INFO
Start an order:   python -m examples.checkout

Configuration comes from the environment: CELERY_BROKER_URL and
DURABLE_CELERY_DATABASE_URL (e.g. postgresql+psycopg://postgres@localhost/postgres).
"""

from __future__ import annotations

import os
import uuid

from celery import Celery

from durable_celery import Await, Done, Durable, Fail

app = Celery("shop", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))
durable = Durable(app)  # database URL from DURABLE_CELERY_DATABASE_URL

checkout = durable.workflow("checkout", version=1)

STOCK = {"sku-1": 10, "sku-2": 0}


@checkout.step
def reserve(ctx):
    """The first declared step is the initial one. A plain dict return is the new state."""
    sku = ctx.state["sku"]
    if STOCK.get(sku, 0) <= 0:
        return Fail(f"{sku} is out of stock")
    ctx.state["reservation"] = f"res-{ctx.idempotency_key}"
    return ctx.state


@checkout.step(retry={"max_attempts": 5, "backoff": "exponential", "delay": 1, "max_delay": 30})
def charge(ctx):
    """Exceptions are retried durably: attempt and next due time are committed first."""
    # Pass ctx.idempotency_key to the payment provider: it is stable across re-runs.
    ctx.state["charge_request"] = ctx.idempotency_key
    return ctx.state


@checkout.step
def wait_payment(ctx):
    """Park until the payment webhook signals the run (no worker, no broker message held)."""
    return Await("payment_confirmed", timeout=3600)


@checkout.step
def ship(ctx):
    if ctx.timed_out:
        return Fail("payment never came")
    payment = ctx.signal("payment_confirmed")
    if payment is None or payment.payload.get("amount") != ctx.state["amount"]:
        return Fail("payment does not match the order")
    return Done({"shipped": True, "order": ctx.state["order"], "paid": payment.payload})


def main() -> None:
    order = uuid.uuid4().hex[:8]
    wid = checkout.start({"order": order, "sku": "sku-1", "amount": 100}, key=f"order:{order}")
    print(f"started checkout {wid} for order:{order}")
    # What your payment webhook handler would do (dedup_key makes webhook retries harmless):
    durable.signal(f"order:{order}", "payment_confirmed", {"amount": 100}, dedup_key="evt-1")
    print("result:", durable.wait_result(wid, timeout=60))


if __name__ == "__main__":
    main()
