"""``moerun trace ...``: replay a trace under a policy, sweep policies x capacities, show routing
stats, train the learned prefetch predictor, write synthetic traces. Policies are anything
``moerun.policy.compile_policy`` takes: a ``.moe`` path, policy text, or a bundled name; ``FILE:NAME`` names
one policy of a file of several (see :func:`policy_spec`), and ``sweep`` takes such a file without a name as
each of its policies.

Errors (a trace that is not one, a policy that does not fit it, a path that cannot be written) are
raised as :data:`ERRORS` and printed by ``moerun.cli``: stderr, exit status 1. Output paths are
checked before the work whose result they take, and never name a file the command reads (a trace,
a policy file, a predictor a policy names): the output would replace it."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from moerun.cli import whole_number
from moerun.files import check_writable
from moerun.policy.errors import PolicyError
from moerun.policy.validator import INT32_MAX, INT64_MAX  # slots are the engine's int, the host tier's int64
from moerun.trace.format import MAX_EXPERTS, TraceError, read_trace, write_trace
from moerun.trace.workloads import WORKLOADS, synthetic_trace

ERRORS = (TraceError, PolicyError)  # what these commands raise for bad input (moerun.cli prints it)
SYNTH_MAX_DRAWS = 1 << 27  # tokens x experts one synthetic layer draws at once (float64: 1 GiB)


# A policy's name on the command line, after FILE: the grammar's NAME terminal (moerun/policy/grammar.lark).
POLICY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def policy_spec(spec: str) -> tuple[str, str | None]:
    """``(source, name)`` for a ``--policy``/``--policies`` value: ``FILE:NAME`` split at its last ``:``, else
    ``(spec, None)``. A path that exists as given is a file whatever it holds (``a:b.moe``, ``C:\\p.moe``), and
    policy text (it has ``{``) or a tail that is no policy name (``x:y.moe``) is never split; no bundled name
    holds a ``:``."""
    if "{" in spec or Path(spec).expanduser().exists():
        return spec, None
    source, colon, name = spec.rpartition(":")
    if colon and source and POLICY_NAME.fullmatch(name):
        return source, name
    return spec, None


def _compile(spec: str, trace, *, each: bool = False) -> list:
    """The policies ``spec`` names, checked against the trace's shape (a capacity above its experts, a pin
    outside it): ``FILE:NAME``'s one, a file's only one, or with ``each`` (sweep) every policy of a file of
    several, in file order; without ``each`` such a file is refused naming its policies (compiler.select)."""
    from moerun.policy import compile_policy, load_source, parse  # the language; only when a policy is named

    source, name = policy_spec(spec)
    policy_file = parse(*load_source(source))
    names = [name]
    if name is None and each:  # (a file of no policy keeps [None]: compile_policy says what is wrong)
        names = [p.name for p in policy_file.policies] or names
    return [compile_policy(policy_file, name=n, num_layers=trace.num_layers, num_experts=trace.num_experts)
            for n in names]


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode when both exist (hard links, symlinks), else
    the same resolved path (an output not written yet)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _check_outputs(outputs: dict[str, str | None], inputs: dict[str, str]) -> None:
    """Raise TraceError when an output (``{option: path}``) names an input (``{what: path}``) or another
    output: writing it would replace a file the command reads, or one output would replace the other."""
    given = [(option, path) for option, path in outputs.items() if path]
    for option, out in given:
        for what, path in inputs.items():
            if _same_file(out, path):
                raise TraceError(f"{option} {out} is the same file as {what}: writing it would replace what this "
                                 f"command reads; give {option} another path")
    for i, (option, out) in enumerate(given):
        for other, path in given[i + 1:]:
            if _same_file(out, path):
                raise TraceError(f"{option} {out} and {other} {path} are the same file: one would replace the other; "
                                 "give them different paths")


def _policy_inputs(specs: list[str], policies) -> dict[str, str]:
    """The files the policies ``specs`` compiled to were read from: ``.moe`` files and predictor files."""
    sources = [policy_spec(spec)[0] for spec in specs]
    inputs = {f"the policy file {source}": source for source in sources
              if "{" not in source and Path(source).expanduser().is_file()}
    inputs.update({f"the predictor of policy '{p.name}'": p.prefetch.predictor for p in policies
                   if p.prefetch.predictor})
    return inputs


def _check_unique_names(policies) -> None:
    """Raise PolicyError when two policies to sweep share a name: sweep rows and plot lines are named by
    policy, so their results would read as one policy's."""
    seen: dict[str, str] = {}
    for policy in policies:
        if policy.name in seen:
            raise PolicyError(f"--policies gives two policies named '{policy.name}' ({seen[policy.name]} and "
                              f"{policy.source}): sweep rows are named by policy; give each policy once, or "
                              "rename one")
        seen[policy.name] = policy.source


