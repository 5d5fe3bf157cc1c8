"""The policy engine: a compiled policy turned into per-layer decisions, made by native code.

:class:`PolicyEngine` builds the native engine (``moerun._C.PolicyEngine``, see csrc/policy_engine.h)
from the policy's :class:`~moerun.policy.engine_setup.EngineSetup`, which checks the policy against
the model and the arena first, so a policy that cannot run fails with a :class:`PolicyError` naming
the numbers. The runtime and trace replay drive the SAME native engine, built the same way, so
replay predicts what the runtime does. This module knows nothing about tensors or the arena: it
speaks plain integers, and the runtime mirrors each :class:`Plan` into the arena's slot table.

Call path: ``engine.step`` IS the native method (bound once in ``__init__``), so a step costs one
native call; it returns the same :class:`Plan` object every time (its buffers are reused), so read
the plan before the next step.
"""
from __future__ import annotations

from typing import Sequence

from moerun.native import _C
from moerun.policy.engine_setup import CostModel, EngineSetup, engine_setup, host_tier
from moerun.policy.ir import AUTO, METRICS, CompiledPolicy, HostConfig

__all__ = ["CostModel", "Plan", "PolicyEngine"]

Plan = _C.Plan
"""Decisions of one layer step (native; reused by the next step). Fields:

- ``hits``: ``[(expert, slot)]``
- ``fetches``: ``[(expert, slot, victim_layer, victim_expert)]`` (victim ``-1, -1`` if the slot was free)
- ``cpu``: ``[(expert,)]`` run on the CPU
- ``prefetches``: ``[(layer, expert, slot, victim_layer, victim_expert)]`` for later layers
- ``releases``: ``[(slot, layer, expert)]`` that leave the arena once this step's kernel is done
  (experts staged for one step, TTL/watermark/memory evictions, partition shrinks)
- ``num_hits``, ``num_fetches``, ``num_cpu``, ``num_prefetches``, ``num_releases``: counts (cheap)
- ``predicted_us``: the cost model's estimate of this layer step
"""


