"""Decode tok/s of the fast decode path against the transformers path, with its per-layer breakdown.

Three rows on a built-in model (default: Qwen1.5-MoE-A2.7B shapes, bf16, random weights), batch 1,
greedy unless ``--sample``:

- ``dense-only``: every expert resident, routed experts SKIPPED (the fast path runs with the
  ``SkipRoutedExperts`` routing override; on the transformers path the runtime's step returns zeros).
  Times the dense part alone; its tokens are not the model's.
- ``resident``: every expert resident (budget ``auto``).
- ``budget``: ``--budget`` (default 10GiB), one row per ``--policy``.

Greedy decoding of a random-weight model falls into a loop of repeated tokens, so its routing
repeats (high hit rates); ``--sample`` samples from the whole vocabulary so that tokens vary, yet a
random-weight model's routing stays concentrated (93 % hits at 10 GiB on the H100). ``--routing
uniform`` draws every token's experts uniformly at random on the device (the fast path's
``UniformRouting`` override, moerun.bench.routing_overrides): the worst case for any cache, the one the issue's target names; those
rows run the fast path only.

Each row times the fast path (graphs captured by a warm-up generation) under moerun's generate loop
and under transformers' (``model.moerun.generate_loop = False``), and the transformers path
(``model.moerun.fast_decode = False``) on the same loaded model, compares their tokens over the
shorter run, and gives the fast path's per-layer breakdown (``model.moerun.profile_decode``).

    MOERUN_CACHE=/tmp/mc python benchmarks/bench_decode.py --out decode.json
    MOERUN_CACHE=/tmp/mc python benchmarks/bench_decode.py --rows budget --sample
    MOERUN_CACHE=/tmp/mc python benchmarks/bench_decode.py --rows budget --routing uniform
    MOERUN_CACHE=/tmp/mc python benchmarks/bench_decode.py --compile   # segments fused by torch.compile
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig

import moerun
from moerun.bench.measure import timed_generate
from moerun.bench.models import prepare_checkpoint
from moerun.bench.profiling import profile_generation
from moerun.bench.routing_overrides import SkipRoutedExperts, UniformRouting


def _tok_s(model, prompt, new_tokens: int, device, sample: bool) -> tuple[float, list]:
    # Seeded: both paths draw the same samples (their logits are the same).
    timing = timed_generate(model, prompt, new_tokens, device, sample_seed=0 if sample else None)
    return timing.decode_steps / max(timing.decode_s, 1e-9), timing.tokens[0]


def _skip_routed_on_transformers_path(model):
    """Benchmark-only: the transformers path's MoE step returns zeros (routed experts skipped)."""
    runtime = model.moerun.runtime
    original = runtime.run
    runtime.run = lambda layer, x, *args, **kwargs: torch.zeros_like(x)
    return lambda: setattr(runtime, "run", original)


