"""The demo's worker entry point: ``celery -A durable_celery.demo_worker worker``."""

from __future__ import annotations

import os

from durable_celery.demo import BROKER_ENV, build

durable = build(os.environ["DURABLE_CELERY_DATABASE_URL"], os.environ[BROKER_ENV])
app = durable.app
