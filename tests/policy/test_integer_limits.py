"""The validator rejects every whole number the native engine cannot hold, naming the limit.

Every integer setting of the schema is tried at its limit (accepted) and one above it (rejected
with the limit in the message): 2**31 for the engine's ``int`` fields, 2**63 for its ``int64_t``
ones, 2**53 for values an adapt rule assigns (they reach the engine as doubles). Values at the limit
are then run through the native engine where that allocates nothing in proportion to them.
"""
import re
from pathlib import Path

import numpy as np
import pytest

from moerun.policy import PolicyError, compile_policy, parse, schema, validate
from moerun.policy.validator import ADAPT_INT_MAX, INT32_MAX, INT64_MAX, INT64_SETTINGS, int_limit
from moerun.trace.replay import replay
from moerun.trace.workloads import synthetic_trace

INT_SETTINGS = [(block, key) for block, params in schema.BLOCKS.items() for key, p in params.items()
                if p.kind == "int"]
ADAPTABLE_INTS = [name for name, p in schema.ADAPTABLE.items() if p.kind == "int"]
TOO_LARGE = "larger than the engine can hold"


def _text(block: str, key: str, value: int) -> str:
    """A policy with ``block.key = value`` and whatever gives that setting a meaning."""
    cache = "capacity = auto"
    if (block, key) == ("cache", "freq_window"):
        cache += " eviction = freq_threshold"
    if block == "cache" and key != "capacity":
        return f"policy p {{ cache {{ {cache} {key} = {value} }} }}"
    if block == "cache":
        return f"policy p {{ cache {{ {key} = {value} }} }}"
    return f"policy p {{ cache {{ {cache} }} {block} {{ {key} = {value} }} }}"


def _diagnostics(text: str) -> list[str]:
    try:
        validate(parse(text))
    except PolicyError as err:
        return [f"{d.message} | {d.hint}" for d in err.diagnostics]
    return []


def test_every_integer_setting_has_a_limit_of_its_native_type():
    assert len(INT_SETTINGS) >= 14
    for block, key in INT_SETTINGS:
        expected = INT64_MAX if (block, key) in INT64_SETTINGS else INT32_MAX
        assert int_limit(f"{block}.{key}") == expected


@pytest.mark.parametrize("block,key", INT_SETTINGS, ids=[f"{b}.{k}" for b, k in INT_SETTINGS])
def test_an_integer_setting_is_checked_at_its_limit(block, key):
    limit = int_limit(f"{block}.{key}")
    at = _diagnostics(_text(block, key, limit))
    assert not [d for d in at if TOO_LARGE in d], at
    above = [d for d in _diagnostics(_text(block, key, limit + 1)) if TOO_LARGE in d]
    assert len(above) == 1 and f"at most {limit}" in above[0], above
    assert any(TOO_LARGE in d for d in _diagnostics(_text(block, key, 2**63)))  # past both types


@pytest.mark.parametrize("name", ADAPTABLE_INTS)
def test_an_adapt_rule_assigns_whole_numbers_a_double_holds(name):
    limit = min(int_limit(name), ADAPT_INT_MAX)

    def rule(value: int) -> str:
        eviction = " eviction = freq_threshold" if name == "cache.freq_window" else ""
        return (f"policy p {{ cache {{ capacity = auto{eviction} }} prefetch {{ strategy = history budget = 1 }} "
                f"adapt {{ when hit_rate < 0.5 {{ {name} = {value} }} }} }}")
    assert not [d for d in _diagnostics(rule(limit)) if TOO_LARGE in d]
    above = [d for d in _diagnostics(rule(limit + 1)) if TOO_LARGE in d]
    assert len(above) == 1 and f"at most {limit}" in above[0]
    if limit < int_limit(name):
        assert "adapt rule" in above[0]


@pytest.mark.parametrize("length,ok", [(INT64_MAX, True), (2**63, False), (10**30, False), (0, False)])
def test_an_adapt_window_fits_the_engines_int64(length, ok):
    text = f"policy p {{ cache {{ capacity = 4 }} adapt {{ when hit_rate < 0.5 for {length} accesses {{ eviction = lfu }} }} }}"
    problems = _diagnostics(text)
    assert (not problems) == ok, problems
    if not ok:
        assert str(INT64_MAX) in problems[0]


