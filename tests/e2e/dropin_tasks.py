"""A module of ordinary Celery tasks, made durable by changing only the decorator.

Before, every task here was ``@app.task(...)``; now it is ``@durable.task(...)`` with the
same options, and every call site (``.delay()``, ``.apply_async()``, ``app.send_task``) is
unchanged. Workers load it with ``celery -A tests.e2e.dropin_tasks worker``; the tests
import it with the same ``E2E_*`` environment variables, so task names match.

Side effects go to ``public.e2e_effects`` (one row per execution) so tests can count how
often a task body really ran.
"""

from __future__ import annotations

import os
import time

import psycopg
from celery import Celery

from durable_celery import Durable
from tests.e2e.workerapp import SETTINGS, psycopg_url

app = Celery("dropin", broker=os.environ["E2E_BROKER_URL"])
app.conf.task_default_queue = os.environ["E2E_QUEUE"]
app.conf.broker_connection_retry_on_startup = True
durable = Durable(app, database_url=os.environ["E2E_DATABASE_URL"], **SETTINGS)

_DSN = psycopg_url(os.environ["E2E_DATABASE_URL"])


def _effect(run_id: str | None, what: str, attempt: int = 0) -> None:
    with psycopg.connect(_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute("INSERT INTO public.e2e_effects (workflow_id, step, attempt, pid) "
                     "VALUES (%s, %s, %s, %s)", (run_id or "inline", what, attempt, os.getpid()))


# ----------------------------------------------------------------------------- typical tasks


@durable.task
def add(x, y):
    return x + y


@durable.task()
def mul(x, y):
    return x * y


@durable.task(name="dropin.greet", ignore_result=False, acks_late=True)
def greet(name, punctuation="!"):
    return f"Hello, {name}{punctuation}"


@durable.task
def summarize(items):
    return {"count": len(items), "total": sum(i["amount"] for i in items),
            "names": sorted(i["name"] for i in items)}


@durable.task
def fan_out(n):
    """A task that starts other tasks, as Celery code often does."""
    return [add.delay(i, i).id for i in range(n)]


@durable.task(bind=True, max_retries=3, default_retry_delay=0.2)
def flaky(self, fail_times):
    _effect(self.request.id, "flaky", self.request.retries)
    if self.request.retries < fail_times:
        raise self.retry(countdown=0.1)
    return {"retries": self.request.retries}


@durable.task(autoretry_for=(ConnectionError,), max_retries=2, default_retry_delay=0.1)
def fetch(url, fail_times=1):
    attempts = _count(url)
    _effect(url, "fetch")
    if attempts < fail_times:
        raise ConnectionError(f"{url} unreachable")
    return {"url": url, "attempts": attempts + 1}


@durable.task(bind=True)
def slow(self, tag, seconds):
    """Runs long enough to be killed mid-way; records each start and each finish."""
    _effect(self.request.id, "slow:start", self.request.retries)
    time.sleep(seconds)
    _effect(self.request.id, "slow:done", self.request.retries)
    return {"tag": tag}


@durable.task(bind=True)
def tick(self, label):
    """What the cron schedule fires."""
    _effect(self.request.id, f"tick:{label}")
    return label


@durable.task(bind=True)
def span(self, label, seconds):
    """Records when it ran (for concurrency keys)."""
    start = time.time()
    time.sleep(seconds)
    return {"label": label, "start": start, "end": time.time(), "id": self.request.id}


@durable.task(bind=True)
def once(self, tag):
    _effect(self.request.id, f"once:{tag}")
    return tag


def _count(key: str) -> int:
    with psycopg.connect(_DSN, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT count(*) FROM public.e2e_effects WHERE workflow_id = %s",
                           (key,)).fetchone()
    return int(row[0]) if row else 0
