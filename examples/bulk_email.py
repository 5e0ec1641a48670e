"""A bulk email campaign: one child run per recipient, at most 10 sending at once; the
report runs when every email is sent (or has failed after its retries).

Run a worker:     celery -A examples.bulk_email worker --loglevel=INFO
Send a campaign:  python -m examples.bulk_email

Configuration comes from the environment: CELERY_BROKER_URL and
DURABLE_CELERY_DATABASE_URL.
"""

from __future__ import annotations

import os

from celery import Celery

from durable_celery import Done, Durable, foreach

app = Celery("mailer", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))
durable = Durable(app)

send_email = durable.workflow("send_email", version=1)


@send_email.step(retry={"max_attempts": 5, "backoff": "exponential", "delay": 2})
def deliver(ctx):
    """Pass ctx.idempotency_key to the mail provider so a re-run never sends twice."""
    address = ctx.state["to"]
    if "@" not in address:
        return Done({"to": address, "sent": False, "why": "invalid address"})
    return Done({"to": address, "sent": True, "message_id": ctx.idempotency_key})


campaign = durable.workflow("campaign", version=1)


@campaign.step
def send_all(ctx):
    recipients = [{"to": r, "subject": ctx.state["subject"]} for r in ctx.state["recipients"]]
    return foreach(recipients, send_email, concurrency=10, next="report")


@campaign.step
def report(ctx):
    sent = [c.result["to"] for c in ctx.children if c.status == "done" and c.result["sent"]]
    return Done({"sent": len(sent), "not_sent": len(ctx.children) - len(sent)})


def main() -> None:
    recipients = [f"user{i}@example.com" for i in range(100)] + ["not-an-address"]
    wid = campaign.start({"subject": "Spring sale", "recipients": recipients})
    print(f"campaign {wid}: {len(recipients)} emails, 10 at a time")
    print(durable.wait_result(wid, timeout=300))


if __name__ == "__main__":
    main()
