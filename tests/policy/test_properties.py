"""Property tests: format/parse round trip on random IRs; random and mutated text only raises PolicyError."""
from importlib import resources

from hypothesis import HealthCheck, given, settings, strategies as st

from moerun.policy import PolicyError, bundled_policies, compile_policy, format_policy, parse, syntax

KEYWORDS = {"policy", "version", "adapt", "when", "for", "trigger", "rebalance"}
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(lambda n: n not in KEYWORDS)
comment_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=12)
comment = comment_text.map(lambda t: ("#" + t).rstrip())
comments = st.lists(comment, max_size=2).map(tuple)
trailing = st.none() | comment
numbers = st.builds(syntax.Number, st.integers(-10**9, 10**9) | st.floats(allow_nan=False, allow_infinity=False))
words = st.builds(syntax.Word, names)
list_items = numbers | words | st.builds(syntax.Pair, numbers, numbers)
values = numbers | words | st.builds(syntax.List, st.lists(list_items, max_size=4).map(tuple))
keys = names | st.tuples(names, names).map(".".join)
settings_ = st.builds(syntax.Setting, keys, values, comments, trailing)
actions = (settings_ | st.builds(syntax.Trigger, names, comments, trailing)
           | st.builds(syntax.Rebalance, names, comments, trailing))
windows = st.none() | st.builds(syntax.Window, numbers, names)
rules = st.builds(syntax.Rule, names, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), numbers, windows,
                  st.lists(actions, max_size=3).map(tuple), comments, trailing, comments)
blocks = st.builds(syntax.Block, names.filter(lambda n: n != "adapt"), st.lists(settings_, max_size=4).map(tuple),
                   comments, comments)
adapt_blocks = st.builds(syntax.AdaptBlock, st.lists(rules, max_size=3).map(tuple), comments, comments)
policies = st.builds(syntax.Policy, names, st.lists(blocks | adapt_blocks, max_size=4).map(tuple), comments, comments)
files = st.builds(syntax.PolicyFile, st.none() | st.builds(syntax.Version, numbers, comments),
                  st.lists(policies, max_size=3).map(tuple), comments)


@FAST
@given(files)
def test_parse_format_round_trip(tree: syntax.PolicyFile):
    text = format_policy(tree)
    assert parse(text) == tree
    assert format_policy(parse(text)) == text


TOKENS = ["policy", "p", "{", "}", "cache", "capacity", "=", "8", "auto", "eviction", "lru", "lfu", "prefetch",
          "strategy", "history", "budget", "adapt", "when", "hit_rate", "<", ">=", "0.4", "for", "100", "accesses",
          "trigger", "rebalance", "per_layer", "[", "]", ",", ":", ";", "#x\n", "\n", "version", "1", "-3", "1e999",
          "pin", "host", "monitor", "metrics", "schedule", "mode", "hybrid", "true", "$", "\"", "cache.eviction"]


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_token_soup_raises_only_policy_error(tokens):
    text = " ".join(tokens)
    try:
        compile_policy("policy soup {" + text) if "{" not in text else compile_policy(text)
    except PolicyError:
        pass


BUNDLED = [resources.files("moerun.policies").joinpath(n + ".moe").read_text() for n in bundled_policies()]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(BUNDLED))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["delete", "insert", "replace"]))
        piece = draw(st.sampled_from(TOKENS) | st.text(max_size=3))
        if kind == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 8)):]
        elif kind == "insert":
            text = text[:i] + piece + text[i:]
        else:
            text = text[:i] + piece + text[i + len(piece):]
    return text


@FAST
@given(mutated())
def test_mutated_policies_raise_only_policy_error(text):
    try:
        compiled = compile_policy(text)
    except PolicyError as err:
        assert err.diagnostics and all(d.message for d in err.diagnostics)
        return
    assert compiled.name
    assert parse(format_policy(parse(text))) == parse(text)
