"""JSON checks for everything that is stored: state, inputs, payloads, results.

Postgres ``jsonb`` and a faithful round trip need more than ``json.dumps`` succeeding:
object keys must be strings (``json`` turns ``{1: "a"}`` into ``{"1": "a"}`` silently),
numbers must be finite, strings must not hold NUL, nesting is bounded, and the encoded
size is capped. Each failure raises :class:`~durable_celery.errors.InvalidPayload` naming
what was wrong and where.
"""

from __future__ import annotations

import json
import math
from typing import Any

from durable_celery import errors

MAX_DEPTH = 100


def check(value: Any, *, what: str, max_bytes: int) -> str:
    """Validate ``value`` and return its JSON text; raise ``InvalidPayload`` otherwise."""
    _walk(value, what)
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # pragma: no cover - _walk catches these first
        raise errors.InvalidPayload(f"{what} is not JSON: {exc}", what=what) from exc
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise errors.InvalidPayload(
            f"{what} is {size} bytes of JSON, over the limit of {max_bytes}",
            what=what, size=size, limit=max_bytes,
        )
    return text


def check_object(value: Any, *, what: str, max_bytes: int) -> str:
    """Like :func:`check`, and the value must be a JSON object (a dict)."""
    if not isinstance(value, dict):
        raise errors.InvalidPayload(
            f"{what} must be a JSON object (dict), not {type(value).__name__}", what=what
        )
    return check(value, what=what, max_bytes=max_bytes)


def _walk(root: Any, what: str) -> None:
    # Iterative, so that hostile nesting cannot exhaust the Python stack.
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        where = f"{what}{path}"
        if depth > MAX_DEPTH:
            raise errors.InvalidPayload(f"{what} nests deeper than {MAX_DEPTH} levels", what=what)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, int):
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                raise errors.InvalidPayload(f"{where} is {value!r}, which JSON cannot hold", what=what)
            continue
        if isinstance(value, str):
            _check_text(value, where, what)
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise errors.InvalidPayload(
                        f"{where} has a {type(key).__name__} key {key!r}; JSON keys are strings",
                        what=what,
                    )
                _check_text(key, f"a key of {where}", what)
                stack.append((item, f"{path}[{key!r}]", depth + 1))
            continue
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                stack.append((item, f"{path}[{index}]", depth + 1))
            continue
        raise errors.InvalidPayload(
            f"{where} is a {type(value).__name__}, which is not JSON", what=what
        )


def storable(text: str) -> bool:
    """Postgres text takes neither NUL nor lone surrogates (they are not valid UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text: str, where: str, what: str) -> None:
    if "\x00" in text:
        raise errors.InvalidPayload(f"{where} holds a NUL character", what=what)
    if not storable(text):
        raise errors.InvalidPayload(
            f"{where} holds a lone surrogate, which is not valid Unicode", what=what)


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, made storable (no NUL, no lone surrogates)."""
    return text[:limit].replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")
