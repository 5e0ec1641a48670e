"""RetryPolicy: parsing the ``retry=`` option and the delay before each retry."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from durable_celery.definitions import RetryPolicy
from durable_celery.errors import InvalidArgument

# ----------------------------------------------------------------------------- parse


def test_parse_none_gives_the_defaults() -> None:
    assert RetryPolicy.parse(None) == RetryPolicy()
    assert RetryPolicy() == RetryPolicy(max_attempts=1, backoff="exponential", delay=1.0,
                                        max_delay=300.0, jitter=True)


def test_parse_returns_a_policy_unchanged() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert RetryPolicy.parse(policy) is policy


def test_parse_a_dict() -> None:
    policy = RetryPolicy.parse({"max_attempts": 5, "backoff": "linear", "delay": 2,
                                "max_delay": 10.5, "jitter": False})
    assert policy == RetryPolicy(max_attempts=5, backoff="linear", delay=2, max_delay=10.5,
                                 jitter=False)


def test_parse_a_partial_dict_keeps_other_defaults() -> None:
    assert RetryPolicy.parse({"max_attempts": 4}) == RetryPolicy(max_attempts=4)


def test_unknown_keys_are_rejected_and_named() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown retry option\(s\) \['attempts', 'tries'\]"):
        RetryPolicy.parse({"attempts": 3, "tries": 2})  # type: ignore[typeddict-unknown-key]


@pytest.mark.parametrize("options", [[("max_attempts", 3)], "3", 3])
def test_non_dicts_are_rejected(options: Any) -> None:
    with pytest.raises(InvalidArgument, match="retry must be a dict"):
        RetryPolicy.parse(options)


@pytest.mark.parametrize("options, problem", [
    ({"max_attempts": 0}, "max_attempts must be an int >= 1"),
    ({"max_attempts": -1}, "max_attempts must be an int >= 1"),
    ({"max_attempts": "3"}, "max_attempts must be an int >= 1"),
    ({"max_attempts": 2.0}, "max_attempts must be an int >= 1"),
    ({"max_attempts": True}, "max_attempts must be an int >= 1"),
    ({"backoff": "quadratic"}, "backoff must be 'exponential', 'linear' or 'constant'"),
    ({"backoff": None}, "backoff must be"),
    ({"delay": -1}, "delay must be a finite number of seconds >= 0"),
    ({"delay": "1"}, "delay must be a finite number of seconds >= 0"),
    ({"delay": True}, "delay must be a finite number of seconds >= 0"),
    ({"delay": math.nan}, "delay must be a finite number of seconds >= 0"),
    ({"max_delay": -0.5}, "max_delay must be a finite number of seconds >= 0"),
    ({"max_delay": None}, "max_delay must be a finite number of seconds >= 0"),
    ({"jitter": 1}, "jitter must be a bool"),
    ({"jitter": "yes"}, "jitter must be a bool"),
])
def test_bad_values_are_rejected(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        RetryPolicy.parse(options)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- delays


@pytest.mark.parametrize("backoff, expected", [
    ("constant", [2.0, 2.0, 2.0, 2.0, 2.0]),
    ("linear", [2.0, 4.0, 6.0, 8.0, 10.0]),
    ("exponential", [2.0, 4.0, 8.0, 16.0, 32.0]),
])
def test_delay_after_each_backoff(backoff: Any, expected: list[float]) -> None:
    policy = RetryPolicy(backoff=backoff, delay=2.0, max_delay=1000.0, jitter=False)
    assert [policy.delay_after(n) for n in range(1, 6)] == expected


def test_zero_attempts_counts_as_one() -> None:
    policy = RetryPolicy(backoff="linear", delay=3.0, jitter=False)
    assert policy.delay_after(0) == policy.delay_after(1) == 3.0


@pytest.mark.parametrize("backoff", ["constant", "linear", "exponential"])
def test_max_delay_caps_the_delay(backoff: Any) -> None:
    policy = RetryPolicy(backoff=backoff, delay=50.0, max_delay=60.0, jitter=False)
    assert [policy.delay_after(n) for n in (1, 2, 3, 10)] == (
        [50.0, 60.0, 60.0, 60.0] if backoff != "constant" else [50.0, 50.0, 50.0, 50.0]
    )


def test_a_cap_below_the_base_delay_still_caps() -> None:
    policy = RetryPolicy(backoff="constant", delay=10.0, max_delay=4.0, jitter=False)
    assert policy.delay_after(1) == 4.0


def test_huge_attempt_counts_do_not_overflow() -> None:
    policy = RetryPolicy(backoff="exponential", delay=1.0, max_delay=300.0, jitter=False)
    assert policy.delay_after(10_000) == 300.0
    assert policy.delay_after(2**40) == 300.0


def test_delay_is_a_float() -> None:
    policy = RetryPolicy(backoff="constant", delay=3, max_delay=10, jitter=False)
    assert isinstance(policy.delay_after(1), float)


@pytest.mark.parametrize("backoff", ["constant", "linear", "exponential"])
def test_jitter_stays_within_half_to_full_delay(backoff: Any) -> None:
    policy = RetryPolicy(backoff=backoff, delay=4.0, max_delay=100.0, jitter=True)
    exact = RetryPolicy(backoff=backoff, delay=4.0, max_delay=100.0, jitter=False)
    rng = random.Random(1234)
    for attempts in range(1, 8):
        d = exact.delay_after(attempts)
        draws = [policy.delay_after(attempts, rng) for _ in range(300)]
        assert all(d / 2 <= x <= d for x in draws), (attempts, d, min(draws), max(draws))
        # Really spread over the range, not pinned to one end.
        assert min(draws) < d * 0.6 and max(draws) > d * 0.9


def test_jitter_respects_the_cap() -> None:
    policy = RetryPolicy(backoff="exponential", delay=1.0, max_delay=10.0, jitter=True)
    rng = random.Random(7)
    assert all(5.0 <= policy.delay_after(20, rng) <= 10.0 for _ in range(200))


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy(delay=1.0, jitter=True)
    first = [policy.delay_after(3, random.Random(42)) for _ in range(3)]
    assert first[0] == first[1] == first[2]


def test_jitter_of_a_zero_delay_is_zero() -> None:
    policy = RetryPolicy(delay=0.0, jitter=True)
    assert policy.delay_after(5, random.Random(1)) == 0.0
