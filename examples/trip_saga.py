"""A trip-booking saga: book a flight, then a hotel, then take the payment. The payment
fails, so the hotel and then the flight are cancelled (newest first), each cancellation a
durable step with its own retries.

Run a worker:     celery -A examples.trip_saga worker --loglevel=INFO
Book a trip:      python -m examples.trip_saga

Configuration comes from the environment: CELERY_BROKER_URL and
DURABLE_CELERY_DATABASE_URL (e.g. postgresql+psycopg://postgres@localhost/postgres).
"""

from __future__ import annotations

import os

from celery import Celery

from durable_celery import Durable, Fail, WorkflowFailed

app = Celery("travel", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))
durable = Durable(app)  # database URL from DURABLE_CELERY_DATABASE_URL

trip = durable.workflow("trip", version=1)


@trip.step(compensate="cancel_flight")
def book_flight(ctx):
    """Completed steps with compensate= are undone if the run fails later."""
    # A real airline call would pass ctx.idempotency_key: re-runs after a crash reuse it.
    ctx.state["flight"] = f"FL-{ctx.idempotency_key[-6:]}"
    return ctx.state


@trip.step(compensate="cancel_hotel")
def book_hotel(ctx):
    ctx.state["hotel"] = f"HT-{ctx.idempotency_key[-6:]}"
    return ctx.state


@trip.step(retry={"max_attempts": 3, "delay": 1})
def take_payment(ctx):
    if ctx.state.get("card") == "declined":
        return Fail("payment declined")  # -> compensating: cancel_hotel, then cancel_flight
    return {**ctx.state, "paid": True}


@trip.step
def confirm(ctx):
    return {"flight": ctx.state["flight"], "hotel": ctx.state["hotel"]}


@trip.compensation(retry={"max_attempts": 5, "backoff": "exponential", "delay": 1})
def cancel_hotel(ctx):
    """A durable step of its own: retried on exceptions, re-run after a crash."""
    ctx.state["hotel_cancelled"] = ctx.state.pop("hotel")


@trip.compensation(retry={"max_attempts": 5, "backoff": "exponential", "delay": 1})
def cancel_flight(ctx):
    ctx.state["flight_cancelled"] = ctx.state.pop("flight")


def main() -> None:
    wid = trip.start({"traveller": "ada", "card": "declined"})
    print(f"started trip {wid}")
    try:
        print("booked:", durable.wait_result(wid, timeout=60))
    except WorkflowFailed as exc:
        run = durable.get_workflow(wid)
        print(f"{exc.run_status}: {exc.error['message']}; state: {run.state}")


if __name__ == "__main__":
    main()
