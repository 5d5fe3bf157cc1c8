"""The learned prefetch strategy for real: a predictor file named by the policy, run live by the
runtime and in batch by trace replay (one implementation), and the errors for a bad file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moerun
from moerun.expert_predictor import (ExpertPredictor, accuracy, layer_history, load_predictor, predict_trace,
                                     step_top, train_predictor)
from moerun.models.synthetic import build_checkpoint, synthetic_config
from moerun.policy import compile_policy, format_policy, parse
from moerun.policy.errors import PolicyError
from moerun.trace.format import Trace, read_trace
from moerun.trace.replay import replay
from moerun.trace.workloads import synthetic_trace


def _learned(path, capacity: int = 6, budget: int = 2, lookahead: int = 1) -> str:
    return (f'policy learned {{ cache {{ capacity = {capacity}  eviction = lru }} '
            f'prefetch {{ strategy = learned  budget = {budget}  lookahead = {lookahead}  predictor = "{path}" }} }}')


def _tokens(trace, a: int, b: int) -> Trace:
    """Tokens a..b of a batch-1 trace (one step per token) as a trace of their own."""
    return Trace(expert_ids=trace.expert_ids[a:b], gate_weights=trace.gate_weights[a:b],
                 step_starts=np.arange(b - a + 1), prompt_starts=np.array([0]), num_experts=trace.num_experts)


@pytest.fixture(scope="module")
def correlated():
    """A trace whose layer l+1 experts follow from layer l's: a predictor trained on its first 384
    tokens, tested on the last 128."""
    full = synthetic_trace("correlated", num_tokens=512, num_layers=3, num_experts=8, top_k=2, seed=1)
    train, test = _tokens(full, 0, 384), _tokens(full, 384, 512)
    return train, test, train_predictor([train], hidden=32, epochs=4, batch=32, log=lambda _: None)


def test_predictor_learns_the_correlation_and_round_trips(correlated, tmp_path):
    train, test, pred = correlated
    acc = accuracy(pred, test)
    untrained = accuracy(ExpertPredictor.init(num_layers=3, num_experts=8, top_k=2, hidden=32), test)
    assert acc["recall_at_k"] > untrained["recall_at_k"] + 0.2
    path = pred.save(tmp_path / "p.npz")
    back = load_predictor(path, num_layers=3, num_experts=8, top_k=2)
    hist = layer_history(torch.from_numpy(test.expert_ids).long(), back.history)[:, 1]  # [N, H, K] at layer 1
    assert torch.equal(back.predict(hist, torch.ones(len(hist), dtype=torch.long)),
                       pred.predict(hist, torch.ones(len(hist), dtype=torch.long)))


def test_history_pads_layers_before_zero():
    ids = torch.arange(2 * 3 * 2).view(2, 3, 2)  # [N=2, L=3, K=2]
    hist = layer_history(ids, 2)                  # [N, L, H, K]
    assert hist[0, 0, 1].tolist() == [-1, -1] and hist[0, 2, 0].tolist() == [4, 5] and hist[0, 2, 1].tolist() == [2, 3]


def test_step_top_sums_tokens_of_a_step():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.8, 0.3], [0.2, 0.0, 0.7]])  # [T=3, E=3]
    ids, scores = step_top(probs, torch.tensor([0, 0, 1]), 2, 2)
    assert ids.tolist() == [[1, 0], [2, 0]] and scores[0].tolist() == pytest.approx([0.9, 0.9])


def test_replay_feeds_the_predictor_not_the_oracle(correlated, tmp_path):
    train, test, pred = correlated
    path = pred.save(tmp_path / "p.npz")
    policy = compile_policy(_learned(path))
    learned = replay(test, policy)
    # The engine's own score of the predictions is the predictor's offline recall at budget k.
    assert learned["routing_prediction_accuracy"] == pytest.approx(accuracy(pred, test)["recall_at_k"], abs=1e-6)
    oracle = replay(test, compile_policy(_learned(path).replace(f'  predictor = "{path}"', "")))
    assert oracle["routing_prediction_accuracy"] == 1.0 > learned["routing_prediction_accuracy"]
    ids, scores = predict_trace(pred, test.expert_ids, test.step_starts)
    assert ids.shape == (test.num_steps, 3, 1, 2) and (ids[:, :, 0] >= 0).all()


def test_policy_language_carries_the_predictor_path(tmp_path):
    text = _learned("pred.npz")
    assert 'predictor = "pred.npz"' in format_policy(parse(text))
    assert parse(format_policy(parse(text))) == parse(text)
    policy_file = tmp_path / "sub" / "p.moe"
    policy_file.parent.mkdir()
    policy_file.write_text(text)
    assert compile_policy(policy_file).prefetch.predictor == str(tmp_path / "sub" / "pred.npz")
    with pytest.raises(PolicyError, match="no effect unless prefetch.strategy = learned"):
        compile_policy('policy p { cache { capacity = 4 } prefetch { strategy = history  predictor = "a.npz" } }')
    with pytest.raises(PolicyError, match="must be a file path in double quotes"):
        compile_policy("policy p { cache { capacity = 4 } prefetch { strategy = learned  predictor = 3 } }")


def test_bad_predictor_files_are_policy_errors(correlated, tmp_path):
    _, test, pred = correlated
    with pytest.raises(PolicyError, match="does not exist"):
        replay(test, compile_policy(_learned(tmp_path / "missing.npz")))
    other = synthetic_trace("correlated", num_tokens=16, num_layers=4, num_experts=8, top_k=2)
    path = pred.save(tmp_path / "p.npz")
    with pytest.raises(PolicyError, match="trained for 3 MoE layers x 8 experts, top-2, but the model has 4"):
        replay(other, compile_policy(_learned(path)))
    with pytest.raises(PolicyError, match="prefetches 2 layers ahead but predictor .* predicts 1"):
        replay(test, compile_policy(_learned(path, lookahead=2)))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(PolicyError, match="not a moerun expert predictor"):
        replay(test, compile_policy(_learned(tmp_path / "junk.npz")))


@pytest.fixture(scope="module")
def tiny_olmoe(tmp_path_factory):
    return build_checkpoint(synthetic_config("olmoe", num_experts=8), tmp_path_factory.mktemp("olmoe"), seed=5)


def _load(path, policy: str):
    return moerun.load(path, policy=policy, device="cpu", vram_budget="1GiB", max_context=64, progress=False)


def test_learned_prefetch_runs_live_and_replay_agrees(tiny_olmoe, tmp_path):
    """Live: the runtime runs the predictor each layer step; replaying the recorded trace under the
    same policy gives the same predictions, prefetches and hits."""
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    model = _load(tiny_olmoe, "policy lru { cache { capacity = 6  eviction = lru } }")
    with model.moerun.record_trace(tmp_path / "train.npz"):
        model.generate(prompt, max_new_tokens=12, do_sample=False)
    pred = train_predictor([read_trace(tmp_path / "train.npz")], hidden=16, epochs=2, log=lambda _: None)
    path = pred.save(tmp_path / "p.npz")

    model = _load(tiny_olmoe, _learned(path))
    with model.moerun.record_trace(tmp_path / "live.npz"):
        model.generate(prompt, max_new_tokens=8, do_sample=False)
    live = model.moerun.runtime.engine.stats()
    assert live["prefetches"] > 0 and 0 < live["routing_prediction_accuracy"] < 1
    replayed = replay(read_trace(tmp_path / "live.npz"), compile_policy(_learned(path)),
                      num_slots=model.moerun.runtime.engine.shape["num_slots"])
    for key in ("routing_prediction_accuracy", "prefetches", "hits", "demand_fetches"):
        assert replayed[key] == pytest.approx(live[key]), key


def test_learned_prefetch_load_errors(tiny_olmoe, correlated, tmp_path):
    with pytest.raises(PolicyError, match="names no predictor"):
        _load(tiny_olmoe, "policy p { cache { capacity = 6 } prefetch { strategy = learned  budget = 2 } }")
    with pytest.raises(PolicyError, match="does not exist"):
        _load(tiny_olmoe, _learned(tmp_path / "nope.npz"))
    path = correlated[2].save(tmp_path / "p.npz")  # 3 layers, the tiny model has 2
    with pytest.raises(PolicyError, match="but the model has 2 x 8, top-2"):
        _load(tiny_olmoe, _learned(path))


def test_trace_predictor_command(tmp_path, capsys):
    from moerun.cli import main
    from moerun.trace.format import write_trace

    full = synthetic_trace("correlated", num_tokens=256, num_layers=3, num_experts=8, top_k=2, seed=3)
    train = write_trace(tmp_path / "train.npz", _tokens(full, 0, 192))
    test = write_trace(tmp_path / "test.npz", _tokens(full, 192, 256))
    out = tmp_path / "p.npz"
    assert main(["trace", "predictor", str(train), "--out", str(out), "--eval", str(test), "--hidden", "16",
                 "--epochs", "1"]) == 0
    assert "recall@k" in capsys.readouterr().out
    assert load_predictor(out, num_layers=3, num_experts=8, top_k=2).extra["accuracy"][str(test)]["examples"] == 128
    assert main(["trace", "predictor", str(tmp_path / "missing.npz"), "--out", str(out)]) == 1
    assert "No such file or directory" in capsys.readouterr().err  # errors go to stderr
