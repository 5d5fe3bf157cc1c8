"""The native engine and the language name the same things in the same order, and the engine's
config carries every key: the Python/native boundary of the policy."""
from __future__ import annotations

import pytest

from moerun.native import _C
from moerun.policy import compile_policy, ir, schema
from moerun.policy.engine_setup import TRIGGER_CODES, engine_setup

VOCABULARY = _C.policy_vocabulary()
SHAPE = dict(num_layers=2, num_experts=8, top_k=2, num_slots=4, expert_bytes=100)


@pytest.mark.parametrize("native, python", [
    ("eviction", ir.EVICTIONS + ir.REPLAY_ONLY_EVICTIONS),
    ("prefetch", ir.PREFETCH_STRATEGIES),
    ("schedule", ir.SCHEDULE_MODES),
    ("allocation", ir.ALLOCATIONS),
    ("metric", ir.METRICS),
    ("op", ir.ADAPT_OPS),
    ("param", ir.ENGINE_PARAMS),
    ("trigger", TRIGGER_CODES),
])
def test_native_enum_names_match_the_language_in_order(native, python):
    assert tuple(VOCABULARY[native]) == tuple(python)


def test_every_adaptable_key_is_an_engine_param():
    assert set(schema.ADAPTABLE) <= set(ir.ENGINE_PARAMS)


def test_the_engine_setup_writes_exactly_the_keys_the_engine_requires():
    policy = compile_policy("""policy p {
        cache { capacity = 4 ttl = 50 }
        per_layer { allocation = entropy total_budget = 4 min_capacity = 1 }
        adapt { when hit_rate < 0.5 for 10 accesses { prefetch.budget = 1 trigger evict_ttl rebalance per_layer } }
    }""")
    config = engine_setup(policy, **SHAPE).config
    assert set(config) == set(VOCABULARY["config_keys"])
    assert set(config["rules"][0]) == set(VOCABULARY["rule_keys"])
    assert set(config["cost"]) == set(VOCABULARY["cost_keys"])
    _C.PolicyEngine(config)
    for key in VOCABULARY["config_keys"]:
        missing = {k: v for k, v in config.items() if k != key}
        with pytest.raises(ValueError, match=f"has no '{key}'"):
            _C.PolicyEngine(missing)
    with pytest.raises(ValueError, match="unknown key 'capcity'"):
        _C.PolicyEngine({**config, "capcity": 3})
    with pytest.raises(ValueError, match="eviction 9 is out of range"):
        _C.PolicyEngine({**config, "eviction": 9})
