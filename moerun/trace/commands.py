"""``moerun trace ...``: replay a trace under a policy, sweep policies x capacities, show routing
stats, train the learned prefetch predictor, write synthetic traces. Policies are anything
``moerun.policy.compile_policy`` takes: a ``.moe`` path, policy text, or a bundled name."""
from __future__ import annotations

import argparse
import json
import time

from moerun.trace.format import TraceError, read_trace, write_trace
from moerun.trace.workloads import WORKLOADS, synthetic_trace


def _compile(spec: str):
    from moerun.policy import compile_policy  # the language; imported only when a policy is named

    return compile_policy(spec)


def _replay(args) -> int:
    from moerun.trace.replay import replay

    trace = read_trace(args.trace)
    policy = _compile(args.policy)
    t0 = time.perf_counter()
    s = replay(trace, policy, capacity=args.capacity, num_slots=args.slots, host_capacity=args.host_capacity)
    elapsed = time.perf_counter() - t0
    s["replay_accesses_per_s"] = trace.num_accesses / elapsed if elapsed > 0 else float("inf")
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"policy {s['policy']} on {args.trace}: {trace.num_tokens} tokens x {trace.num_layers} layers x "
          f"top-{trace.top_k}, {s['num_slots']} slots (capacities {s['capacities'][:8]}"
          f"{'...' if len(s['capacities']) > 8 else ''})")
    print(f"  hit rate     {s['hit_rate']:.4f}  ({s['hits']} hits / {s['accesses']} accesses, {s['misses']} misses)")
    print(f"  fetches      {s['demand_fetches']} demand + {s['prefetches']} prefetch "
          f"(prefetch accuracy {s['prefetch_accuracy']:.3f}), {s['bytes_fetched'] / 1e9:.2f} GB moved")
    print(f"  cpu share    {s['cpu_share']:.4f}  ({s['cpu_experts']} expert runs, overflow {s['overflow']})")
    print(f"  est. time    {s['estimated_ms']:.1f} ms (cost model)   adapt firings {s['adapt_firing_count']}")
    if "host" in s:
        h = s["host"]
        print(f"  host tier    hit rate {h['hit_rate']:.4f} with {h['capacity']} experts in host memory "
              f"({h['hits']} hits / {h['accesses']} reads, {h['disk_bytes'] / 1e9:.2f} GB from disk)")
    return 0


def _sweep(args) -> int:
    from moerun.trace.sweep import format_rows, sweep, write_outputs

    trace = read_trace(args.trace)
    rows = sweep(trace, [_compile(p) for p in args.policies], args.capacities, with_belady=not args.no_belady,
                 host_capacity=args.host_capacity)
    print(format_rows(rows))
    write_outputs(rows, args.json, args.plot, title=f"{trace.model}")
    return 0


def _stats(args) -> int:
    from moerun.trace.stats import format_table, layer_stats

    trace = read_trace(args.trace)
    rows = layer_stats(trace)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{args.trace}: model {trace.model}, {trace.num_tokens} tokens, {trace.num_steps} steps, "
              f"{trace.num_layers} layers, {trace.num_experts} experts, top-{trace.top_k}")
        print(format_table(rows))
    return 0


def _predictor(args) -> int:
    from moerun.expert_predictor import accuracy, train_predictor  # torch: only for this command

    traces = [read_trace(p) for p in args.traces]
    predictor = train_predictor(traces, history=args.history, horizon=args.horizon, hidden=args.hidden,
                                epochs=args.epochs, seed=args.seed)
    report = {}
    for path in args.eval:
        trace = read_trace(path)
        trace.check_model(num_layers=predictor.num_layers, num_experts=predictor.num_experts, top_k=predictor.top_k)
        report[path] = accuracy(predictor, trace)
        a = report[path]
        print(f"{path}: top-1 {a['top1']:.3f}  primary top-1 {a['top1_primary']:.3f} / top-2 "
              f"{a['top2_primary']:.3f}  recall@k {a['recall_at_k']:.3f}  ({a['examples']} token-layer pairs)")
    predictor.save(args.out, accuracy=report)
    print(f"wrote {args.out}: history {args.history}, horizon {args.horizon}, hidden {args.hidden}")
    return 0


def _synth(args) -> int:
    trace = synthetic_trace(args.workload, num_tokens=args.tokens, num_layers=args.layers,
                            num_experts=args.experts, top_k=args.top_k, batch=args.batch, seed=args.seed)
    write_trace(args.out, trace)
    print(f"wrote {args.out}: {args.workload}, {trace.num_tokens} tokens x {trace.num_layers} layers")
    return 0


def _guard(func):
    def run(args) -> int:
        try:
            return func(args)
        except (TraceError, ValueError) as exc:  # PolicyError is a ValueError too
            print(f"error: {exc}")
            return 1
    return run


def add_parser(subparsers) -> None:
    """Register ``moerun trace replay|sweep|stats|predictor|synth``."""
    trace = subparsers.add_parser("trace", help="replay, sweep and inspect routing traces")
    sub = trace.add_subparsers(dest="trace_command", required=True)

    p = sub.add_parser("replay", help="replay a trace under one policy")
    p.add_argument("trace")
    p.add_argument("--policy", required=True, help=".moe file, policy text, or bundled name")
    p.add_argument("--capacity", type=int, default=None, help="override the policy's cache capacity")
    p.add_argument("--slots", type=int, default=None, help="GPU expert slots (default: the capacity)")
    p.add_argument("--host-capacity", type=int, default=None,
                   help="experts in host memory: adds the host tier's hit rate (default: the policy's host block)")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    p.set_defaults(func=_guard(_replay))

    p = sub.add_parser("sweep", help="hit rate over policies x capacities (+ Belady)")
    p.add_argument("trace")
    p.add_argument("--policies", nargs="+", required=True)
    p.add_argument("--capacities", nargs="+", type=int, required=True)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write hit rate vs capacity to this PNG")
    p.add_argument("--no-belady", action="store_true")
    p.add_argument("--host-capacity", type=int, default=None,
                   help="experts in host memory: adds each row's host-tier hit rate")
    p.set_defaults(func=_guard(_sweep))

    p = sub.add_parser("stats", help="per-layer entropy, skew, reuse distance, next-layer predictability")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(_stats))

    p = sub.add_parser("predictor", help="train the learned-prefetch expert predictor on traces")
    p.add_argument("traces", nargs="+", help="training traces (one model)")
    p.add_argument("--out", required=True, help="predictor file to write (.npz)")
    p.add_argument("--eval", nargs="*", default=[], help="traces to report its accuracy on")
    p.add_argument("--history", type=int, default=2, help="layers of routing it looks at")
    p.add_argument("--horizon", type=int, default=1, help="layers ahead it predicts")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_guard(_predictor))

    p = sub.add_parser("synth", help="write a seeded synthetic trace")
    p.add_argument("workload", choices=WORKLOADS)
    p.add_argument("out")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_guard(_synth))
