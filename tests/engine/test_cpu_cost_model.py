"""The CPU's cost in the engine's cost model: two rates (per expert, per token) fitted from timed CPU jobs, and
the fitted rates are what the engine predicts a CPU step with (csrc/cost_model.cpp, fit_cpu_rates).

The starting numbers count as one earlier job whose weight decays by ``ema`` per job, as every job's does, so
the tests time enough jobs (80: the start keeps 0.8**80 of its weight) to compare with the CPU's true rates."""
import numpy as np
import pytest

from moerun.policy import compile_policy
from moerun.policy_engine import CostModel, PolicyEngine

E, K = 16, 2
JOBS = 40                                        # pairs of jobs: the starting numbers weigh nothing by then


def _engine(mode: str = "hybrid") -> PolicyEngine:
    policy = compile_policy(f"policy p {{ cache {{ eviction = lru }} schedule {{ mode = {mode} }} }}")
    return PolicyEngine(policy, num_layers=2, num_experts=E, top_k=K, num_slots=4, expert_bytes=1 << 20)


def _rates(engine: PolicyEngine) -> tuple[float, float]:
    cost = engine.stats()["cost_model"]
    return cost["cpu_us_per_expert"], cost["cpu_us_per_expert_token"]


def _job(engine: PolicyEngine, experts: int, tokens_per_expert: int, per_expert_us: float, per_token_us: float):
    """One timed CPU job: ``experts`` experts of ``tokens_per_expert`` tokens each, on a CPU of these rates."""
    cpu_us = experts * (per_expert_us + per_token_us * tokens_per_expert)
    engine.observe_timing(0, layer_us=0.0, cpu_us=cpu_us, cpu_expert_tokens=experts * tokens_per_expert,
                          cpu_experts=experts)


def test_jobs_of_different_tokens_per_expert_give_both_rates():
    engine = _engine()
    start = CostModel()
    assert _rates(engine) == (start.cpu_us_per_expert, start.cpu_us_per_expert_token)
    for _ in range(JOBS):                        # a decode's jobs (one token an expert) beside a prefill's
        _job(engine, 3, 1, 120.0, 35.0)
        _job(engine, 8, 24, 120.0, 35.0)
    assert _rates(engine) == pytest.approx((120.0, 35.0), rel=1e-6)


def test_decode_jobs_alone_scale_both_rates_to_their_time():
    # One token per expert says what an expert-token costs, not how it splits: the starting split is kept.
    engine = _engine()
    for _ in range(2 * JOBS):
        engine.observe_timing(0, layer_us=0.0, cpu_us=4 * 200.0, cpu_expert_tokens=4)   # 0 experts: one a token
    per_expert, per_token = _rates(engine)
    assert per_expert + per_token == pytest.approx(200.0, rel=1e-6)
    assert per_expert / per_token == pytest.approx(CostModel().cpu_us_per_expert / CostModel().cpu_us_per_expert_token)


def test_a_line_with_a_negative_time_per_expert_is_not_taken():
    engine = _engine()
    taus = [1, 10] * JOBS                        # y = -50 + 100 tau: no CPU reads weights in negative time
    for tau in taus:
        _job(engine, 4, tau, -50.0, 100.0)
    per_expert, per_token = _rates(engine)
    assert per_expert >= 0 and per_token > 0
    # Instead both rates are scaled so the line meets the jobs' (exponentially weighted) mean.
    ema = CostModel().ema
    weights = ema * (1 - ema) ** np.arange(len(taus))[::-1]
    mean_tau = float(np.dot(weights, taus) / weights.sum())
    assert per_expert + per_token * mean_tau == pytest.approx(-50.0 + 100.0 * mean_tau, rel=1e-6)


def test_the_engine_predicts_a_cpu_step_with_the_fitted_rates():
    engine = _engine("cpu_fallback")
    for _ in range(JOBS):
        _job(engine, 2, 1, 80.0, 20.0)
        _job(engine, 6, 30, 80.0, 20.0)
    tokens = {0: 5, 3: 9, 7: 2}                   # a prefill step: three experts, 16 routed pairs, all on the CPU
    plan = engine.step(0, np.repeat(list(tokens), list(tokens.values())), None, prefill=True)
    assert plan.num_cpu == 3 and plan.num_fetches == 0
    gpu_layer_us = engine.stats()["cost_model"]["gpu_layer_us"]
    assert plan.predicted_us == pytest.approx(3 * 80.0 + 16 * 20.0 + gpu_layer_us, rel=1e-6)
