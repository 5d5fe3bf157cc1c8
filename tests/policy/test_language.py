"""Parsing, compiling and loading: the seed README examples verbatim, syntax errors, spec forms."""
import textwrap
from pathlib import Path

import pytest

from moerun.policy import PolicyError, bundled_policies, compile_policy, format_policy, ir, parse, validate

# -- the MoE-PolicyLang README examples, verbatim ---------------------------------------------------
SEED_BALANCED = """\
policy balanced {
    cache {
        capacity = 16
        eviction = lfu
        frequency_decay = 0.9
    }
    prefetch {
        strategy = history
        budget = 4
    }
    schedule { mode = hybrid }
    adapt {
        when hit_rate < 0.4 for 100 accesses
            { eviction = lru }
    }
}
"""
SEED_AGGRESSIVE = """
    policy aggressive {
        cache { capacity = 8  eviction = lru }
    }
"""
SEED_VLLM_DEMO = '''
        policy demo {
            cache { capacity = 8  eviction = lru }
            prefetch { strategy = lookahead  lookahead = 1 }
            schedule { mode = gpu_only }
        }
    '''
# Fragments the README shows on their own; they are blocks, so they go inside a policy.
SEED_PER_LAYER = """\
per_layer {
    allocation         = uniform
    total_budget       = 864
    rebalance_interval = 500
    min_capacity       = 4
    max_capacity       = 48
}
"""
SEED_ADAPT = """\
adapt {
    when hit_rate < 0.4 for 100 accesses { eviction = lru }
}
"""


def test_seed_balanced():
    p = compile_policy(SEED_BALANCED)
    assert p.name == "balanced"
    assert (p.cache.capacity, p.cache.eviction, p.cache.frequency_decay) == (16, "lfu", 0.9)
    assert (p.prefetch.strategy, p.prefetch.budget) == ("history", 4)
    assert p.schedule.mode == "hybrid"
    assert p.adapt == (ir.AdaptRule("hit_rate", "<", 0.4, 100, (("cache.eviction", "lru"),)),)


def test_seed_aggressive_and_vllm_demo():
    agg = compile_policy(SEED_AGGRESSIVE)
    assert (agg.name, agg.cache.capacity, agg.cache.eviction) == ("aggressive", 8, "lru")
    demo = compile_policy(SEED_VLLM_DEMO)
    assert (demo.prefetch.strategy, demo.prefetch.lookahead) == ("lookahead", 1)
    assert demo.prefetch.budget == 4  # a strategy without a budget gets the default
    assert demo.schedule.mode == "gpu_only"


def test_seed_per_layer_fragment():
    p = compile_policy("policy plcb {\n" + SEED_PER_LAYER + "}\n")
    assert p.per_layer == ir.PerLayerConfig("uniform", 864, 4, 48, 500, 1000)


def test_seed_adapt_fragment():
    p = compile_policy("policy a {\ncache { capacity = 4 eviction = lfu }\n" + SEED_ADAPT + "}\n")
    assert p.adapt[0].assignments == (("cache.eviction", "lru"),)


# -- syntax ------------------------------------------------------------------------------------------
def test_version_comments_semicolons_and_multiple_policies():
    text = textwrap.dedent("""\
        version 1  # header
        # first
        policy a { cache { capacity = 4; eviction = lru; } }
        policy b { cache { capacity = auto } host { capacity = 64 eviction = lfu } }
    """)
    f = parse(text)
    assert f.version.number.value == 1 and [p.name for p in f.policies] == ["a", "b"]
    assert compile_policy(text, name="a").name == "a"
    b = compile_policy(text, name="b")
    assert b.cache.capacity == ir.AUTO and b.host == ir.HostConfig(64, "lfu")
    with pytest.raises(PolicyError, match="no policy named 'c'"):
        compile_policy(text, name="c")