def _check_slots(trace, what: str, value: int | None) -> None:
    total = trace.num_layers * trace.num_experts
    if value is not None and value > total:
        raise TraceError(f"{what} {value} exceeds the trace's {trace.num_layers} layers x {trace.num_experts} "
                         f"experts = {total}; more slots than experts can never be used")


def _check_host_capacity(trace, value: int | None) -> None:
    """--host-capacity within top_k..layers x experts: fewer cannot hold one step's experts (moerun.load
    refuses them too), more can never be used (the engine would hold only every expert)."""
    total = trace.num_layers * trace.num_experts
    if value is not None and not trace.top_k <= value <= total:
        raise TraceError(f"--host-capacity {value} is outside {trace.top_k}..{total}: the host pool holds at least "
                         f"one layer step's top_k = {trace.top_k} experts and at most the trace's "
                         f"{trace.num_layers} layers x {trace.num_experts} experts; give a number in that range")


def _replay(args) -> int:
    from moerun.trace.replay import replay

    trace = read_trace(args.trace)
    _check_slots(trace, "--capacity", args.capacity)
    _check_slots(trace, "--slots", args.slots)
    _check_host_capacity(trace, args.host_capacity)
    [policy] = _compile(args.policy, trace)
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
    from moerun.trace.sweep import default_capacities, format_rows, sweep, write_outputs

    outputs = {"--json": args.json, "--plot": args.plot}
    _check_outputs(outputs, {f"the trace {args.trace}": args.trace})
    for path, what in ((args.json, "sweep JSON"), (args.plot, "sweep plot")):
        if path:
            check_writable(path, what)
    trace = read_trace(args.trace)
    capacities = args.capacities or default_capacities(trace)
    for cap in capacities:
        _check_slots(trace, "capacity", cap)
    _check_host_capacity(trace, args.host_capacity)
    policies = [policy for spec in args.policies for policy in _compile(spec, trace, each=True)]
    _check_unique_names(policies)
    _check_outputs(outputs, _policy_inputs(args.policies, policies))
    rows = sweep(trace, policies, capacities, with_belady=not args.no_belady, host_capacity=args.host_capacity)
    print(format_rows(rows))
    write_outputs(rows, args.json, args.plot, title=f"{trace.model}")
    return 0


def _stats(args) -> int:
    from moerun.trace.stats import format_table, layer_stats

    trace = read_trace(args.trace)
    rows = layer_stats(trace)
    if args.json:  # undefined values (NaN) as null: JSON has no NaN
        print(json.dumps([{k: None if v != v else v for k, v in r.items()} for r in rows], indent=2))
    else:
        print(f"{args.trace}: model {trace.model}, {trace.num_tokens} tokens, {trace.num_steps} steps, "
              f"{trace.num_layers} layers, {trace.num_experts} experts, top-{trace.top_k}")
        print(format_table(rows))
    return 0


def _predictor(args) -> int:
    from moerun.expert_predictor import accuracy, train_predictor  # torch: only for this command

    _check_outputs({"--out": args.out}, {f"the trace {p}": p for p in [*args.traces, *args.eval]})
    check_writable(args.out, "predictor")
    traces, evals = _predictor_traces(args.traces, args.eval)
    predictor = train_predictor(traces, history=args.history, horizon=args.horizon, hidden=args.hidden,
                                epochs=args.epochs, seed=args.seed)
    report = {}
    for path, trace in zip(args.eval, evals):
        report[path] = accuracy(predictor, trace)
        a = report[path]
        print(f"{path}: top-1 {a['top1']:.3f}  primary top-1 {a['top1_primary']:.3f} / top-2 "
              f"{a['top2_primary']:.3f}  recall@k {a['recall_at_k']:.3f}  ({a['examples']} token-layer pairs)")
    predictor.save(args.out, accuracy=report)
    print(f"wrote {args.out}: history {args.history}, horizon {args.horizon}, hidden {args.hidden}")
    return 0


def _predictor_traces(paths: list[str], eval_paths: list[str]) -> tuple[list, list]:
    """The training and --eval traces, read and checked before any training: one model's shape (the first
    training trace's), training examples to learn from and tokens to evaluate on."""
    traces, evals = [read_trace(p) for p in paths], [read_trace(p) for p in eval_paths]
    first = traces[0]
    for path, trace in zip([*paths, *eval_paths], [*traces, *evals]):
        try:
            trace.check_model(num_layers=first.num_layers, num_experts=first.num_experts, top_k=first.top_k,
                              where=path, model=f"the first training trace {paths[0]}")
        except TraceError as exc:
            raise TraceError(f"{exc}; a predictor is trained and evaluated on traces of one model: leave {path} out "
                             "or give traces recorded from the same model") from None
    if first.num_layers >= 2 and not any(t.num_tokens for t in traces):
        # (a trace of one layer is train_predictor's error: no layer ahead to predict)
        raise TraceError(f"the training traces ({', '.join(paths)}) hold no tokens, so they give no examples: the "
                         "predictor learns the next layers' experts from each token's routing; give traces of at "
                         "least one token (model.moerun.record_trace(path) records one, moerun trace synth writes one)")
    for path, trace in zip(eval_paths, evals):
        if not trace.num_tokens:
            raise TraceError(f"--eval trace {path} holds no tokens: there is nothing to measure the predictor's "
                             "accuracy on; give a trace of at least one token or leave it out")
    return traces, evals


