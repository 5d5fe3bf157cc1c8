"""What ``moerun trace`` prints for a new user: defaults, explained columns, notes, clean errors."""
import json

from moerun.cli import main
from moerun.trace.format import write_trace
from moerun.trace.workloads import synthetic_trace


def _trace(tmp_path, layers=3):
    return write_trace(tmp_path / "t.npz", synthetic_trace("zipf", num_tokens=60, num_layers=layers, num_experts=8,
                                                           top_k=2, seed=1))


def test_sweep_without_capacities_tries_fractions_of_the_experts_and_notes_belady(tmp_path, capsys):
    trace = _trace(tmp_path)
    assert main(["trace", "sweep", str(trace), "--policies", "balanced", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "s.json").read_text())
    assert sorted({r["capacity"] for r in rows}) == [3, 6, 12]  # 1/8, 1/4, 1/2 of 3 layers x 8 experts
    assert "belady: the best possible eviction when experts are fetched on demand" in out
    assert "never prefetches" in out
    assert main(["trace", "sweep", str(trace), "--policies", "balanced", "--no-belady"]) == 0
    assert "belady" not in capsys.readouterr().out


def test_stats_explains_its_columns_and_marks_what_is_undefined(tmp_path, capsys):
    trace = _trace(tmp_path)
    assert main(["trace", "stats", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    last_layer = [line for line in out.splitlines() if line.strip().startswith("2 ")][0]
    assert last_layer.split()[4] == "-"  # no next layer to predict
    for column in ("entropy", "skew10%", "reuse", "next-pred", "prev-tok"):
        assert any(line.strip().startswith(column) and len(line.split()) > 3 for line in out.splitlines()), column
    assert main(["trace", "stats", str(trace), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # valid JSON: undefined is null, not NaN
    assert rows[-1]["next_layer_predictability"] is None


def test_a_policy_error_without_a_place_has_no_string_prefix(tmp_path, capsys):
    assert main(["trace", "replay", str(_trace(tmp_path)), "--policy", "balanced"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: policy 'balanced' has capacity = auto") and "<string>" not in captured.err
