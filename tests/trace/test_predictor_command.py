"""``moerun trace predictor`` checks every trace before it trains: traces that give no examples, --eval
traces of another model or of no tokens are refused, naming the file, and no predictor is written."""
from __future__ import annotations

import numpy as np
import pytest

from moerun.cli import main
from moerun.trace.format import Trace, write_trace
from moerun.trace.workloads import synthetic_trace


def _empty(path, layers: int = 3):
    shape = (0, layers, 2)
    return write_trace(path, Trace(expert_ids=np.zeros(shape, np.int32), gate_weights=np.zeros(shape, np.float32),
                                   step_starts=np.array([0]), prompt_starts=np.zeros(0, np.int64), num_experts=8))


def _trace(path, layers: int = 3, experts: int = 8):
    return write_trace(path, synthetic_trace("zipf", num_tokens=40, num_layers=layers, num_experts=experts, top_k=2,
                                             seed=1))


def _refused(argv, capsys, out, *expected) -> None:
    assert main([*argv, "--out", str(out), "--epochs", "1", "--hidden", "8"]) == 1
    printed, err = capsys.readouterr()
    assert printed == "" and err.count("\n") == 1 and err.startswith("error: "), err  # nothing trained
    for text in expected:
        assert text in err, err
    assert not out.exists()


def test_traces_without_tokens_give_no_examples_and_are_refused(tmp_path, capsys):
    empty, out = _empty(tmp_path / "empty.npz"), tmp_path / "p.npz"
    _refused(["trace", "predictor", str(empty)], capsys, out, f"training traces ({empty}) hold no tokens",
             "give no examples", "record_trace")
    _refused(["trace", "predictor", str(empty), str(_empty(tmp_path / "empty2.npz"))], capsys, out, "hold no tokens")
    # An empty trace beside one with tokens is only no help.
    assert main(["trace", "predictor", str(empty), str(_trace(tmp_path / "t.npz")), "--out", str(out),
                 "--epochs", "1", "--hidden", "8"]) == 0
    assert out.exists()


@pytest.mark.parametrize("case", ["layers", "experts", "empty"])
def test_eval_traces_are_checked_before_training_and_named(tmp_path, capsys, case):
    train, out = _trace(tmp_path / "train.npz"), tmp_path / "p.npz"
    bad = {"layers": lambda p: _trace(p, layers=4), "experts": lambda p: _trace(p, experts=16),
           "empty": _empty}[case](tmp_path / "eval.npz")
    expected = {"layers": f"{bad} has 4 MoE layers but the first training trace {train} has 3",
                "experts": f"{bad} routes to experts up to", "empty": f"--eval trace {bad} holds no tokens"}[case]
    _refused(["trace", "predictor", str(train), "--eval", str(bad)], capsys, out, expected)
    assert "epoch" not in capsys.readouterr().out


def test_a_training_trace_of_another_model_names_both_files(tmp_path, capsys):
    first, other, out = _trace(tmp_path / "a.npz"), _trace(tmp_path / "b.npz", layers=4), tmp_path / "p.npz"
    _refused(["trace", "predictor", str(first), str(other)], capsys, out,
             f"{other} has 4 MoE layers but the first training trace {first} has 3", f"leave {other} out")
