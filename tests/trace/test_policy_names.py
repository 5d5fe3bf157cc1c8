"""Naming policies on ``moerun trace`` command lines: ``FILE:NAME`` picks one policy of a file of several for
replay and sweep, sweep takes such a file without a name as each of its policies, and a path that exists
is a path even when it holds a ``:``."""
from __future__ import annotations

import json

import pytest

from moerun.cli import main
from moerun.policy import bundled_policies, compile_policy
from moerun.policy.parser import _get_parser
from moerun.trace.commands import POLICY_NAME, policy_spec
from moerun.trace.format import read_trace, write_trace
from moerun.trace.replay import replay
from moerun.trace.sweep import sweep
from moerun.trace.workloads import synthetic_trace

TWO = ("policy fast { cache { capacity = 4 } }\n"
       "policy slow { cache { capacity = 8  eviction = lfu }  prefetch { strategy = history  budget = 2 } }\n")


@pytest.fixture
def trace(tmp_path):
    return write_trace(tmp_path / "t.npz", synthetic_trace("zipf", num_tokens=60, num_layers=2, num_experts=8,
                                                           top_k=2, seed=3))


@pytest.fixture
def two(tmp_path):
    path = tmp_path / "two.moe"
    path.write_text(TWO)
    return path


def _compiled(path, name, trace):
    t = read_trace(trace)
    return compile_policy(str(path), name=name, num_layers=t.num_layers, num_experts=t.num_experts)


def _replay_json(argv, capsys) -> dict:
    assert main(["trace", "replay", *argv, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    del stats["replay_accesses_per_s"]  # wall clock
    return stats


def _sweep_rows(argv, tmp_path, capsys) -> list[dict]:
    out = tmp_path / "rows.json"
    assert main(["trace", "sweep", *argv, "--capacities", "3", "6", "--json", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def _refused(argv, capsys) -> str:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    return err


def test_file_colon_name_replays_what_compile_policy_with_that_name_gives(trace, two, capsys):
    for name in ("fast", "slow"):
        stats = _replay_json([str(trace), "--policy", f"{two}:{name}"], capsys)
        expected = replay(read_trace(trace), _compiled(two, name, trace))
        assert stats == json.loads(json.dumps(expected)) and stats["policy"] == name
    assert (_replay_json([str(trace), "--policy", f"{two}:fast"], capsys)
            != _replay_json([str(trace), "--policy", f"{two}:slow"], capsys))


def test_file_colon_name_sweeps_that_one_policy(trace, two, tmp_path, capsys):
    rows = _sweep_rows([str(trace), "--policies", f"{two}:slow", "--no-belady"], tmp_path, capsys)
    assert rows == sweep(read_trace(trace), [_compiled(two, "slow", trace)], [3, 6], with_belady=False)
    assert {r["policy"] for r in rows} == {"slow"}


def test_sweep_of_a_file_of_several_gives_each_policy_its_rows_in_file_order(trace, two, tmp_path, capsys):
    rows = _sweep_rows([str(trace), "--policies", str(two), "balanced:balanced"], tmp_path, capsys)
    assert [(r["policy"], r["capacity"]) for r in rows] == [
        ("fast", 3), ("fast", 6), ("slow", 3), ("slow", 6), ("balanced", 3), ("balanced", 6),
        ("belady", 3), ("belady", 6)]
    expected = sweep(read_trace(trace), [_compiled(two, "fast", trace), _compiled(two, "slow", trace),
                                         _compiled("balanced", None, trace)], [3, 6])
    assert rows == expected
    # Policy text of several is swept the same way.
    assert _sweep_rows([str(trace), "--policies", TWO, "--no-belady"], tmp_path, capsys) == expected[:4]


def test_a_name_the_file_does_not_define_is_an_error_listing_its_policies(trace, two, capsys):
    for argv in (["trace", "replay", str(trace), "--policy", f"{two}:medium"],
                 ["trace", "sweep", str(trace), "--policies", "balanced", f"{two}:medium"]):
        err = _refused(argv, capsys)
        assert f"{two}: no policy named 'medium'; it defines fast, slow" in err


def test_replay_of_a_file_of_several_without_a_name_is_refused_saying_how_to_name_one(trace, two, capsys):
    err = _refused(["trace", "replay", str(trace), "--policy", str(two)], capsys)
    assert f"{two}:2:8: error: 2 policies are defined here (fast, slow)" in err
    assert f"`{two}:slow` (FILE:NAME) for moerun trace replay" in err
    err = _refused(["trace", "replay", str(trace), "--policy", TWO], capsys)  # text: no file to name yet
    assert "`FILE:slow` (FILE:NAME)" in err


def test_a_path_that_exists_is_read_as_a_path_even_with_a_colon(trace, tmp_path, capsys):
    # A tail that reads as a policy name ("x:fast") and one that does not ("a:b.moe") alike.
    for filename in ("x:fast", "a:b.moe"):
        path = tmp_path / filename
        path.write_text("policy only { cache { capacity = 4 } }\n")
        assert _replay_json([str(trace), "--policy", str(path)], capsys)["policy"] == "only"
    # ... and such a path takes a name after it.
    several = tmp_path / "c:d.moe"
    several.write_text(TWO)
    stats = _replay_json([str(trace), "--policy", f"{several}:slow"], capsys)
    assert stats == json.loads(json.dumps(replay(read_trace(trace), _compiled(several, "slow", trace))))


def test_what_is_never_read_as_file_colon_name(tmp_path):
    assert not [name for name in bundled_policies() if ":" in name]  # else `name:x` would be ambiguous
    text = "policy p { cache { capacity = 4  pin = [0:1] } }"  # policy text holds ':' in pins
    for spec in (text, "C:\\policies\\p.moe", "dir:x/p.moe", "p.moe:", ":fast", "p.moe:fast.moe", "balanced"):
        assert policy_spec(spec) == (spec, None)
    assert policy_spec("C:\\policies\\p.moe:fast") == ("C:\\policies\\p.moe", "fast")
    assert policy_spec("balanced:balanced") == ("balanced", "balanced")
    # The names it accepts after ':' are the language's: the grammar's NAME terminal.
    assert _get_parser().get_terminal("NAME").pattern.value == POLICY_NAME.pattern


def test_sweep_refuses_two_policies_of_one_name(trace, two, tmp_path, capsys):
    other = tmp_path / "other.moe"
    other.write_text("policy fast { cache { capacity = 2 } }\n")
    for policies in ([str(two), f"{two}:fast"], [str(two), str(other)], ["balanced", "balanced"]):
        err = _refused(["trace", "sweep", str(trace), "--policies", *policies], capsys)
        assert "two policies named" in err and "sweep rows are named by policy" in err


def test_an_output_naming_the_file_of_file_colon_name_is_refused(trace, two, capsys):
    err = _refused(["trace", "sweep", str(trace), "--policies", f"{two}:fast", "--json", str(two)], capsys)
    assert f"--json {two} is the same file as the policy file {two}" in err
    assert two.read_text() == TWO