def test_a_file_of_several_policies_without_a_name_is_refused_naming_them(tmp_path: Path, capsys):
    from moerun.cli import main
    from moerun.loader import _compile_policy  # what moerun.load and model.moerun.set_policy compile with
    from moerun.trace.format import write_trace
    from moerun.trace.workloads import synthetic_trace

    f = tmp_path / "two.moe"
    f.write_text("policy a { cache { capacity = 4 } }\npolicy b { cache { capacity = 8 } }\n")
    for compile_one in (compile_policy, _compile_policy):
        for spec in (str(f), f.read_text()):
            with pytest.raises(PolicyError) as info:
                compile_one(spec)
            err = info.value
            assert "2 policies are defined here (a, b) and one is needed" in str(err)
            assert (err.line, err.col) == (2, 8) and "name='b'" in err.hint  # at the second policy's name
    assert compile_policy(str(f), name="b").cache.capacity == 8
    trace = write_trace(tmp_path / "t.npz", synthetic_trace("zipf", num_tokens=20, num_layers=2, num_experts=8,
                                                            top_k=2, seed=1))
    assert main(["trace", "replay", str(trace), "--policy", str(f)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"{f}:2:8: error: 2 policies are defined here (a, b)" in err and f"`{f}:b`" in err
    # sweep takes a file of several as each of its policies
    assert main(["trace", "sweep", str(trace), "--policies", str(f), "--capacities", "4", "--no-belady"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["a", "b"]
    # Commands over the whole file keep taking every policy in it.
    assert main(["policy", "check", str(f)]) == 0 and "ok (a, b)" in capsys.readouterr().out
    assert main(["policy", "explain", str(f)]) == 0 and "policy b" in capsys.readouterr().out
    assert main(["policy", "explain", str(f), "--name", "b"]) == 0


def test_pin_forms_and_qualified_adapt_keys():
    p = compile_policy("policy p { cache { capacity = 8 pin = [3, 1:7] } "
                       "adapt { when miss_rate >= 0.5 { prefetch_strategy = affinity prefetch.budget = 2 "
                       "schedule_mode = cpu_fallback } } }")
    assert p.cache.pin == ((-1, 3), (1, 7))
    assert p.adapt[0].assignments == (("prefetch.strategy", "affinity"), ("prefetch.budget", 2),
                                      ("schedule.mode", "cpu_fallback"))
    assert p.adapt[0].window == ir.MonitorConfig().window  # no `for`: the monitor window


def test_every_comparison_and_action_kind():
    ops = ["<", "<=", ">", ">=", "==", "!="]
    rules = " ".join(f"when hit_rate {op} 0.5 {{ trigger reset_stats }}" for op in ops)
    p = compile_policy(f"policy p {{ cache {{ capacity = 4 }} per_layer {{ min_capacity = 1 }} "
                       f"adapt {{ {rules} when cpu_share > 0.1 {{ rebalance per_layer }} }} }}")
    assert [r.op for r in p.adapt[:6]] == ops
    assert p.adapt[-1].rebalances == ("per_layer",)


@pytest.mark.parametrize("text,message,line,col", [
    ("policy p { cache { capacity = } }", "unexpected '}'", 1, 31),
    ("policy p {\n  cache { capacity = 3 }\n", "unexpected end of file", 2, 25),
    ("policy p { cache { capacity = 3 $ } }", "unexpected character '$'", 1, 33),
    ("policy p { adapt { when hit_rate < 0.4 eviction = lru } }", "unexpected 'eviction'", 1, 40),
    ("cache { capacity = 3 }", "unexpected 'cache'", 1, 1),
])
def test_syntax_errors_are_policy_errors(text, message, line, col):
    with pytest.raises(PolicyError) as info:
        parse(text, "bad.moe")
    err = info.value
    assert message in str(err) and (err.file, err.line, err.col) == ("bad.moe", line, col)
    assert err.hint.startswith("expected") and "^" in err.caret_line
    assert "Traceback" not in str(err) and "lark" not in str(err).lower()


@pytest.mark.parametrize("number,message", [
    ("1e400", "the number 1e400 is too large to hold"), ("-2.5e308", "the number -2.5e308 is too large to hold"),
    ("1e-400", "the number 1e-400 is too small to hold: it would read as 0"),
])
def test_a_number_beyond_a_float_is_a_diagnostic_at_the_number(number, message):
    # Read as inf (or 0) it could only be formatted as the word `inf` (or 0.0): fmt would change the file.
    for text in (f"policy p {{ cache {{ capacity = 4 frequency_decay = {number} }} }}",
                 f"policy p {{ cache {{ capacity = 4 }} adapt {{ when hit_rate < {number} {{ eviction = lru }} }} }}"):
        with pytest.raises(PolicyError) as info:
            parse(text, "n.moe")
        err = info.value
        assert message in str(err) and (err.file, err.line, err.col) == ("n.moe", 1, text.index(number) + 1)
        assert err.caret_line.strip() == "^" * len(number)
    for fine in ("0.0e-999", "4.9e-324", "1.7e308"):  # zero written as zero, the smallest and largest doubles
        tree = parse(f"policy p {{ cache {{ capacity = 4 frequency_decay = {fine} }} }}")
        assert parse(format_policy(tree)) == tree


def test_formatter_keeps_comments_and_is_idempotent():
    text = "# top\npolicy p { # open\ncache { capacity = 4 # four\n eviction = lru }\n# end of p\n}\n# tail\n"
    once = format_policy(parse(text))
    assert [line.strip() for line in once.splitlines() if "#" in line] == [
        "# top", "# open", "capacity = 4  # four", "# end of p", "# tail"]
    assert format_policy(parse(once)) == once and parse(once) == parse(text)


# -- spec forms --------------------------------------------------------------------------------------
def test_spec_forms(tmp_path: Path):
    path = tmp_path / "mine.moe"
    path.write_text("policy mine { cache { capacity = 3 } }")
    assert compile_policy(str(path)).name == "mine"
    assert compile_policy(path).source == str(path)
    assert compile_policy("balanced").name == "balanced"
    assert compile_policy("balanced.moe").name == "balanced"


def test_unknown_bundled_name_lists_the_bundled_ones():
    with pytest.raises(PolicyError) as info:
        compile_policy("balancedd")
    assert all(name in str(info.value) for name in bundled_policies())


EXPECTED_BUNDLED = {"balanced", "aggressive", "generous", "fiddler", "lookahead", "per_layer", "adaptive"}


def test_bundled_policies_all_parse_validate_and_are_canonical():
    assert EXPECTED_BUNDLED <= set(bundled_policies())
    from importlib import resources
    for name in bundled_policies():
        text = resources.files("moerun.policies").joinpath(name + ".moe").read_text()
        assert text.startswith("# " + name + ":"), "header comment saying when to use it"
        f = validate(parse(text, name))
        assert format_policy(f) == text
        compiled = compile_policy(name)
        assert compiled.name == name
        validate(f, num_layers=24, num_experts=60)  # Qwen1.5-MoE's shape


def test_fiddler_runs_misses_on_cpu_and_auto_capacity():
    p = compile_policy("fiddler")
    assert p.schedule.mode == "cpu_fallback" and p.prefetch.strategy == "none"
    assert p.cache.capacity == ir.AUTO


def test_parse_rejects_non_text():
    with pytest.raises(PolicyError):
        parse(b"policy p {}")


def test_readme_policy_example_compiles():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The policy language in short", 1)[1]
    example = section.split("```", 2)[1]
    assert compile_policy(example).name == "example"
