"""Every semantic rule of the validator: one failing policy each, checked by message and position."""
import pytest

from moerun.policy import PolicyError, compile_policy, parse, validate


def policy(*blocks: str, name: str = "p") -> str:
    return f"policy {name} {{\n" + "\n".join(blocks) + "\n}\n"


CACHE = "cache { capacity = 8 }"

# (rule id, text, substring of the one expected message, model shape)
RULES = [
    ("version", "version 2\n" + policy(CACHE), "unsupported language version 2", {}),
    ("no_policy", "# nothing here\n", "defines no policy", {}),
    ("policy_twice", policy(CACHE) + policy(CACHE), "policy 'p' is defined twice", {}),
    ("unknown_block", policy(CACHE, "prefech { budget = 1 }"), "unknown block 'prefech'", {}),
    ("unsupported_block", policy(CACHE, "hierarchy { eviction = lru }"), "unknown block 'hierarchy'", {}),
    ("block_twice", policy(CACHE, CACHE), "block 'cache' appears twice", {}),
    ("needs_cache", policy("schedule { mode = hybrid }"), "neither a cache nor a per_layer block", {}),
    ("empty_block", policy(CACHE, "schedule { }"), "block 'schedule' is empty", {}),
    ("unknown_key", policy("cache { capacity = 8 evicton = lru }"), "unknown key 'evicton'", {}),
    ("key_twice", policy("cache { capacity = 8 capacity = 4 }"), "'capacity' is set twice", {}),
    ("not_auto", policy("cache { capacity = 8 ttl = auto }"), "'cache.ttl' cannot be auto", {}),
    ("not_number", policy("cache { capacity = lots }"), "'cache.capacity' must be a number", {}),
    ("whole_number", policy("cache { capacity = 8.5 }"), "must be a whole number", {}),
    ("out_of_range", policy("cache { capacity = 0 }"), "'cache.capacity' = 0 is out of range", {}),
    ("fraction_range", policy("cache { capacity = 8 eviction = lfu frequency_decay = 1.5 }"),
     "'cache.frequency_decay' = 1.5 is out of range", {}),
    ("enum_type", policy("cache { capacity = 8 eviction = 3 }"), "'cache.eviction' must be one of", {}),
    ("enum_value", policy("cache { capacity = 8 eviction = lruu }"), "unknown value 'lruu'", {}),
    ("bool_value", policy(CACHE, "schedule { overlap = yes }"), "unknown value 'yes' for 'schedule.overlap'", {}),
    ("metrics_list", policy(CACHE, "monitor { metrics = hit_rate }"), "must be a list", {}),
    ("metrics_names", policy(CACHE, "monitor { metrics = [1] }"), "lists metric names", {}),
    ("metrics_unknown", policy(CACHE, "monitor { metrics = [hit_rat] }"), "unknown metric 'hit_rat'", {}),
    ("metrics_twice", policy(CACHE, "monitor { metrics = [hit_rate, hit_rate] }"), "listed twice", {}),
    ("pin_list", policy("cache { capacity = 8 pin = 3 }"), "'cache.pin' must be a list", {}),
    ("pin_entries", policy("cache { capacity = 8 pin = [lru] }"), "entries must be expert ids", {}),
    ("pin_negative", policy("cache { capacity = 8 pin = [-1] }"), "entries must be expert ids", {}),
    ("pin_twice", policy("cache { capacity = 8 pin = [3, 3] }"), "expert 3 is pinned twice", {}),
    ("pin_expert_range", policy("cache { capacity = 8 pin = [9] }"), "pinned expert 9 does not exist",
     {"num_experts": 8}),
    ("pin_layer_range", policy("cache { capacity = 8 pin = [4:1] }"), "pinned layer 4 does not exist",
     {"num_layers": 4}),
    ("adapt_empty", policy(CACHE, "adapt { }"), "adapt block has no rules", {}),
    ("adapt_metric", policy(CACHE, "adapt { when hit_rat < 0.4 { eviction = lfu } }"), "unknown metric 'hit_rat'", {}),
    ("adapt_fraction", policy(CACHE, "adapt { when hit_rate < 40 { eviction = lfu } }"), "is a fraction", {}),
    ("adapt_negative", policy(CACHE, "adapt { when layer_latency_ms < -1 { eviction = lfu } }"),
     "is never negative", {}),
    ("adapt_window", policy(CACHE, "adapt { when hit_rate < 0.4 for 0 accesses { eviction = lfu } }"),
     "window must be a whole number", {}),
    ("adapt_unit", policy(CACHE, "adapt { when hit_rate < 0.4 for 10 tokens { eviction = lfu } }"),
     "unknown window unit 'tokens'", {}),
    ("adapt_no_action", policy(CACHE, "adapt { when hit_rate < 0.4 { } }"), "does nothing", {}),
    ("rebalance_target", policy(CACHE, "adapt { when hit_rate < 0.4 { rebalance cache } }"),
     "cannot rebalance 'cache'", {}),
    ("rebalance_block", policy(CACHE, "adapt { when hit_rate < 0.4 { rebalance per_layer } }"),
     "needs a per_layer block", {}),
    ("adapt_param", policy(CACHE, "adapt { when hit_rate < 0.4 { evction = lfu } }"),
     "unknown parameter 'evction'", {}),
    ("adapt_not_adaptable", policy(CACHE, "adapt { when hit_rate < 0.4 { pin = [1] } }"),
     "'cache.pin' cannot change at run time", {}),
    ("adapt_twice", policy(CACHE, "adapt { when hit_rate < 0.4 { eviction = lfu cache.eviction = lru } }"),
     "'cache.eviction' is set twice in one rule", {}),
    ("adapt_value", policy(CACHE, "adapt { when hit_rate < 0.4 { eviction = lruu } }"), "unknown value 'lruu'", {}),
    ("trigger_unknown", policy(CACHE, "adapt { when hit_rate < 0.4 { trigger flush } }"), 
     "unknown trigger 'flush'", {}),
    ("trigger_ttl", policy(CACHE, "adapt { when hit_rate < 0.4 { trigger evict_ttl } }"), "needs a ttl", {}),
    ("requires_choice", policy("cache { capacity = 8 frequency_decay = 0.9 }"),
     "'frequency_decay' has no effect unless cache.eviction = lfu", {}),
    ("requires_score", policy("cache { capacity = 8 eviction = lfu score_ema_alpha = 0.2 }"),
     "'score_ema_alpha' has no effect unless cache.eviction = score", {}),
    ("requires_mode", policy(CACHE, "schedule { offload_threshold_ms = 2 }"),
     "'offload_threshold_ms' has no effect unless schedule.mode = hybrid", {}),
    ("watermarks", policy("cache { capacity = 8 eviction = watermark high_watermark = 0.5 low_watermark = 0.6 }"),
     "low_watermark (0.6) must be below high_watermark (0.5)", {}),
    ("host_watermarks", policy(CACHE, "host { high_watermark = 0.5 low_watermark = 0.5 }"),
     "host.low_watermark (0.5) must be below", {}),
    ("memory_budget", policy("cache { capacity = 8 memory_threshold = 0.8 }"), "no effect without a memory budget", {}),
    ("budget_zero", policy(CACHE, "prefetch { strategy = history budget = 0 }"), "never prefetches", {}),
    ("budget_capacity", policy("cache { capacity = 2 }", "prefetch { strategy = history budget = 4 }"),
     "prefetch budget 4 exceeds the cache capacity 2", {}),
    ("pins_capacity", policy("cache { capacity = 2 pin = [1, 2, 3] }"), "3 pinned experts do not fit", {}),
    ("pins_every_layer", policy("cache { capacity = 3 pin = [1, 2] }"), "4 pinned experts do not fit",
     {"num_layers": 2}),
    ("capacity_model", policy("cache { capacity = 100 }"), "exceeds the model's 32 routed experts",
     {"num_layers": 4, "num_experts": 8}),
    ("host_capacity", policy(CACHE, "host { capacity = 4 }"), "host capacity 4 is below", {}),
    ("min_max", policy("per_layer { min_capacity = 4 max_capacity = 2 }"), 
     "min_capacity (4) exceeds max_capacity (2)", {}),
    ("total_min", policy("per_layer { total_budget = 2 min_capacity = 3 }"), 
     "total_budget 2 is below min_capacity 3", {}),
    ("total_layers", policy("per_layer { total_budget = 10 min_capacity = 3 }"), "cannot give 4 layers 3 slots each",
     {"num_layers": 4}),
    ("total_max", policy("per_layer { total_budget = 100 max_capacity = 3 }"), "exceeds 4 layers x max_capacity 3",
     {"num_layers": 4}),
    ("max_experts", policy("per_layer { max_capacity = 9 }"), 
     "max_capacity 9 exceeds the 8 experts", {"num_experts": 8}),
]


