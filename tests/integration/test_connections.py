"""Our connections: the user's URL options survive ours (finding 15), dead peers are
noticed (keepalives), and statements prepared before a migration keep working (P6)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from durable_celery import Done, StorageError
from durable_celery.storage import migrate
from durable_celery.storage.engine import PREPARE_THRESHOLD, EngineHolder
from durable_celery.storage.listener import Listener
from durable_celery.testing import drain
from tests import services


def with_query(url: str, **params: str) -> str:
    return sa.engine.make_url(url).update_query_dict(params).render_as_string(
        hide_password=False)


def show(holder: EngineHolder, name: str) -> str:
    with holder.connect() as conn:
        return str(conn.execute(sa.text(f"SHOW {name}")).scalar())


def test_options_in_the_url_are_kept_next_to_ours(database_url):
    url = with_query(database_url, options="-c statement_timeout=1234")
    holder = EngineHolder(url, liveness=2.0)
    try:
        assert show(holder, "statement_timeout") == "1234ms"
        assert show(holder, "idle_in_transaction_session_timeout") == "2s"
    finally:
        holder.dispose()


def test_a_setting_the_url_names_wins_over_ours(database_url):
    url = with_query(database_url, options="-c idle_in_transaction_session_timeout=7000")
    holder = EngineHolder(url, liveness=2.0)
    try:
        assert show(holder, "idle_in_transaction_session_timeout") == "7s"
    finally:
        holder.dispose()


def test_keepalives_notice_a_dead_peer_unless_the_url_says_otherwise(database_url):
    holder = EngineHolder(database_url, liveness=30.0)
    args = holder.connect_args()
    assert (args["keepalives"], args["keepalives_idle"], args["tcp_user_timeout"]) == \
        (1, 10, 30000)
    own = EngineHolder(with_query(database_url, keepalives_idle="99"), liveness=30.0)
    assert "keepalives_idle" not in own.connect_args()
    line = holder.dedicated(statement_timeout=0.4)
    try:
        assert line.execute("SHOW statement_timeout").fetchone()[0] == "400ms"
        assert line.info.get_parameters().get("tcp_user_timeout") == "1000"
    finally:
        line.close()


@pytest.fixture
def private_database(admin_url) -> Iterator[str]:
    name = f"dct_cols_{uuid.uuid4().hex[:8]}"
    url = services.create_database(admin_url, name)
    holder = EngineHolder(url)
    migrate.migrate(holder)
    holder.dispose()
    yield url
    services.drop_database(admin_url, name)


def test_a_migration_adding_a_column_breaks_no_prepared_statement(make_durable,
                                                                  private_database,
                                                                  monkeypatch):
    durable = make_durable(database_url=private_database, pool_size=1)
    from tests.integration.support import Recorder

    Recorder().install(durable, monkeypatch)
    wf = durable.workflow("cols")

    @wf.step
    def only(ctx):
        return Done(1)

    wid = wf.start()
    drain(durable)
    for _ in range(PREPARE_THRESHOLD + 1):  # the history read is now prepared server-side
        assert len(durable.workflow_steps(wid)) == 1
    admin = sa.create_engine(private_database, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text("ALTER TABLE durable_celery.steps ADD COLUMN extra integer"))
    assert len(durable.workflow_steps(wid)) == 1

    # A change of a read column's type does invalidate the plan: one transient error,
    # then the pool is fresh and the next read works.
    with admin.begin() as conn:
        conn.execute(sa.text("ALTER TABLE durable_celery.steps ALTER COLUMN worker TYPE varchar"))
    admin.dispose()
    try:
        durable.workflow_steps(wid)
    except StorageError as exc:
        assert exc.transient and exc.details["sqlstate"] == "0A000"
    assert len(durable.workflow_steps(wid)) == 1


def test_the_listener_never_spins_without_a_database():
    from durable_celery.storage.engine import EngineHolder

    listener = Listener(EngineHolder("postgresql+psycopg://postgres@127.0.0.1:1/none"))
    began = time.monotonic()
    assert listener.wait(0) is False
    assert time.monotonic() - began >= 0.2
    listener.close()
