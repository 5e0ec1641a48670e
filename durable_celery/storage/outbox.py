"""Starting runs and sending signals inside the caller's own SQLAlchemy transaction.

The row commits or rolls back with the caller's data. The message is published after the
commit (the hook below); if the caller's process dies between its commit and that publish,
the row's ``dispatch_at`` (a couple of seconds ahead) makes the coordinator publish it. A
rolled-back transaction publishes nothing.

* ``Session``: the ``after_commit`` session event runs once the commit is done.
* ``Connection``: SQLAlchemy's ``commit`` connection event fires just *before* the driver
  commits, so the publish waits (in a short-lived thread) until the row is visible from
  another connection, or gives up after :data:`VISIBLE_WAIT` seconds (the coordinator then
  publishes it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, orm

from durable_celery import errors
from durable_celery.storage import engine as engine_mod

log = logging.getLogger("durable_celery")

# Seconds after a transactional start/signal commit before the coordinator publishes the
# message itself (the caller's process publishes first on the normal path).
OUTBOX_DELAY = 2.0
VISIBLE_WAIT = 5.0


class Bound:
    """The caller's transaction: a Connection to execute on and a way to act after commit."""

    def __init__(self, connection: Any, our_url: str) -> None:
        self.session: orm.Session | None = None
        if isinstance(connection, orm.Session):
            self.session = connection
            with engine_mod.translate_errors():
                self.conn = connection.connection()
        elif isinstance(connection, sa.Connection):
            self.conn = connection
        else:
            raise errors.InvalidArgument(
                "connection= must be a SQLAlchemy Connection or Session of your own "
                f"transaction, not {type(connection).__name__}")
        if self.conn.closed:
            raise errors.InvalidArgument("connection= is closed")
        theirs, ours = self.conn.engine.url, sa.engine.make_url(our_url)
        if _where(theirs) != _where(ours):
            raise errors.InvalidArgument(
                "connection= must be a connection to durable_celery's own database "
                f"({ours.host}:{ours.port or 5432}/{ours.database}), not "
                f"{theirs.host}:{theirs.port or 5432}/{theirs.database}")

    @contextlib.contextmanager
    def execute(self) -> Iterator[sa.Connection]:
        with engine_mod.translate_errors():
            yield self.conn

    def after_commit(self, callback: Callable[[], object], visible: Callable[[], bool]) -> None:
        """Run ``callback`` once the caller's transaction committed; never on rollback.

        ``visible`` tells (from another connection) whether the commit is done.
        """
        done = threading.Event()

        def safely() -> None:
            try:
                callback()
            except Exception:
                log.warning("publishing after commit failed; the coordinator publishes "
                            "it instead", exc_info=True)

        if self.session is not None:
            def on_commit(_session: Any) -> None:
                if not done.is_set():
                    done.set()
                    safely()

            def on_rollback(_session: Any) -> None:
                done.set()

            event.listen(self.session, "after_commit", on_commit, once=True)
            event.listen(self.session, "after_rollback", on_rollback, once=True)
            return

        def wait_then_publish() -> None:
            deadline = time.monotonic() + VISIBLE_WAIT
            pause = 0.002
            while time.monotonic() < deadline:
                try:
                    if visible():
                        safely()
                        return
                except errors.DurableCeleryError:
                    return
                time.sleep(pause)
                pause = min(pause * 2, 0.1)

        def on_conn_commit(_conn: Any) -> None:
            if not done.is_set():
                done.set()
                threading.Thread(target=wait_then_publish, name="durable-outbox",
                                 daemon=True).start()

        def on_conn_rollback(_conn: Any) -> None:
            done.set()

        event.listen(self.conn, "commit", on_conn_commit, once=True)
        event.listen(self.conn, "rollback", on_conn_rollback, once=True)


_LOOPBACK = {None, "", "localhost", "127.0.0.1", "::1"}


def _where(url: sa.engine.URL) -> tuple[str | None, int, str | None]:
    """(host, port, database), loopback spellings made equal."""
    host = "localhost" if url.host in _LOOPBACK else url.host
    return host, url.port or 5432, url.database
