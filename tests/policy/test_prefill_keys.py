"""The schedule block's prefill keys: what they accept, the errors they give, and where they arrive."""
import pytest

from moerun.policy import PolicyError, compile_policy, format_policy, parse
from moerun.policy.engine_setup import engine_setup
from moerun.policy.explain import explain


def _policy(schedule: str) -> str:
    return f"policy p {{\n    cache {{ capacity = 8 }}\n    schedule {{ {schedule} }}\n}}\n"


@pytest.mark.parametrize("schedule, message, col", [
    ("prefill_staging = 1.5", "'schedule.prefill_staging' = 1.5 is out of range", 34),
    ("prefill_staging = -0.1", "'schedule.prefill_staging' = -0.1 is out of range", 34),
    ("prefill_staging = auto", "'schedule.prefill_staging' cannot be auto", 34),
    ("prefill_staging = lots", "'schedule.prefill_staging' must be a number", 34),
    ("prefill_updates_cache = yes", "unknown value 'yes' for 'schedule.prefill_updates_cache'", 40),
    ("mode = cpu_fallback prefill_staging = 0.5",
     "'prefill_staging' has no effect unless schedule.mode = hybrid or gpu_only", 36),
    ("prefill_stagin = 0.5", "unknown key 'prefill_stagin'", 16),
])
def test_bad_prefill_keys_name_the_key_and_the_place(schedule, message, col):
    with pytest.raises(PolicyError) as info:
        compile_policy(_policy(schedule))
    text = str(info.value)
    assert message in text and f":3:{col}:" in text, text


def test_prefill_staging_names_every_mode_that_stages():
    # gpu_only (the default) stages prefill copies as hybrid does; only cpu_fallback makes the key inert.
    with pytest.raises(PolicyError) as info:
        compile_policy(_policy("mode = cpu_fallback prefill_staging = 0.5"))
    assert info.value.hint == "set mode = hybrid or gpu_only, or remove 'prefill_staging'", info.value.hint
    for schedule in ("prefill_staging = 0.5", "mode = gpu_only prefill_staging = 0.5",
                     "mode = hybrid prefill_staging = 0.5"):
        assert compile_policy(_policy(schedule)).schedule.prefill_staging == 0.5


def test_prefill_staging_range_and_fix_are_in_the_hint():
    with pytest.raises(PolicyError, match=r"must be in \[0, 1\]"):
        compile_policy(_policy("prefill_staging = 2"))


def test_prefill_keys_reach_the_engine_config_and_the_explanation():
    policy = compile_policy(_policy("mode = hybrid prefill_staging = 0.4 prefill_updates_cache = true"))
    assert policy.schedule.prefill_staging == 0.4 and policy.schedule.prefill_updates_cache is True
    config = engine_setup(policy, num_layers=2, num_experts=8, top_k=2, num_slots=8, expert_bytes=1024).config
    assert config["prefill_staging"] == 0.4 and config["prefill_updates_cache"] is True
    text = explain(policy)
    assert "at most 40% of the slots" in text and "prompt accesses update the cache" in text
    default = compile_policy(_policy("mode = hybrid"))
    assert default.schedule.prefill_staging == 0.25 and not default.schedule.prefill_updates_cache
    assert "leave the cache's recency and frequencies as decoding left them" in explain(default)
    assert "not resident runs on the CPU" in explain(compile_policy(_policy("mode = cpu_fallback")))


def test_prefill_keys_format_and_parse_back():
    text = _policy("prefill_staging = 0.1 prefill_updates_cache = false")
    canonical = format_policy(parse(text))
    assert "prefill_staging = 0.1" in canonical and "prefill_updates_cache = false" in canonical
    assert parse(canonical) == parse(format_policy(parse(canonical)))
    assert compile_policy(canonical).schedule == compile_policy(text).schedule
