"""Corrupt trace and predictor files end in moerun's error types, never another exception.

A seeded fuzz (truncations, flipped bytes) of a real file, plus files that are well-formed npz but
wrong inside (meta a list, num_experts 2**31, float or too-wide expert ids, ...). A reader either
returns a valid object or raises TraceError (traces) / PolicyError (predictors).
"""
import json
import random

import numpy as np
import pytest

from moerun.expert_predictor import ExpertPredictor, load_predictor
from moerun.policy.errors import PolicyError
from moerun.trace.format import Trace, TraceError, read_trace, write_trace
from moerun.trace.stats import layer_stats
from moerun.trace.workloads import synthetic_trace

SHAPE = dict(num_layers=2, num_experts=8, top_k=2)


def _variants(data: bytes, seed: int, count: int = 60):
    """Truncations at spread offsets and single/multi-byte flips of ``data``."""
    rng = random.Random(seed)
    for cut in sorted({0, 1, 8, 22, 30, len(data) // 2, len(data) - 22, len(data) - 1}
                      | {rng.randrange(len(data)) for _ in range(count // 3)}):
        yield f"cut{cut}", data[:cut]
    for i in range(count):
        flipped = bytearray(data)
        for _ in range(1 + i % 4):
            pos = rng.randrange(len(flipped))
            flipped[pos] ^= 1 << rng.randrange(8)
        yield f"flip{i}", bytes(flipped)


def _read_or_trace_error(path):
    try:
        trace = read_trace(path)
    except TraceError as err:
        assert "\n" not in str(err)
        return None
    layer_stats(trace)  # what a read trace promises: stats (and replay) can run on it
    return trace


def test_fuzzed_traces_are_read_or_rejected_as_trace_errors(tmp_path):
    good = write_trace(tmp_path / "good.npz", synthetic_trace("zipf", num_tokens=30, **SHAPE))
    data = good.read_bytes()
    rejected = 0
    for name, variant in _variants(data, seed=7):
        f = tmp_path / f"{name}.npz"
        f.write_bytes(variant)
        rejected += _read_or_trace_error(f) is None
    assert rejected > 50


def test_fuzzed_predictors_are_loaded_or_rejected_as_policy_errors(tmp_path):
    good = ExpertPredictor.init(**SHAPE, hidden=8).save(tmp_path / "good.npz")
    rejected = 0
    for name, variant in _variants(good.read_bytes(), seed=8):
        f = tmp_path / f"{name}.npz"
        f.write_bytes(variant)
        try:
            load_predictor(f, **SHAPE)
        except PolicyError:
            rejected += 1
    assert rejected > 50


def _arrays(**changes):
    t = synthetic_trace("zipf", num_tokens=12, **SHAPE)
    arrays = dict(expert_ids=t.expert_ids, gate_weights=t.gate_weights, step_starts=t.step_starts,
                  prompt_starts=t.prompt_starts, meta=t.meta())
    arrays.update(changes)
    return arrays


def _meta(**changes):
    return {**_arrays()["meta"], **changes}


CRAFTED = {
    "meta is a list": dict(meta=[1, 2]),
    "meta is a string": dict(meta="moerun-trace"),
    "meta is a number array": dict(meta=np.zeros(3)),
    "no meta": dict(meta=None),
    "no expert_ids": dict(expert_ids=None),
    "version 2": dict(meta=_meta(version=2)),
    "num_experts 2**31": dict(meta=_meta(num_experts=2**31)),
    "num_experts a string": dict(meta=_meta(num_experts="8")),
    "num_experts true": dict(meta=_meta(num_experts=True)),
    "num_experts negative": dict(meta=_meta(num_experts=-8)),
    "expert_bytes a float": dict(meta=_meta(expert_bytes=1.5)),
    "extra a list": dict(meta=_meta(extra=[1])),
    "float expert ids": dict(expert_ids=np.zeros((12, 2, 2), np.float32)),
    "ids past int32": dict(expert_ids=np.full((12, 2, 2), 2**32, np.int64)),
    "negative ids": dict(expert_ids=np.full((12, 2, 2), -1, np.int32)),
    "2-D ids": dict(expert_ids=np.zeros((12, 2), np.int32)),
    "zero layers": dict(expert_ids=np.zeros((12, 0, 2), np.int32), gate_weights=np.zeros((12, 0, 2), np.float32)),
    "integer weights": dict(gate_weights=np.ones((12, 2, 2), np.int32)),
    "string weights": dict(gate_weights=np.full((12, 2, 2), "x")),
    "huge unsigned step_starts": dict(step_starts=np.array([0, 2**64 - 1], np.uint64)),
    "falling step_starts": dict(step_starts=np.array([0, 8, 4, 12])),
    "float step_starts": dict(step_starts=np.array([0.0, 12.0])),
    "scalar step_starts": dict(step_starts=np.array(3)),
    "scalar prompt_starts": dict(prompt_starts=np.array(0)),
    "meta layers disagree": dict(meta=_meta(num_layers=3)),
    "meta top_k a list": dict(meta=_meta(top_k=[2])),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_a_wrong_trace_inside_a_valid_npz_is_a_trace_error(tmp_path, case):
    arrays = _arrays(**CRAFTED[case])
    arrays = {k: v for k, v in arrays.items() if v is not None}
    if isinstance(arrays.get("meta"), (dict, list, str)):
        arrays["meta"] = np.array(json.dumps(arrays["meta"]))
    f = tmp_path / "t.npz"
    with open(f, "wb") as out:
        np.savez(out, **arrays)
    with pytest.raises(TraceError) as err:
        read_trace(f)
    assert "\n" not in str(err.value)


def test_a_trace_of_many_experts_reads_without_a_table_per_pair(tmp_path):
    # num_experts is what the meta claims; stats count transitions over the pairs seen, not E x E.
    t = synthetic_trace("zipf", num_tokens=20, num_layers=3, num_experts=8, top_k=2)
    wide = Trace(t.expert_ids, t.gate_weights, t.step_starts, t.prompt_starts, num_experts=1 << 16)
    back = read_trace(write_trace(tmp_path / "wide.npz", wide))
    rows = layer_stats(back)
    assert rows[0]["max_entropy_bits"] == 16.0 and 0 <= rows[0]["next_layer_predictability"] <= 1


@pytest.mark.parametrize("arrays,meta", [
    ({}, dict(num_layers="2")),
    ({}, dict(history=0)),
    ({}, dict(horizon=2**40)),
    (dict(w1=np.zeros((3, 3), np.int32)), {}),
    (dict(b2=np.zeros((5,), np.float32)), {}),
    (dict(w2=None), {}),
    ({}, [1]),
], ids=["layers a string", "history 0", "horizon huge", "integer weights", "wrong bias shape", "no w2",
        "meta a list"])
def test_a_wrong_predictor_inside_a_valid_npz_is_a_policy_error(tmp_path, arrays, meta):
    p = ExpertPredictor.init(**SHAPE, hidden=8)
    good = dict(format="moerun-expert-predictor", version=1, **SHAPE, history=p.history, horizon=p.horizon,
                hidden=8, extra={})
    stored = {**dict(w1=p.w1.numpy(), b1=p.b1.numpy(), w2=p.w2.numpy(), b2=p.b2.numpy()), **arrays}
    stored = {k: v for k, v in stored.items() if v is not None}
    stored["meta"] = np.array(json.dumps({**good, **meta} if isinstance(meta, dict) else meta))
    f = tmp_path / "p.npz"
    with open(f, "wb") as out:
        np.savez(out, **stored)
    with pytest.raises(PolicyError):
        load_predictor(f, **SHAPE)


@pytest.mark.parametrize("name,content,kind", [
    ("notes.txt", b"expert_ids,gate_weights\n1,0.5\n", "the file is text"),
    ("policy.moe", "policy p { cache { capacity = 4 } }  # é\n".encode(), "the file is text"),
    ("empty.npz", b"", "the file is empty"),
    ("array.npy", None, "it holds one array"),
    ("binary.npz", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "not a zip archive (it starts with b'\\x7fELF"),
], ids=["text", "policy", "empty", "npy", "binary"])
def test_a_file_that_is_no_npz_gets_moerun_s_message_not_numpy_s(tmp_path, name, content, kind):
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(TraceError) as err:
        read_trace(path)
    text = str(err.value)
    assert text.startswith(f"{path} is not a moerun trace: ") and kind in text, text
    assert "record_trace" in text and "moerun trace synth" in text  # what a trace is and how to get one
    assert "pickle" not in text and "\n" not in text
