"""The command-line contract, over every sub-command: bad input ends with the reason on stderr,
exit status 1 (2 for a malformed command line, argparse's convention), no traceback, nothing on
stdout, and one line unless it is a policy diagnostic (file:line:col, source, caret, hint)."""
import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from moerun.cli import main
from moerun.trace.format import write_trace
from moerun.trace.workloads import synthetic_trace

POLICY = "policy small { cache { capacity = 4  eviction = lru } }\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_trace(d / "t.npz", synthetic_trace("zipf", num_tokens=40, num_layers=2, num_experts=8, top_k=2))
    write_trace(d / "one_layer.npz", synthetic_trace("zipf", num_tokens=20, num_layers=1, num_experts=8, top_k=2))
    (d / "p.moe").write_text(POLICY)
    (d / "corrupt.npz").write_bytes((d / "t.npz").read_bytes()[:300])
    (d / "empty.npz").write_bytes(b"")
    with open(d / "array.npy", "wb") as f:
        np.save(f, np.zeros(4))
    os.mkfifo(d / "fifo")
    with open(d / "meta_list.npz", "wb") as f:
        np.savez(f, expert_ids=np.zeros((2, 1, 1), np.int32), gate_weights=np.ones((2, 1, 1), np.float32),
                 step_starts=np.array([0, 2]), prompt_starts=np.array([0]), meta=np.array(json.dumps([1, 2])))
    return d


def _cases(d):
    """(argv, what stderr must say) for every sub-command; paths under the fixture's folder ``d``."""
    t, p, fifo = str(d / "t.npz"), str(d / "p.moe"), str(d / "fifo")
    missing_dir = str(d / "no" / "such")
    return [
        (["policy", "check", fifo], "FIFO"),
        (["policy", "check", "/dev/zero"], "character device"),
        (["policy", "check", "policy p { cache { capacity = ２ } }"], "unexpected character '２'"),
        (["policy", "check", "policy p { cache { capacity = " + "9" * 5000 + " } }"], "5000 digits"),
        (["policy", "check", "policy p { cache { capacity = 2147483648 } }"], "at most 2147483647"),
        (["policy", "explain", "/dev/zero"], "character device"),
        (["policy", "explain", p, "--name", "nope"], "no policy named 'nope'"),
        (["policy", "fmt", fifo], "FIFO"),
        (["policy", "fmt", "balanced", "--write"], "not a bundled name"),
        (["trace", "replay", str(d / "missing.npz"), "--policy", p], "No such file"),
        (["trace", "replay", str(d / "corrupt.npz"), "--policy", p], "not a moerun trace"),
        (["trace", "replay", t, "--policy", "balanced"], "capacity = auto"),
        (["trace", "replay", t, "--policy", p, "--capacity", "17"], "exceeds the trace's 2 layers x 8 experts"),
        (["trace", "replay", t, "--policy", "policy p { cache { capacity = 99 } }"], "exceeds the model's 16"),
        (["trace", "sweep", t, "--policies", p, "--json", missing_dir + "/s.json"], "does not exist"),
        (["trace", "sweep", t, "--policies", p, "--plot", missing_dir + "/s.png"], "does not exist"),
        (["trace", "sweep", str(d / "empty.npz"), "--policies", p], "not a moerun trace"),
        (["trace", "stats", str(d / "array.npy")], "holds one array"),
        (["trace", "stats", str(d / "meta_list.npz")], "must be a JSON object"),
        (["trace", "stats", fifo], "FIFO"),
        (["trace", "predictor", t, "--out", missing_dir + "/p.npz"], "does not exist"),
        (["trace", "predictor", str(d / "one_layer.npz"), "--out", str(d / "p1.npz")], "needs >= 2 layers"),
        (["trace", "synth", "zipf", missing_dir + "/x.npz"], "does not exist"),
        (["trace", "synth", "zipf", str(d / "x.npz"), "--experts", "4", "--top-k", "8"], "exceeds --experts"),
    ]


@pytest.mark.parametrize("index", range(24))
def test_bad_input_is_an_error_line_on_stderr_with_exit_1(inputs, capsys, index):
    cases = _cases(inputs)
    assert len(cases) == 24
    argv, expected = cases[index]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert expected in err, err
    first = err.splitlines()[0]
    assert "error:" in first
    if not re.match(r"\S+:\d+:\d+: error: ", first):  # a policy diagnostic shows its source and caret
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [
    ["policy", "check", "x", "--layers", "0"],
    ["policy", "check", "x", "--experts", "２"],
    ["trace", "replay", "t.npz", "--policy", "p", "--capacity", str(2**31)],
    ["trace", "replay", "t.npz", "--policy", "p", "--slots", "-1"],
    ["trace", "replay", "t.npz", "--policy", "p", "--host-capacity", "0"],
    ["trace", "sweep", "t.npz", "--policies", "p", "--capacities", "0"],
    ["trace", "sweep", "t.npz", "--policies", "p", "--host-capacity", str(2**63)],
    ["trace", "predictor", "t.npz", "--out", "p.npz", "--history", "0"],
    ["trace", "predictor", "t.npz", "--out", "p.npz", "--horizon", "1e3"],
    ["trace", "synth", "zipf", "x.npz", "--experts", str(2**31)],
    ["trace", "synth", "zipf", "x.npz", "--tokens", "9" * 5000],
])
def test_out_of_range_numbers_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


def test_a_full_disk_during_fmt_write_is_one_line_and_keeps_the_file(tmp_path, monkeypatch, capsys):
    policy = tmp_path / "keep.moe"
    policy.write_text("policy keep { cache { capacity = 4 } }  # not canonical\n")
    before = policy.read_text()

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    assert main(["policy", "fmt", "--write", str(policy)]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and f"{policy} is unchanged" in err
    assert policy.read_text() == before


def test_fmt_leaves_an_empty_file_empty(tmp_path, capsys):
    empty = tmp_path / "empty.moe"
    empty.write_text("")
    assert main(["policy", "fmt", str(empty)]) == 0 and capsys.readouterr().out == ""
    assert main(["policy", "fmt", "--write", str(empty)]) == 0
    assert empty.read_text() == ""


def test_a_real_process_prints_no_traceback(inputs):
    for argv in (["trace", "stats", str(inputs / "corrupt.npz")], ["policy", "check", "/dev/zero"]):
        done = subprocess.run([sys.executable, "-m", "moerun", *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith("error:") and "Traceback" not in done.stderr, done.stderr
