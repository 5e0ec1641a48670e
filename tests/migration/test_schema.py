"""The migrations, applied to an empty database, produce exactly storage/schema.py.

Two comparisons:

* reflection (``sqlalchemy.inspect``) of the migrated database against the declared
  ``MetaData``: tables, columns, types, nullability, defaults, keys, constraints, indexes and
  the partial-index predicates (from ``pg_indexes.indexdef``);
* Postgres' own rendering of both: the catalog of the migrated database against the catalog
  of a database built by ``metadata.create_all`` (every constraint and index definition as
  Postgres prints it), which leaves no room for a lenient normalization to hide a difference.

Each failure shows a diff of one-line facts (``runs.columns.priority.type = 'SMALLINT'``),
"-" for what the code expects, "+" for what the migrations built.
"""

from __future__ import annotations

import copy
import difflib
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from durable_celery.storage import migrate, schema
from durable_celery.storage.engine import EngineHolder
from tests import services

S = migrate.SCHEMA
DIALECT = postgresql.dialect()


# ----------------------------------------------------------------------------- databases


@pytest.fixture(scope="module")
def migrated_engine(admin_url: str) -> Iterator[sa.Engine]:
    """An empty database with the migrations applied, and nothing else."""
    name = f"dcm_{uuid.uuid4().hex[:12]}"
    url = services.create_database(admin_url, name)
    holder = EngineHolder(url)
    try:
        assert migrate.migrate(holder) == [m.version for m in migrate.load()]
    finally:
        holder.dispose()
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()
    services.drop_database(admin_url, name)


@pytest.fixture(scope="module")
def declared_engine(admin_url: str) -> Iterator[sa.Engine]:
    """An empty database built from storage/schema.py by ``create_all``."""
    name = f"dcm_{uuid.uuid4().hex[:12]}"
    url = services.create_database(admin_url, name)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {S}"))
        schema.metadata.create_all(conn)
    yield engine
    engine.dispose()
    services.drop_database(admin_url, name)


# ----------------------------------------------------------------------------- diffing


def flatten(value: Any, path: str = "") -> list[str]:
    """One self-describing line per leaf: ``runs.columns.priority.type = 'SMALLINT'``."""
    if isinstance(value, dict) and value:
        return [line for key in sorted(value)
                for line in flatten(value[key], f"{path}.{key}" if path else str(key))]
    return [f"{path} = {value!r}"]


def assert_same(expected: Any, actual: Any, what: str) -> None:
    """Equal, or fail with a diff of the two flattened descriptions."""
    if expected == actual:
        return
    diff = "\n".join(difflib.unified_diff(flatten(expected), flatten(actual),
                                          "expected (storage/schema.py)", "actual (migrations)",
                                          lineterm="", n=0))
    pytest.fail(f"{what} differ:\n{diff}", pytrace=False)


# ----------------------------------------------------------------------------- normalizing


def type_name(type_: Any) -> str:
    return " ".join(str(type_.compile(dialect=DIALECT)).upper().split())


def default_text(text: str | None) -> str | None:
    return None if text is None else " ".join(text.split()).lower()


def predicate(text: str | None) -> str | None:
    """``((status = 'awaiting'::text) AND (x IS NOT NULL))`` and ``status = 'awaiting' AND x
    IS NOT NULL`` both become ``status = 'awaiting' and x is not null``."""
    if text is None:
        return None
    text = re.sub(r"::[a-z ]+(\[\])?", "", text)
    text = text.replace("(", " ").replace(")", " ")
    return " ".join(text.split()).lower()


def check_summary(text: str) -> str:
    """``status IN ('a', 'b')`` and ``status = ANY (ARRAY['a'::text, 'b'::text])`` both
    become ``status in ['a', 'b']`` (the exact text is compared by the catalog test)."""
    column = re.match(r"\W*(\w+)", text)
    literals = re.findall(r"'([^']*)'", text)
    return f"{column[1] if column else '?'} in {literals}"


# ----------------------------------------------------------------------------- descriptions


