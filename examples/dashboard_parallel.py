"""A dashboard that fetches three sources in parallel (three child runs, possibly on
three workers) and renders when all three are back, whatever each one's outcome.

Run a worker:     celery -A examples.dashboard_parallel worker --loglevel=INFO
Build one:        python -m examples.dashboard_parallel

Configuration comes from the environment: CELERY_BROKER_URL and
DURABLE_CELERY_DATABASE_URL.
"""

from __future__ import annotations

import os

from celery import Celery

from durable_celery import Done, Durable, parallel

app = Celery("dashboards", broker=os.environ.get("CELERY_BROKER_URL",
                                                 "redis://localhost:6379/0"))
durable = Durable(app)

# One workflow holds the fetchers; parallel() starts each as a one-step child run (it runs
# that step only; what the step returns is the child's result).
fetch = durable.workflow("dashboard_fetch", version=1)


@fetch.step(retry={"max_attempts": 3, "delay": 1})
def fetch_sales(ctx):
    return {"sales": 1200 if ctx.state["region"] == "eu" else 900}


@fetch.step(retry={"max_attempts": 3, "delay": 1})
def fetch_users(ctx):
    return {"users": 314}


@fetch.step(retry={"max_attempts": 3, "delay": 1})
def fetch_tickets(ctx):
    if ctx.state.get("tickets_down"):
        raise ConnectionError("ticket system unreachable")
    return {"open_tickets": 7}


dashboard = durable.workflow("dashboard", version=1)


@dashboard.step
def gather(ctx):
    """Each child starts from a copy of this run's state (the region)."""
    return parallel(fetch_sales, fetch_users, fetch_tickets, next="render")


@dashboard.step
def render(ctx):
    panels, missing = {}, []
    for child in ctx.children:  # spawn order, each with status, result, error
        if child.status == "done":
            panels.update(child.result)
        else:
            missing.append(child.error["message"])
    return Done({"region": ctx.state["region"], "panels": panels, "missing": missing})


def main() -> None:
    wid = dashboard.start({"region": "eu"})
    print(f"building dashboard {wid}")
    print(durable.wait_result(wid, timeout=60))


if __name__ == "__main__":
    main()
