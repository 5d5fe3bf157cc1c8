"""Every bounded number of the policy schema: a value just outside each bound is refused with the
validator's "out of range" diagnostic, in its block and in an adapt rule that may set it. The cases come
from moerun.policy.schema itself, so a new bounded key is covered when it is added."""
import pytest

from moerun.policy import PolicyError, parse, schema, validate

CACHE = "cache { capacity = 8 }"
# Fractions of a float's bound: far enough to be outside, near enough that the next bound is not crossed.
STEP = 0.01


def _just_outside(param: schema.Param) -> list[tuple[str, float]]:
    """(which bound, a value just past it) for each bound ``param`` has, open bounds at the bound itself."""
    step = 1 if param.kind == "int" else STEP
    cases = []
    if param.lo is not None:
        cases.append(("lo", param.lo if param.lo_open else param.lo - step))
    if param.hi is not None:
        cases.append(("hi", param.hi if param.hi_open else param.hi + step))
    return [(bound, int(v) if param.kind == "int" else float(v)) for bound, v in cases]


BOUNDED = [(block, key, bound, value)
           for block, params in schema.BLOCKS.items() for key, param in params.items()
           for bound, value in _just_outside(param)]


def _policy_setting(block: str, key: str, value) -> str:
    """The smallest policy that sets ``block.key = value`` and is otherwise valid."""
    blocks = {"cache": {"capacity": "8"}} if block != "per_layer" else {}
    blocks.setdefault(block, {})[key] = repr(value)
    body = "\n".join(f"{name} {{ " + " ".join(f"{k} = {v}" for k, v in keys.items()) + " }"
                     for name, keys in blocks.items())
    return f"policy p {{\n{body}\n}}\n"


def _diagnostics(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        validate(parse(text, "range.moe"))
    return [d.message for d in info.value.diagnostics]


def test_the_schema_has_bounded_numbers_of_both_kinds():
    kinds = {schema.BLOCKS[block][key].kind for block, key, _, _ in BOUNDED}
    assert kinds == {"int", "float"} and any(bound == "hi" for *_, bound, _ in BOUNDED)


def test_every_number_a_policy_sets_has_a_lower_bound():
    # Slot counts, budgets, windows, times, sizes and fractions: no policy number means anything negative,
    # so each has a lower bound for the cases below to test.
    unbounded = [f"{block}.{key}" for block, params in schema.BLOCKS.items() for key, param in params.items()
                 if param.kind in ("int", "float") and param.lo is None]
    assert unbounded == []


@pytest.mark.parametrize("block,key,bound,value", BOUNDED, ids=[f"{b}.{k}-{bd}" for b, k, bd, _ in BOUNDED])
def test_a_value_just_outside_a_bound_is_out_of_range(block, key, bound, value):
    assert _diagnostics(_policy_setting(block, key, value)) == [f"'{block}.{key}' = {value} is out of range"]


ADAPTABLE = [case for case in BOUNDED if schema.BLOCKS[case[0]][case[1]].adaptable]


@pytest.mark.parametrize("block,key,bound,value", ADAPTABLE, ids=[f"{b}.{k}-{bd}" for b, k, bd, _ in ADAPTABLE])
def test_an_adapt_rule_setting_a_value_just_outside_a_bound_is_out_of_range(block, key, bound, value):
    text = f"policy p {{\n{CACHE}\nadapt {{ when hit_rate < 0.4 {{ {block}.{key} = {value!r} }} }}\n}}\n"
    assert _diagnostics(text) == [f"'{block}.{key}' = {value} is out of range"]