def test_there_are_at_least_25_rules():
    assert len({rule_id for rule_id, *_ in RULES}) >= 25


@pytest.mark.parametrize("rule_id,text,expected,shape", RULES, ids=[r[0] for r in RULES])
def test_rule(rule_id, text, expected, shape):
    with pytest.raises(PolicyError) as info:
        validate(parse(text, "rule.moe"), **shape)
    messages = [d.message for d in info.value.diagnostics]
    assert len(messages) == 1, messages
    assert expected in messages[0]
    assert info.value.file == "rule.moe"
    if rule_id != "no_policy":
        assert info.value.line >= 1 and info.value.col >= 1
        assert "^" in info.value.caret_line


def test_model_shape_rules_pass_without_the_shape():
    for rule_id, text, _expected, shape in RULES:
        if shape:
            validate(parse(text))  # the shape is what makes them wrong


def test_unsupported_block_hint_names_the_host_block():
    with pytest.raises(PolicyError, match=r"host \{ capacity = N \}"):
        validate(parse(policy(CACHE, "hierarchy { eviction = lru }")))


def test_did_you_mean_hints():
    with pytest.raises(PolicyError) as info:
        validate(parse(policy("cache { capacity = 8 evicton = lru }", "schedule { mode = hybird }")))
    hints = [d.hint for d in info.value.diagnostics]
    assert hints == ["did you mean 'eviction'?", "did you mean 'hybrid'?"]