def _synth(args) -> int:
    check_writable(args.out, "trace")
    if args.top_k > args.experts:
        raise TraceError(f"--top-k {args.top_k} exceeds --experts {args.experts}: a token routes to distinct experts")
    if args.tokens * args.experts > SYNTH_MAX_DRAWS:
        raise TraceError(f"--tokens {args.tokens} x --experts {args.experts} is more than {SYNTH_MAX_DRAWS} draws "
                         "per layer; write several smaller traces")
    trace = synthetic_trace(args.workload, num_tokens=args.tokens, num_layers=args.layers,
                            num_experts=args.experts, top_k=args.top_k, batch=args.batch, seed=args.seed)
    write_trace(args.out, trace)
    print(f"wrote {args.out}: {args.workload}, {trace.num_tokens} tokens x {trace.num_layers} layers")
    return 0


def add_parser(subparsers) -> None:
    """Register ``moerun trace replay|sweep|stats|predictor|synth``."""
    trace = subparsers.add_parser("trace", help="replay, sweep and inspect routing traces")
    sub = trace.add_subparsers(dest="trace_command", required=True)
    slots, host_slots = whole_number(1, INT32_MAX), whole_number(1, INT64_MAX)

    p = sub.add_parser("replay", help="replay a trace under one policy")
    p.add_argument("trace")
    p.add_argument("--policy", required=True,
                   help=".moe file, FILE:NAME (one policy of a file of several), policy text, or bundled name")
    p.add_argument("--capacity", type=slots, default=None, help="override the policy's cache capacity")
    p.add_argument("--slots", type=slots, default=None, help="GPU expert slots (default: the capacity)")
    p.add_argument("--host-capacity", type=host_slots, default=None,
                   help="experts in host memory: adds the host tier's hit rate (default: the policy's host block)")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    p.set_defaults(func=_replay)

    p = sub.add_parser("sweep", help="hit rate over policies x capacities (+ Belady)")
    p.add_argument("trace")
    p.add_argument("--policies", nargs="+", required=True,
                   help=".moe files (a file of several: each of its policies), FILE:NAME, policy text or bundled "
                        "names; one row per policy and capacity, named by policy")
    p.add_argument("--capacities", nargs="+", type=slots, default=None,
                   help="GPU expert slots to try (default: 1/8, 1/4 and 1/2 of the trace's experts)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write hit rate vs capacity to this PNG")
    p.add_argument("--no-belady", action="store_true", help="leave out Belady (optimal demand-only eviction)")
    p.add_argument("--host-capacity", type=host_slots, default=None,
                   help="experts in host memory: adds each row's host-tier hit rate")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("stats", help="per-layer entropy, skew, reuse distance, next-layer predictability")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_stats)

    p = sub.add_parser("predictor", help="train the learned-prefetch expert predictor on traces")
    p.add_argument("traces", nargs="+", help="training traces (one model)")
    p.add_argument("--out", required=True, help="predictor file to write (.npz)")
    p.add_argument("--eval", nargs="*", default=[], help="traces to report its accuracy on")
    p.add_argument("--history", type=whole_number(1, 1024), default=2, help="layers of routing it looks at")
    p.add_argument("--horizon", type=whole_number(1, 1024), default=1, help="layers ahead it predicts")
    p.add_argument("--hidden", type=whole_number(1, 1 << 16), default=256, help="width of its hidden layer")
    p.add_argument("--epochs", type=whole_number(1, 1 << 20), default=8)
    p.add_argument("--seed", type=whole_number(0, INT64_MAX), default=0)
    p.set_defaults(func=_predictor)

    p = sub.add_parser("synth", help="write a seeded synthetic trace")
    p.add_argument("workload", choices=WORKLOADS)
    p.add_argument("out")
    p.add_argument("--tokens", type=whole_number(1, SYNTH_MAX_DRAWS), default=1024)
    p.add_argument("--layers", type=whole_number(1, 1024), default=8)
    p.add_argument("--experts", type=whole_number(1, MAX_EXPERTS), default=64)
    p.add_argument("--top-k", type=whole_number(1, MAX_EXPERTS), default=8)
    p.add_argument("--batch", type=whole_number(1, SYNTH_MAX_DRAWS), default=1)
    p.add_argument("--seed", type=whole_number(0, INT64_MAX), default=0)
    p.set_defaults(func=_synth)
