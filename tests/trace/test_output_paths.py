"""``moerun trace`` never writes over a file it reads: an output naming an input (the same path, a
symlink or a hard link to it) or another output is refused before any work, the input unchanged."""
from __future__ import annotations

import os

import pytest

from moerun.cli import main
from moerun.trace.format import write_trace
from moerun.trace.workloads import synthetic_trace


@pytest.fixture
def trace(tmp_path):
    return write_trace(tmp_path / "t.npz", synthetic_trace("zipf", num_tokens=40, num_layers=3, num_experts=8,
                                                           top_k=2, seed=1))


def _refused(argv, capsys, *expected) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("name", ["same", "symlink", "hardlink", "dotted"])
def test_an_output_that_is_the_input_trace_is_refused_and_the_trace_kept(trace, tmp_path, capsys, name):
    before = trace.read_bytes()
    out = {"same": trace, "symlink": tmp_path / "link.npz", "hardlink": tmp_path / "hard.npz",
           "dotted": tmp_path / "sub" / ".." / "t.npz"}[name]
    if name == "symlink":
        os.symlink(trace, out)
    elif name == "hardlink":
        os.link(trace, out)
    elif name == "dotted":
        (tmp_path / "sub").mkdir()
    for argv, option in ((["trace", "predictor", str(trace), "--out", str(out), "--epochs", "1"], "--out"),
                         (["trace", "sweep", str(trace), "--policies", "balanced", "--json", str(out)], "--json"),
                         (["trace", "sweep", str(trace), "--policies", "balanced", "--plot", str(out)], "--plot")):
        _refused(argv, capsys, f"{option} {out} is the same file as the trace {trace}", f"give {option} another path")
        assert trace.read_bytes() == before


def test_an_eval_trace_a_policy_file_or_its_predictor_is_an_input_too(trace, tmp_path, capsys):
    other = write_trace(tmp_path / "o.npz", synthetic_trace("zipf", num_tokens=40, num_layers=3, num_experts=8,
                                                            top_k=2, seed=2))
    _refused(["trace", "predictor", str(trace), "--eval", str(other), "--out", str(other)], capsys,
             f"--out {other} is the same file as the trace {other}")
    policy = tmp_path / "p.moe"
    policy.write_text("policy p { cache { capacity = 4 } }\n")
    _refused(["trace", "sweep", str(trace), "--policies", str(policy), "--json", str(policy)], capsys,
             f"--json {policy} is the same file as the policy file {policy}")
    assert policy.read_text() == "policy p { cache { capacity = 4 } }\n"
    predictor = tmp_path / "pred.npz"
    assert main(["trace", "predictor", str(trace), "--out", str(predictor), "--epochs", "1", "--hidden", "8"]) == 0
    capsys.readouterr()
    before = predictor.read_bytes()
    learned = (f'policy l {{ cache {{ capacity = 4 }} prefetch {{ strategy = learned  budget = 2  '
               f'predictor = "{predictor}" }} }}')
    _refused(["trace", "sweep", str(trace), "--policies", learned, "--plot", str(predictor)], capsys,
             f"--plot {predictor} is the same file as the predictor of policy 'l'")
    assert predictor.read_bytes() == before


def test_json_and_plot_naming_one_file_are_refused(trace, tmp_path, capsys):
    out = tmp_path / "rows"
    _refused(["trace", "sweep", str(trace), "--policies", "balanced", "--json", str(out), "--plot", str(out)], capsys,
             f"--json {out} and --plot {out} are the same file")
    assert not out.exists()