def test_independent_errors_reported_together_in_source_order():
    text = policy("cache { capacity = 0 }", "prefetch { strategy = histroy }",
                  "adapt { when hit_rat < 0.5 { eviction = lru } }")
    with pytest.raises(PolicyError) as info:
        validate(parse(text))
    lines = [d.line for d in info.value.diagnostics]
    assert len(lines) == 3 and lines == sorted(lines)
    assert "3 errors" in str(info.value)


def test_one_typo_gives_one_error_not_a_cascade():
    text = policy("cache { capacity = 8 evicton = lfu frequency_decay = 0.9 }",
                  "prefetch { strategy = histroy budget = 4 }")
    with pytest.raises(PolicyError) as info:
        validate(parse(text))
    assert len(info.value.diagnostics) == 2


def test_caret_points_at_the_offending_text():
    with pytest.raises(PolicyError) as info:
        validate(parse("policy p {\n    cache { capacity = 8 eviction = lruu }\n}\n"))
    d = info.value.diagnostics[0]
    assert (d.line, d.col) == (2, 37)
    assert d.source_line[d.col - 1:].startswith("lruu")
    assert d.caret_line == " " * 36 + "^^^^"


def test_adapt_rule_makes_a_strategy_parameter_meaningful():
    text = policy("cache { capacity = 8 eviction = lru frequency_decay = 0.9 }",
                  "adapt { when hit_rate < 0.3 { eviction = lfu } }")
    validate(parse(text))


def test_moe_policylang_spellings_are_accepted():
    text = ("version 0.7\n" + policy("cache { capacity = 4 eviction = lru }", "per_layer { total_budget = 64 }",
                                      "prefetch { strategy = none budget = 2 }",
                                      "adapt { when hit_rate < 0.3 { lfu_decay = 0.8 } "
                                      "when eviction_rate > 0.5 { trigger memory_pressure } "
                                      "when hit_rate < 0.2 { rebalance entropy } }"))
    p = compile_policy(text)
    assert compile_policy(policy(CACHE, "monitor { metrics = [hit_rate, latency] }")).monitor.metrics == (
        "hit_rate", "layer_latency_ms")
    assert p.adapt[0].assignments == (("cache.frequency_decay", 0.8),)
    assert p.adapt[1].triggers == ("evict_memory",) and p.adapt[2].rebalances == ("per_layer",)


@pytest.mark.parametrize("capacity", [1, 2])
def test_small_capacities_are_legal(capacity):
    assert compile_policy(policy(f"cache {{ capacity = {capacity} eviction = lru }}")).cache.capacity == capacity


def test_valid_shape_checks_pass():
    text = policy("cache { capacity = 16 pin = [0:1, 3] }",
                  "per_layer { total_budget = 16 min_capacity = 2 max_capacity = 8 }")
    validate(parse(text), num_layers=4, num_experts=8)


def test_a_tree_built_in_code_with_an_infinite_number_is_refused_by_validate_and_format():
    # The parser refuses such numbers (tests/policy/test_language.py); a tree built in code can hold one.
    from dataclasses import replace

    from moerun.policy import format_policy, syntax

    tree = parse(policy("cache { capacity = 8 memory_budget_gb = 2.5 }"), "rule.moe")
    block = tree.policies[0].sections[0]
    setting = replace(block.settings[1], value=syntax.Number(float("inf"), block.settings[1].value.span))
    tree = replace(tree, policies=(replace(tree.policies[0], sections=(replace(block, settings=(
        block.settings[0], setting)),)),))
    with pytest.raises(PolicyError, match="'cache.memory_budget_gb' must be finite"):
        validate(tree)
    with pytest.raises(ValueError, match="cannot format the number inf"):
        format_policy(tree)
