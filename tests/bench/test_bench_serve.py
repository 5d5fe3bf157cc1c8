"""benchmarks/bench_serve.py end to end on the CPU: the tiny built-in model, 2 streaming clients of 2 requests each,
a few tokens a request; every row reports aggregate tok/s, TTFT and time between tokens (p50, p99).

The clients run in this process (``_drive_here``) instead of a spawned one: a spawned client process imports
torch and moerun again for each row, which takes longer than the whole run here."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENTS, REQUESTS, NEW_TOKENS = 2, 2, 4


@pytest.fixture(scope="module")
def bench_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_serve", None)


def test_serve_rows_report_throughput_ttft_and_time_between_tokens(bench_serve, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench_serve, "_drive_elsewhere", bench_serve._drive_here)
    out = tmp_path / "serve.json"
    assert bench_serve.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--clients", str(CLIENTS),
                             "--requests", str(REQUESTS), "--prompt-tokens", "4", "--new-tokens", str(NEW_TOKENS),
                             "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["info"]["clients"] == CLIENTS and report["info"]["new_tokens"] == NEW_TOKENS
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == ["generate", "serve burst", "serve staggered"]
    assert rows["generate"]["tokens"] == CLIENTS * NEW_TOKENS and rows["generate"]["tok_s"] > 0
    printed = capsys.readouterr().out
    for name in ("serve burst", "serve staggered"):
        row = rows[name]
        # Every request completed with every token it asked for.
        assert row["requests"] == CLIENTS * REQUESTS and row["tokens"] == CLIENTS * REQUESTS * NEW_TOKENS, row
        assert row["tok_s"] == pytest.approx(row["tokens"] / row["wall_s"]) and row["tok_s"] > 0
        assert row["vs_generate"] == pytest.approx(row["tok_s"] / rows["generate"]["tok_s"])
        wall_ms = 1e3 * row["wall_s"]
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] < 60e3, row
        assert 0 < row["tbt_p50_ms"] <= row["tbt_p99_ms"] <= wall_ms, row   # a gap between tokens lies in the run
        assert row["tbt_p99_over_p50"] == pytest.approx(row["tbt_p99_ms"] / row["tbt_p50_ms"])
        assert 0 <= row["hit_rate"] <= 1
        assert f"{name}: {row['tok_s']:.1f} tok/s" in printed and "TTFT p50" in printed and "TBT p50" in printed
    assert rows["serve staggered"]["stagger_s"] > 0
