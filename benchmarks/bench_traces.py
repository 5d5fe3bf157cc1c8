"""Policies and predictors on the realistic traces of ``benchmarks/traces/`` (routing of the small
MoE LMs that ``benchmarks/train_moe.py`` trains on real text).

For each model (``olmoe``: 8 layers x 64 experts, top-8; ``mixtral``: 8 layers x 8 experts, top-2):

1. routing statistics of each held-out kind (``moerun.trace.stats``, averaged over layers);
2. the learned predictor (``moerun.expert_predictor``) trained on the routing of TRAINING text
   (``<model>_train.npz``), written to ``benchmarks/traces/<model>_predictor.npz`` (the file the
   ``learned`` prefetch strategy names), and its accuracy on each held-out kind;
3. capacity sweeps of every bundled policy, of LRU + learned prefetch with that predictor, and of
   Belady on each held-out kind: hit rate and its share of Belady's.

Bundled ``lookahead`` replays twice: with the trace's true next-layer routing as its prediction
(``lookahead-oracle``: an upper bound, recall 100 %) and with no prediction at all
(``lookahead``: what it keeps by eviction alone); the live router-on-hidden-state recall, measured
on the GPU, is in ``train_log.json`` and lies between. The "best bundled" column takes the realistic
replays only (no oracle); "best no-prefetch" only those that issued no prefetch, the fair
comparison with Belady, which never prefetches (a prefetch that turns a miss into a hit still
copies the expert: the bytes column, copies / Belady's copies, shows that price).

    python benchmarks/bench_traces.py [--out benchmarks/results/bench_traces.json] [--plots DIR]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from moerun.expert_predictor import accuracy, train_predictor
from moerun.policy import bundled_policies, compile_policy
from moerun.trace.format import read_trace
from moerun.trace.replay import replay
from moerun.trace.stats import layer_stats
from moerun.trace.sweep import BELADY, write_outputs

TRACES = Path(__file__).resolve().parent / "traces"
KINDS = ("code", "prose", "mixed")
# Capacities (expert slots over all layers) per model: from ~6 % to 75 % of the routed experts.
CAPACITIES = {"olmoe": (32, 64, 128, 256, 384), "mixtral": (8, 16, 24, 32, 48)}


def learned_policy(predictor: Path, budget: int):
    """LRU cache + learned prefetch with ``predictor`` (capacity set by the sweep)."""
    return compile_policy(f'''policy learned {{
        cache {{ capacity = 8  eviction = lru }}
        prefetch {{ strategy = learned  budget = {budget}  predictor = "{predictor}" }}
    }}''')


def sweep_rows(trace, policies: dict, capacities) -> list[dict]:
    """Hit rate of each (name -> (policy, oracle)) at each capacity, with its share of Belady's."""
    rows, belady = [], {}
    for cap in capacities:
        belady[cap] = replay(trace, BELADY, capacity=cap)
    for name, (policy, oracle) in policies.items():
        for cap in capacities:
            p = policy
            if p.per_layer is not None:
                p = replace(p, per_layer=replace(p.per_layer, total_budget=cap))
            if p.prefetch.budget > cap:
                p = replace(p, prefetch=replace(p.prefetch, budget=cap))
            s = replay(trace, p, capacity=cap, oracle_predictions=oracle)
            rows.append(dict(policy=name, capacity=cap, hit_rate=s["hit_rate"],
                             vs_belady=s["hit_rate"] / belady[cap]["hit_rate"],
                             bytes_vs_belady=s["bytes_fetched"] / max(belady[cap]["bytes_fetched"], 1),
                             prefetch_accuracy=s["prefetch_accuracy"], bytes_fetched=s["bytes_fetched"],
                             prefetches=s["prefetches"], demand_only=s["prefetches"] == 0))
    rows += [dict(policy="belady", capacity=c, hit_rate=b["hit_rate"], vs_belady=1.0, bytes_vs_belady=1.0,
                  bytes_fetched=b["bytes_fetched"], prefetches=0, demand_only=True) for c, b in belady.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=Path, default=TRACES)
    ap.add_argument("--models", nargs="+", default=list(CAPACITIES))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_traces.json"))
    ap.add_argument("--plots", type=Path, default=None, help="directory for hit-rate-vs-capacity PNGs")
    ap.add_argument("--epochs", type=int, default=4, help="predictor training epochs")
    args = ap.parse_args(argv)
    bundled = {name: compile_policy(name) for name in bundled_policies()}
    result = {}
    for model in args.models:
        traces = {k: read_trace(args.traces / f"{model}_{k}.npz") for k in KINDS}
        train = read_trace(args.traces / f"{model}_train.npz")
        stats = {}
        for kind, t in traces.items():
            rows = layer_stats(t)
            stats[kind] = {key: float(np.nanmean([r[key] for r in rows]))
                           for key in ("entropy_bits", "max_entropy_bits", "skew_top10", "reuse_distance_median",
                                       "next_layer_predictability", "prev_token_overlap")}
            stats[kind]["per_layer"] = rows
        print(f"== {model}: training the learned predictor on {train.num_tokens} tokens of training text")
        predictor = train_predictor([train], epochs=args.epochs)
        pred_path = args.traces / f"{model}_predictor.npz"
        acc = {kind: accuracy(predictor, t) for kind, t in traces.items()}
        predictor.save(pred_path, accuracy=acc, trained_on=f"{model}_train.npz")
        policies = {}
        for name, p in bundled.items():
            policies[name] = (p, False)
            if p.prefetch.strategy == "lookahead":
                policies[f"{name}-oracle"] = (p, True)
        policies["lru+learned"] = (learned_policy(pred_path, train.top_k), False)
        sweeps = {}
        for kind, t in traces.items():
            rows = sweep_rows(t, policies, CAPACITIES[model])
            sweeps[kind] = rows
            if args.plots:
                args.plots.mkdir(parents=True, exist_ok=True)
                write_outputs(rows, None, args.plots / f"sweep_{model}_{kind}.png", title=f"{model}-like, held-out {kind}")
            realistic = [n for n in bundled]
            print(f"-- {model} {kind}: hit rate, its share of Belady's, bytes copied / Belady's, per capacity")
            print(f"{'policy':<18}" + "".join(f"{c:>21}" for c in CAPACITIES[model]))
            for name in list(policies) + ["belady"]:
                cells = {r["capacity"]: r for r in rows if r["policy"] == name}
                print(f"{name:<18}" + "".join(f"{cells[c]['hit_rate']:>7.3f} {cells[c]['vs_belady']:>5.0%} "
                                              f"{cells[c]['bytes_vs_belady']:>6.1f}x" for c in CAPACITIES[model]))
            for label, pick in (("best bundled", lambda r: True), ("best no-prefetch", lambda r: r["demand_only"])):
                best = {c: max((r for r in rows if r["policy"] in realistic and r["capacity"] == c and pick(r)),
                               key=lambda r: r["hit_rate"]) for c in CAPACITIES[model]}
                print(f"{label:<18}" + "".join(f"{best[c]['policy'][:9]:>10} {best[c]['vs_belady']:>5.0%} "
                                               f"{best[c]['bytes_vs_belady']:>4.1f}x" for c in CAPACITIES[model]))
        result[model] = dict(stats=stats, predictor_accuracy=acc, sweeps=sweeps, capacities=CAPACITIES[model])
        for kind in KINDS:
            a = acc[kind]
            print(f"   predictor on {kind}: top-1 {a['top1']:.3f}, primary top-1 {a['top1_primary']:.3f} / "
                  f"top-2 {a['top2_primary']:.3f}, recall@k {a['recall_at_k']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