def _row(name, model, prompt, args, device, skip_routed: bool) -> dict:
    handle = model.moerun
    uniform = args.routing == "uniform" and not skip_routed
    # Dense-only: prefill (both paths) and the transformers path's decode skip through the runtime's
    # step, the fast path's decode steps through a routing override.
    restore = _skip_routed_on_transformers_path(model) if skip_routed else (lambda: None)
    handle.fast_decode = True
    handle.decoder.routing_override = (SkipRoutedExperts() if skip_routed else
                                       UniformRouting(handle.model_info["num_experts"]) if uniform else None)
    start = time.perf_counter()
    # Warm-up: compile, then capture every graph (a compiled segment runs twice before its capture,
    # and whole steps alternate between two graphs), so the timed run replays only.
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    warmup_s = time.perf_counter() - start
    handle.reset_stats()  # the row's counters: its timed and profiled generations
    fast_tok_s, fast_tokens = _tok_s(model, prompt, args.new_tokens, device, args.sample)
    # The same fast path under transformers' generate() loop, which reads the stop flag every step
    # (moerun's loop reads it one step late, runtime/decode_loop.py): the loop's share of a token.
    handle.generate_loop = False
    hf_loop_tok_s, hf_loop_tokens = _tok_s(model, prompt, args.new_tokens, device, args.sample)
    handle.generate_loop = True
    with handle.profile_decode() as profile:
        model.generate(prompt, max_new_tokens=args.profile_tokens, min_new_tokens=args.profile_tokens, do_sample=False)
    if args.kernel_profile:  # the device's kernels of a fast-path generation (graph replays included)
        stem = Path(args.kernel_profile) / name.replace(" ", "_").replace("/", "_")
        profile_generation(model, prompt, args.new_tokens, device, stem, row_limit=60)
    stats = handle.stats()  # before the override goes: removing it drops its graphs
    handle.decoder.routing_override = None

    slow_tok_s, same, n = None, 0, 0
    if not uniform:  # uniform routing exists on the fast path only (its tokens are not the model's)
        handle.fast_decode = False
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        slow_tok_s, slow_tokens = _tok_s(model, prompt, args.slow_new_tokens, device, args.sample)
        n = min(len(fast_tokens), len(slow_tokens))
        same = sum(a == b for a, b in zip(fast_tokens[:n], slow_tokens[:n]))
    restore()
    summary = profile.summary()
    # The host's part of one MoE layer step, µs (the target: sync + plan <= 40 at batch 1).
    moe_layers = len(summary["per_layer_ms"])
    host_us = ({p: 1e3 * summary["layer_sum_ms"][p] / moe_layers for p in ("sync", "plan", "after")}
               if moe_layers else None)
    row = {"row": name, "sample": args.sample, "routing": "uniform" if uniform else "model",
           "fast_tok_s": fast_tok_s, "fast_transformers_loop_tok_s": hf_loop_tok_s,
           "loop_ms_per_token": 1e3 / hf_loop_tok_s - 1e3 / fast_tok_s,
           "loops_tokens_equal": hf_loop_tokens == fast_tokens, "transformers_path_tok_s": slow_tok_s,
           "speedup": fast_tok_s / slow_tok_s if slow_tok_s else None,
           "tokens_equal": f"{same}/{n}" if n else None,
           "memory": handle.memory()["device"], "decode_stats": stats["decode"],
           "hit_rate": stats["hit_rate"], "cpu_share": stats["cpu_share"], "bytes_copied": stats["bytes_copied"],
           "cost_model": stats["engine"]["cost_model"],  # what the hybrid schedule believed at the end
           "warmup_s": warmup_s, "profile": summary, "host_us_per_moe_layer": host_us}
    phases = " ".join(f"{p}={v:.3f}" for p, v in summary["layer_sum_ms"].items())
    versus = (f"transformers path {slow_tok_s:.2f} tok/s | x{row['speedup']:.1f} | tokens equal {same}/{n}"
              if slow_tok_s else "uniform routing (fast path only)")
    print(f"[{name}] fast {fast_tok_s:.1f} tok/s (transformers' generate loop {hf_loop_tok_s:.1f}: "
          f"{row['loop_ms_per_token']:+.3f} ms/token, tokens equal {row['loops_tokens_equal']}) | {versus} | hit rate {stats['hit_rate']:.3f} | CPU share "
          f"{stats['cpu_share']:.3f} | warm-up {warmup_s:.1f} s | step {summary['step_ms']:.2f} ms; "
          f"sum over MoE layers (ms/step): {phases} | cost model {stats['engine']['cost_model']}", flush=True)
    if host_us:
        print(f"[{name}] host per MoE layer (µs, mean of {moe_layers} layers): sync {host_us['sync']:.1f} + plan "
              f"{host_us['plan']:.1f} = {host_us['sync'] + host_us['plan']:.1f}; after the kernel launch "
              f"{host_us['after']:.1f}; the host's own work (plan + after) {host_us['plan'] + host_us['after']:.1f}",
              flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen1.5-moe-a2.7b", help="a built-in model of moerun.bench")
    p.add_argument("--budget", default="10GiB")
    p.add_argument("--policy", nargs="+", default=["balanced.moe"],
                   help="the budget row's policies (one row each, hot-swapped on the same loaded model)")
    p.add_argument("--rows", nargs="+", default=["dense-only", "resident", "budget"],
                   choices=["dense-only", "resident", "budget"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128, help="fast path")
    p.add_argument("--slow-new-tokens", type=int, default=16, help="transformers path")
    p.add_argument("--profile-tokens", type=int, default=16)
    p.add_argument("--sample", action="store_true",
                   help="sample from the whole vocabulary (temperature 1) instead of greedy: a random-weight "
                        "model's routing then varies per step, close to uniform (greedy repeats a loop)")
    p.add_argument("--routing", choices=["model", "uniform"], default="model",
                   help="uniform: the budget and resident rows draw every token's experts uniformly at random "
                        "(the UniformRouting override on the fast path: the worst case for a cache)")
    p.add_argument("--compile", action="store_true",
                   help="moerun.load(compile_decode=True): fuse the fast path's small kernels (torch.compile)")
    p.add_argument("--kernel-profile", default=None, metavar="DIR",
                   help="also run each row's fast-path generation under torch.profiler and write its operator "
                        "and kernel tables (<row>.txt) and trace (<row>.json) here: where a step's device time goes")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = prepare_checkpoint(args.model, dtype=dtype)
    vocab = AutoConfig.from_pretrained(path).vocab_size
    prompt = torch.randint(3, min(1000, vocab), (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    max_context = args.prompt_len + max(args.new_tokens, args.slow_new_tokens, args.profile_tokens)
    rows = []
    loads = [("resident", "auto", [r for r in ("dense-only", "resident") if r in args.rows]),
             ("budget", args.budget, ["budget"] if "budget" in args.rows else [])]
    for _, budget, names in loads:
        if not names:
            continue
        start = time.perf_counter()
        model = moerun.load(path, policy=args.policy[0], vram_budget=budget, device=device, dtype=dtype,
                            max_context=max_context, compile_decode=args.compile, progress=False)
        print(f"loaded {path.name} at budget {budget} in {time.perf_counter() - start:.1f} s: "
              f"{model.moerun.memory()['device']['num_slots']} slots", flush=True)
        for name in names:
            if name != "budget":
                rows.append(_row(name, model, prompt, args, device, skip_routed=name == "dense-only"))
                continue
            for policy in args.policy:
                model.moerun.set_policy(policy)
                rows.append(_row(f"budget {budget} {policy}", model, prompt, args, device, skip_routed=False))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "model": args.model, "args": vars(args), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