def describe_declared(metadata: sa.MetaData) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for table in metadata.sorted_tables:
        assert table.schema == S, table.fullname
        columns = {}
        for col in table.columns:
            default = col.server_default  # an Identity is not a DefaultClause
            if isinstance(default, sa.DefaultClause):
                arg = default.arg
                default_sql: str | None = arg.text if isinstance(arg, sa.TextClause) else str(arg)
            else:
                default_sql = None
            columns[col.name] = {
                "type": type_name(col.type),
                "nullable": col.nullable,
                "default": default_text(default_sql),
                "identity": None if col.identity is None else (
                    "always" if col.identity.always else "by default"),
            }
        uniques, checks, foreign_keys = {}, {}, {}
        for constraint in table.constraints:
            if isinstance(constraint, sa.UniqueConstraint):
                uniques[str(constraint.name)] = [c.name for c in constraint.columns]
            elif isinstance(constraint, sa.CheckConstraint):
                checks[str(constraint.name)] = check_summary(str(constraint.sqltext))
        for fk in table.foreign_key_constraints:
            local = [c.name for c in fk.columns]
            name = fk.name or f"{table.name}_{'_'.join(local)}_fkey"
            foreign_keys[str(name)] = {
                "columns": local,
                "references": f"{fk.referred_table.fullname}"
                              f"({', '.join(e.column.name for e in fk.elements)})",
                "ondelete": fk.ondelete,
            }
        indexes = {}
        for index in table.indexes:
            where = index.dialect_options["postgresql"]["where"]
            indexes[str(index.name)] = {
                "columns": [c.name for c in index.columns],
                "unique": bool(index.unique),
                "where": predicate(None if where is None else str(where)),
            }
        tables[table.name] = {
            "columns": columns,
            "primary_key": {
                "name": table.primary_key.name or f"{table.name}_pkey",
                "columns": [c.name for c in table.primary_key.columns],
            },
            "unique_constraints": uniques,
            "check_constraints": checks,
            "foreign_keys": foreign_keys,
            "indexes": indexes,
        }
    return tables