class PolicyEngine:
    """Decisions for one model under one policy (see the module docstring for the call path).

    ``step(layer, expert_ids, gate_weights, prefill=False) -> Plan``: ``expert_ids`` are the layer's T*K
    routed ids (a list/tuple of ints or an integer array; duplicates across tokens allowed: accesses count
    per (token, expert) pair, decisions are per unique expert), ``gate_weights`` the matching floats
    (or None); ``prefill`` marks a prefill's step (staging within ``schedule.prefill_staging``, the next
    layer streamed ahead: docs/design.md, Prefill). Raises ValueError for an id or layer out of range.
    """

    def __init__(self, policy: CompiledPolicy, *, num_layers: int, num_experts: int, top_k: int,
                 num_slots: int, expert_bytes: int, cost: CostModel | None = None, replay: bool = False):
        self.shape = dict(num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                          num_slots=num_slots, expert_bytes=expert_bytes)
        self.cost = cost or CostModel()
        self.replay_mode = replay
        self.policy = policy
        self.setup = self.setup_for(policy)
        self._native = _C.PolicyEngine(self.setup.config)
        # (engine clock at the swap, policy): adapt firings name rules of the policy they fired under.
        self._policies: list[tuple[int, CompiledPolicy]] = [(0, policy)]
        self.step = self._native.step  # the hot call: no Python frame in between

    def observe_prediction(self, layer: int, expert_ids: Sequence[int],
                           scores: Sequence[float] | None = None) -> None:
        """Predicted ids for ``layer`` (lookahead: ranked; learned: with ``scores``), consumed by the
        next step of an earlier layer; accuracy against the real routing appears in stats."""
        self._native.observe_prediction(layer, expert_ids, scores)

    def prefetch_ahead(self, layer: int, expert_ids: Sequence[int], scores: Sequence[float] | None = None):
        """Lookahead between steps: ids predicted for ``layer`` (ranked) from the hidden state the step
        before it produced. Under ``lookahead`` prefetch the returned plan lists the prefetches issued
        (up to the budget, of ids not resident), and nothing else; under any strategy the ids count
        toward ``routing_prediction_accuracy``. The plan object is the one ``step`` returns, reused."""
        return self._native.prefetch_ahead(layer, expert_ids, scores)

    def observe_timing(self, layer: int, *, layer_us: float, copy_us: float = 0.0, copy_bytes: int = 0,
                       cpu_us: float = 0.0, cpu_expert_tokens: int = 0, cpu_experts: int = 0) -> None:
        """Measured times of ``layer``'s last step: re-estimates the cost model (bandwidth from
        ``copy_bytes / copy_us``; the CPU's time per expert and per token from ``cpu_us`` over
        ``cpu_experts`` experts running ``cpu_expert_tokens`` routed tokens, 0 experts meaning one per token)
        and scores its prediction (``stats()['cost_prediction_error']``)."""
        self._native.observe_timing(layer, layer_us, copy_us, copy_bytes, cpu_us, cpu_expert_tokens, cpu_experts)

    def setup_for(self, policy: CompiledPolicy) -> EngineSetup:
        """``policy``'s engine setup on this engine's model and slots (PolicyError if it cannot run)."""
        return engine_setup(policy, cost=self.cost, replay=self.replay_mode, **self.shape)

    def set_policy(self, policy: CompiledPolicy) -> None:
        """Hot swap: new parameters from the next step; cache contents kept (a smaller capacity
        evicts, reported in the next plan's ``releases``)."""
        setup = self.setup_for(policy)
        self._native.set_config(setup.config)
        self._policies.append((self._native.stats()["accesses"], policy))
        self.policy, self.setup = policy, setup

    def warm(self, layer: int, expert: int) -> int:
        """Place (layer, expert) in a free slot of its partition without counting an access (start-up
        fill of an arena that holds every expert); its slot, or -1 when resident or without room."""
        return self._native.warm(layer, expert)

    def lookup(self, layer: int, expert: int) -> int:
        """Slot holding (layer, expert), -1 when not resident."""
        return self._native.lookup(layer, expert)

    def metric(self, name: str, window: int) -> float:
        """A metric over the last ``window`` accesses (NaN until that many have passed). ``drift`` and
        ``utilization_gini`` need the accesses themselves: NaN for a window longer than the engine keeps
        (the longest window an adapt rule takes them over, or :meth:`keep_access_log`'s)."""
        if name not in METRICS:
            raise ValueError(f"unknown metric '{name}'; expected one of {', '.join(METRICS)}")
        return self._native.metric(METRICS.index(name), window)

    def keep_access_log(self, window: int) -> None:
        """Keep the last ``window`` accesses, so :meth:`metric` can give ``drift`` and
        ``utilization_gini`` over windows up to that long (restarts drift's baseline when it grows)."""
        self._native.keep_access_log(window)

    def stats(self) -> dict:
        """Counters and rates: accesses, hits, misses, hit_rate, decode_hit_rate (steps not marked prefill),
        prefill (steps, accesses, hits, staged copies, streamed and streamed_used, borrowed cache slots,
        staged_peak, staging_limit), demand_fetches, prefetches,
        prefetch_accuracy, evictions, releases, cpu_share, overflow, bytes_fetched, dropped (routed
        pairs over an expert's capacity_factor; replay only), capacities,
        cost_model (current estimates), cost_prediction_error, routing_prediction_accuracy,
        adapt_firings ([{access, rule, value, policy, metric, op, threshold}]: the rule of the policy in
        force when it fired), simulated_us."""
        s = self._native.stats()
        s["policy"] = self.policy.name
        for f in s["adapt_firings"]:
            # A firing at clock c happened under the last policy swapped in before c (a firing needs an access).
            policy = next((p for start, p in reversed(self._policies) if start < f["access"]), self._policies[0][1])
            rule = policy.adapt[f["rule"]]
            f["policy"] = policy.name
            f["metric"], f["op"], f["threshold"] = rule.metric, rule.op, rule.threshold
        return s

    def reset(self) -> None:
        """Empty cache, zero counters, cost model back to its starting numbers."""
        self._native.reset()
        self._policies = [(0, self.policy)]

    def replay(self, expert_ids, gate_weights, step_starts, *, oracle_predictions: bool = True,
               predictions: tuple | None = None, host: HostConfig | None = None, prefill_steps=None) -> dict:
        """Run a whole trace (``expert_ids`` int32 ``[tokens, layers, k]``, ``gate_weights`` float32
        or None, ``step_starts`` int64 ``[steps + 1]``) through this engine natively; returns stats.

        ``predictions`` = (ids int32, scores float32), both ``[steps, layers, depth, width]``: what
        a predictor said at each step and layer about layers l+1..l+depth (-1 = no id); lookahead and
        learned prefetch are fed these instead of the trace's true routing.
        ``prefill_steps`` (uint8 ``[steps]``, or None: none): the steps that run as a prefill's.
        ``host`` with a capacity: a host tier of that many experts sits behind the GPU tier (as the
        runtime's host pool does: every copied, prefetched or CPU-run expert is looked up in it); its
        ``capacity, accesses, hits, misses, hit_rate, disk_bytes`` come back under ``"host"``.
        """
        pred_ids, pred_scores = predictions if predictions is not None else (None, None)
        tier = {}
        if host is not None and host.capacity != AUTO:
            t = host_tier(host)
            tier = dict(host_capacity=t.capacity, host_eviction=t.eviction, host_high_watermark=t.high_watermark,
                        host_low_watermark=t.low_watermark)
        native = self._native.replay(expert_ids, gate_weights, step_starts, oracle_predictions, pred_ids,
                                     pred_scores, prefill_steps=prefill_steps, **tier)
        out = self.stats()
        if "host" in native:
            out["host"] = dict(native["host"])
        return out