@pytest.mark.parametrize("pin,ok", [(f"[{INT32_MAX}]", True), (f"[{2**31}]", False), (f"[0:{2**31}]", False),
                                    (f"[{2**63}:0]", False)])
def test_pins_are_engine_ints(pin, ok):
    problems = _diagnostics(f"policy p {{ cache {{ capacity = 4 pin = {pin} }} }}")
    assert (not problems) == ok, problems


@pytest.mark.parametrize("text", ["２", "1２", "٣", "1e٣"])
def test_only_ascii_digits_are_numbers(text):
    with pytest.raises(PolicyError, match="unexpected character"):
        parse(f"policy p {{ cache {{ capacity = {text} }} }}")


def test_a_five_thousand_digit_number_is_a_diagnostic_not_a_crash():
    text = "policy p {\n    cache { capacity = " + "9" * 5000 + " }\n}\n"
    with pytest.raises(PolicyError) as err:
        parse(text, "big.moe")
    assert err.value.line == 2 and err.value.col == 24
    assert "5000 digits" in str(err.value) and str(INT64_MAX) in err.value.hint
    with pytest.raises(PolicyError, match="too large to hold"):  # a float that long is inf: not a number either
        compile_policy("policy p { cache { capacity = 4 } schedule { mode = hybrid offload_threshold_ms = "
                       + "9" * 400 + ".5 } }")


def test_the_native_engine_takes_the_int64_settings_at_their_limit():
    trace = synthetic_trace("zipf", num_tokens=64, num_layers=2, num_experts=8, top_k=2, seed=1)
    policy = compile_policy(
        f"policy p {{ cache {{ capacity = 6 eviction = lru ttl = {INT64_MAX} }} "
        f"per_layer {{ rebalance_interval = {INT64_MAX} }} "
        f"adapt {{ when hit_rate < 0.9 for {INT64_MAX} accesses {{ ttl = {ADAPT_INT_MAX} }} }} }}")
    stats = replay(trace, policy)
    assert stats["accesses"] == trace.num_accesses and stats["hit_rate"] > 0


def test_an_adapt_capacity_at_the_int_limit_no_longer_wraps():
    # The case: `capacity = N` with N >= 2**31 passed check and wrapped to 1 in the engine
    # (hit rate 0.00). The limit itself is clamped to the slots and keeps the cache working.
    trace = synthetic_trace("zipf", num_tokens=200, num_layers=2, num_experts=8, top_k=2, seed=2)
    rule = "adapt {{ when hit_rate < 1.0 for 10 accesses {{ capacity = {} }} }}"
    with pytest.raises(PolicyError, match=f"at most {INT32_MAX}"):
        compile_policy("policy p { cache { capacity = 6 } " + rule.format(2**31) + " }")
    policy = compile_policy("policy p { cache { capacity = 6 } " + rule.format(INT32_MAX) + " }")
    stats = replay(trace, policy, num_slots=8)
    assert stats["adapt_firing_count"] > 0 and stats["hit_rate"] > 0.3


def test_the_limits_match_the_engines_field_types():
    header = Path(__file__).resolve().parents[2] / "csrc" / "policy_engine.h"
    if not header.is_file():
        pytest.skip("needs the source tree")
    config = re.search(r"struct EngineConfig \{(.*?)\n\};", header.read_text(), re.S).group(1)
    int64_fields = {name for line in config.splitlines() if line.strip().startswith("int64_t")
                    for name in re.findall(r"(\w+)\s*=", line)}
    for block, key in INT_SETTINGS:
        if key in int64_fields:
            assert (block, key) in INT64_SETTINGS, f"{block}.{key} is int64_t in the engine"
    assert {key for block, key in INT64_SETTINGS if block != "host"} <= int64_fields
    assert np.iinfo(np.int32).max == INT32_MAX and np.iinfo(np.int64).max == INT64_MAX
