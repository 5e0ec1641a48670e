"""payloads.check / check_object: what may be stored as jsonb, and the errors for the rest."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable_celery import payloads
from durable_celery.errors import InvalidArgument, InvalidPayload

BIG = 10_000_000


def check(value: Any, max_bytes: int = BIG) -> str:
    return payloads.check(value, what="state", max_bytes=max_bytes)


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` lists around ``leaf``: the leaf sits at nesting level ``depth``."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# ----------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**70, 1.5, -0.0, 1e308, "", "héllo ✓", [], {},
    [1, "a", None, [True, {"k": 2.5}]],
    {"a": {"b": [1, 2, {"c": None}]}, "": "empty key is fine"},
])
def test_json_values_round_trip(value: Any) -> None:
    text = check(value)
    assert json.loads(text) == value


def test_tuples_are_encoded_as_lists() -> None:
    assert json.loads(check({"t": (1, 2)})) == {"t": [1, 2]}


def test_output_is_compact() -> None:
    assert check({"a": [1, 2]}) == '{"a":[1,2]}'


def test_check_object_accepts_a_dict_and_returns_its_json() -> None:
    assert payloads.check_object({"n": 1}, what="state", max_bytes=100) == '{"n":1}'


# ----------------------------------------------------------------------------- rejected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_rejected(value: float) -> None:
    with pytest.raises(InvalidPayload, match=r"state\['x'\]\[1\] is .*which JSON cannot hold"):
        check({"x": [0, value]})


@pytest.mark.parametrize("key", [1, 1.5, None, True, (1, 2)])
def test_non_string_keys_are_rejected(key: Any) -> None:
    # json.dumps would silently turn {1: "a"} into {"1": "a"}: the round trip would lie.
    with pytest.raises(InvalidPayload, match=rf"state has a {type(key).__name__} key .*"
                                             "JSON keys are strings"):
        check({key: "a"})


def test_bytes_are_rejected() -> None:
    with pytest.raises(InvalidPayload, match=r"state\['blob'\] is a bytes, which is not JSON"):
        check({"blob": b"\x01\x02"})


@pytest.mark.parametrize("value, name", [({1, 2}, "set"), (frozenset(), "frozenset")])
def test_sets_are_rejected(value: Any, name: str) -> None:
    with pytest.raises(InvalidPayload, match=rf"state\[0\] is a {name}, which is not JSON"):
        check([value])


def test_arbitrary_objects_are_rejected() -> None:
    class Order:
        pass

    with pytest.raises(InvalidPayload, match=r"state\['order'\] is a Order, which is not JSON"):
        check({"order": Order()})
    with pytest.raises(InvalidPayload, match="is a object"):
        check(object())


def test_nul_in_a_string_is_rejected() -> None:
    # Postgres jsonb cannot hold \u0000.
    with pytest.raises(InvalidPayload, match=r"state\['name'\] holds a NUL character"):
        check({"name": "a\x00b"})


def test_nul_in_a_key_is_rejected() -> None:
    with pytest.raises(InvalidPayload, match=r"a key of state\['outer'\] holds a NUL character"):
        check({"outer": {"k\x00": 1}})


@pytest.mark.parametrize("value", [{"name": "\ud800"}, {"k\udc00": 1}, ["ok", "a\udfffb"]])
def test_lone_surrogates_are_rejected(value: Any) -> None:
    # json.dumps writes "\ud800" happily, but Postgres refuses it in jsonb ("invalid input
    # syntax for type json"): the value passes the check, then fails at commit time with a
    # StorageError instead of a clear InvalidPayload.
    with pytest.raises(InvalidPayload, match=r"(?i)surrogate|unicode|utf-8"):
        check(value)


def test_nesting_up_to_max_depth_is_accepted() -> None:
    assert json.loads(check(nested(payloads.MAX_DEPTH))) == nested(payloads.MAX_DEPTH)


def test_nesting_beyond_max_depth_is_rejected() -> None:
    with pytest.raises(InvalidPayload, match=f"nests deeper than {payloads.MAX_DEPTH} levels"):
        check(nested(payloads.MAX_DEPTH + 1))


def test_hostile_nesting_is_an_invalid_payload_not_a_recursion_error() -> None:
    value: Any = {}
    for _ in range(100_000):
        value = {"k": value}
    with pytest.raises(InvalidPayload, match="nests deeper"):
        check(value)


def test_size_limit_counts_encoded_bytes() -> None:
    value = {"s": "x" * 100}
    size = len(check(value).encode())
    assert check(value, max_bytes=size)  # exactly at the limit: accepted
    with pytest.raises(InvalidPayload, match=f"state is {size} bytes of JSON, over the limit "
                                             f"of {size - 1}") as info:
        check(value, max_bytes=size - 1)
    assert info.value.details == {"what": "state", "size": size, "limit": size - 1}


def test_size_limit_counts_escaped_non_ascii() -> None:
    # "é" is written as \u00e9: six bytes on the wire, not one character.
    assert len(check("é").encode()) == 8
    with pytest.raises(InvalidPayload, match="over the limit"):
        check("é", max_bytes=7)


@pytest.mark.parametrize("value", [[1], "text", 3, None])
def test_check_object_rejects_non_dicts(value: Any) -> None:
    with pytest.raises(InvalidPayload,
                       match=f"state must be a JSON object \\(dict\\), not {type(value).__name__}"):
        payloads.check_object(value, what="state", max_bytes=BIG)


def test_check_object_still_checks_the_contents() -> None:
    with pytest.raises(InvalidPayload, match="holds a NUL"):
        payloads.check_object({"a": "\x00"}, what="state", max_bytes=BIG)


def test_the_error_names_what_was_checked() -> None:
    with pytest.raises(InvalidPayload, match=r"^signal payload\['p'\] is a set") as info:
        payloads.check({"p": set()}, what="signal payload", max_bytes=BIG)
    assert info.value.details["what"] == "signal payload"
    assert isinstance(info.value, InvalidArgument)
    assert info.value.status == 400


# ----------------------------------------------------------------------------- property

keys = st.text(max_size=5) | st.integers() | st.sampled_from(["\x00", "k\x00", "plain"])
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # includes nan, inf, -inf
    | st.text(max_size=10)
    | st.sampled_from(["\x00", "a\x00b", "ok"])
)
json_ish = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=25,
)


def storable(value: Any) -> bool:
    """The oracle: what a faithful jsonb round trip can hold."""
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, list):
        return all(storable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and "\x00" not in k and storable(v)
                   for k, v in value.items())
    return False


@settings(max_examples=400, database=None)
@given(json_ish)
def test_check_round_trips_or_raises_invalid_payload(value: Any) -> None:
    try:
        text = check(value)
    except InvalidPayload:
        assert not storable(value), f"rejected a storable value: {value!r}"
        return
    assert storable(value), f"accepted a value jsonb cannot hold faithfully: {value!r}"
    assert json.loads(text) == value


@settings(max_examples=200, database=None)
@given(json_ish.filter(storable))
def test_size_limit_is_exact(value: Any) -> None:
    size = len(check(value).encode())
    assert check(value, max_bytes=size)
    with pytest.raises(InvalidPayload, match="over the limit"):
        check(value, max_bytes=size - 1)
