"""The layout is the architecture: only storage/ talks to the database library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import durable_celery

PACKAGE = Path(durable_celery.__file__).resolve().parent
STORAGE = PACKAGE / "storage"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_walk_sees_the_package() -> None:
    relative = {p.relative_to(PACKAGE).as_posix() for p in SOURCES}
    assert {"__init__.py", "definitions.py", "storage/store.py", "storage/engine.py",
            "runtime/outcomes.py"} <= relative
    # The detector itself works: storage really does import sqlalchemy.
    assert "sqlalchemy" in imported_modules(STORAGE / "store.py")


def test_only_storage_imports_sqlalchemy() -> None:
    offenders = [
        p.relative_to(PACKAGE).as_posix() for p in SOURCES
        if not p.is_relative_to(STORAGE) and "sqlalchemy" in imported_modules(p)
    ]
    assert offenders == [], f"sqlalchemy imported outside durable_celery/storage/: {offenders}"


def test_imports_inside_functions_are_seen(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from sqlalchemy.engine import make_url\n"
                      "    import sqlalchemy.orm as orm\n")
    assert imported_modules(sample) == {"sqlalchemy"}


def test_public_names_resolve() -> None:
    assert len(durable_celery.__all__) == len(set(durable_celery.__all__))
    missing = [name for name in durable_celery.__all__ if not hasattr(durable_celery, name)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec("from durable_celery import *", namespace)
    assert set(durable_celery.__all__) <= set(namespace)


@pytest.mark.parametrize("name", sorted(durable_celery.__all__))
def test_public_name_is_a_real_object(name: str) -> None:
    assert getattr(durable_celery, name) is not None