def describe_reflected(engine: sa.Engine) -> dict[str, Any]:
    inspector = sa.inspect(engine)
    with engine.connect() as conn:
        indexdefs = dict(conn.execute(sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = :s"), {"s": S}).all())
    tables: dict[str, Any] = {}
    for name in inspector.get_table_names(schema=S):
        columns = {
            col["name"]: {
                "type": type_name(col["type"]),
                "nullable": col["nullable"],
                "default": default_text(col["default"]),
                "identity": None if not col.get("identity") else (
                    "always" if col["identity"]["always"] else "by default"),
            }
            for col in inspector.get_columns(name, schema=S)
        }
        pk = inspector.get_pk_constraint(name, schema=S)
        indexes = {}
        for index in inspector.get_indexes(name, schema=S):
            if index.get("duplicates_constraint"):
                continue  # the index behind a UNIQUE constraint: compared as a constraint
            definition = indexdefs[str(index["name"])]
            where = definition.split(" WHERE ", 1)[1] if " WHERE " in definition else None
            indexes[str(index["name"])] = {
                "columns": list(index["column_names"]),
                "unique": bool(index["unique"]),
                "where": predicate(where),
            }
        tables[name] = {
            "columns": columns,
            "primary_key": {"name": pk["name"], "columns": pk["constrained_columns"]},
            "unique_constraints": {
                str(u["name"]): list(u["column_names"])
                for u in inspector.get_unique_constraints(name, schema=S)
            },
            "check_constraints": {
                str(c["name"]): check_summary(c["sqltext"])
                for c in inspector.get_check_constraints(name, schema=S)
            },
            "foreign_keys": {
                str(fk["name"]): {
                    "columns": fk["constrained_columns"],
                    "references": f"{fk['referred_schema']}.{fk['referred_table']}"
                                  f"({', '.join(fk['referred_columns'])})",
                    "ondelete": fk["options"].get("ondelete"),
                }
                for fk in inspector.get_foreign_keys(name, schema=S)
            },
            "indexes": indexes,
        }
    return tables


def catalog(engine: sa.Engine) -> dict[str, Any]:
    """Postgres' own description of the schema: columns in order, constraint and index
    definitions as ``pg_get_constraintdef`` and ``pg_indexes`` print them."""
    with engine.connect() as conn:
        columns = conn.execute(sa.text("""
            SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default,
                   is_identity, identity_generation
            FROM information_schema.columns WHERE table_schema = :s
            ORDER BY table_name, ordinal_position"""), {"s": S}).all()
        constraints = conn.execute(sa.text("""
            SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
            FROM pg_constraint WHERE connamespace = CAST(:s AS regnamespace)
            ORDER BY 1, 2"""), {"s": S}).all()
        indexes = conn.execute(sa.text("""
            SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = :s
            ORDER BY 1, 2"""), {"s": S}).all()
        triggers = conn.execute(sa.text("""
            SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(t.oid)
            FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
            WHERE c.relnamespace = CAST(:s AS regnamespace) AND NOT t.tgisinternal
            ORDER BY 1, 2"""), {"s": S}).all()
        functions = conn.execute(sa.text("""
            SELECT proname, pg_get_functiondef(oid) FROM pg_proc
            WHERE pronamespace = CAST(:s AS regnamespace) ORDER BY 1"""), {"s": S}).all()
    described: dict[str, Any] = {
        "(functions)": {name: " ".join(definition.split()) for name, definition in functions}}
    for position, (table, column, *rest) in enumerate(columns):
        described.setdefault(table, {"columns": {}, "constraints": {}, "indexes": {}})
        # The position within its table, so that a reordered column shows up too.
        index = position - min(i for i, row in enumerate(columns) if row[0] == table)
        described[table]["columns"][column] = dict(zip(
            ("position", "data_type", "udt_name", "is_nullable", "column_default",
             "is_identity", "identity_generation"), (index, *rest), strict=True))
    for table, name, definition in constraints:
        described[table.split(".")[-1]]["constraints"][name] = definition
    for table, name, definition in indexes:
        described[table]["indexes"][name] = definition
    for table, name, definition in triggers:
        described[table.split(".")[-1]].setdefault("triggers", {})[name] = definition
    return described


# ----------------------------------------------------------------------------- tests


def test_the_declared_schema_is_not_empty() -> None:
    # Guards the comparisons below against comparing two empty descriptions.
    declared = describe_declared(schema.metadata)
    assert {"schema_version", "runs", "steps", "signals", "workers",
            "control_requests"} <= set(declared)
    assert len(declared["runs"]["columns"]) >= 33
    assert len(declared["runs"]["indexes"]) >= 7


def test_migrations_produce_the_declared_tables(migrated_engine: sa.Engine) -> None:
    inspector = sa.inspect(migrated_engine)
    assert_same(sorted(schema.metadata.tables),
                sorted(f"{S}.{t}" for t in inspector.get_table_names(schema=S)), "tables")
    assert inspector.get_view_names(schema=S) == []
    assert inspector.get_table_names(schema="public") == [], "migrations leaked into public"


def test_migrations_produce_the_declared_schema(migrated_engine: sa.Engine) -> None:
    assert_same(describe_declared(schema.metadata), describe_reflected(migrated_engine),
                "schemas")


def test_partial_index_predicates(migrated_engine: sa.Engine) -> None:
    # The same predicates as above, on their own so that a failure is unmistakable.
    declared = {
        str(index.name): predicate(str(index.dialect_options["postgresql"]["where"]))
        for table in schema.metadata.tables.values() for index in table.indexes
        if index.dialect_options["postgresql"]["where"] is not None
    }
    with migrated_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT indexname, indexdef FROM pg_indexes "
                                    "WHERE schemaname = :s AND indexdef LIKE '% WHERE %'"),
                            {"s": S}).all()
    actual = {name: predicate(definition.split(" WHERE ", 1)[1]) for name, definition in rows}
    assert_same(declared, actual, "partial-index predicates")
    assert actual["runs_key_idx"] == (
        "key is not null and finished_at is null or key_reuse = 'reject' "
        "or key_reuse = 'after_failure' and status = 'done'")


def test_postgres_renders_both_schemas_identically(migrated_engine: sa.Engine,
                                                   declared_engine: sa.Engine) -> None:
    assert_same(catalog(declared_engine), catalog(migrated_engine), "Postgres catalogs")


def test_the_comparison_detects_a_difference(migrated_engine: sa.Engine) -> None:
    # A test that cannot fail is a defect: tamper with an expectation, expect exactly the
    # tampered facts in the diff.
    actual = describe_reflected(migrated_engine)
    expected = copy.deepcopy(actual)
    expected["runs"]["columns"]["priority"]["type"] = "INTEGER"
    expected["runs"]["indexes"]["runs_finished_idx"]["where"] = "status = 'awaiting'"
    with pytest.raises(pytest.fail.Exception) as info:
        assert_same(expected, actual, "schemas")
    changed = [line for line in str(info.value).splitlines()
               if line[:1] in "+-" and line[:3] not in ("---", "+++")]
    assert sorted(changed) == sorted([
        "-runs.columns.priority.type = 'INTEGER'",
        "+runs.columns.priority.type = 'SMALLINT'",
        "-runs.indexes.runs_finished_idx.where = \"status = 'awaiting'\"",
        "+runs.indexes.runs_finished_idx.where = 'finished_at is not null'",
    ])
