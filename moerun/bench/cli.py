"""``python -m moerun.bench``: moerun against transformers and Fiddler-style baselines, in one run.

Builds (or reuses) the checkpoint, loads each system in turn on the same checkpoint, prompts and
VRAM budget, measures it (``measure``), compares its tokens with the reference, and prints the
table, writing JSON and, for a budget sweep, a PNG (``report``). moerun rows come per policy, budget
and expert format, each with the decode bound its bytes allow (``limits``).
"""
from __future__ import annotations

import argparse
import gc
import importlib.resources
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

import moerun
from moerun.bench import report
from moerun.bench.budget import Budget, format_bytes, parse_budget
from moerun.bench.limits import limit_of_moerun, prefill_bound_of_moerun
from moerun.bench.measure import PrefillPoint, dense_step_ms, measure, measure_prefill, token_match
from moerun.bench.models import BUILTIN_MODELS, DTYPES, inspect_checkpoint, prepare_checkpoint
from moerun.bench.profiling import profile_generation
from moerun.bench.systems import (
    BUDGET_FREE_SYSTEMS, REFERENCE_SYSTEMS, SYSTEMS, BenchSetup, SystemSkipped, load_system,
)

# transformers' experts kernel for the HF baselines: batched_mm is the fastest for decode on an H100.
PREFERRED_EXPERTS_IMPLEMENTATION = "batched_mm"


def bundled_policies() -> list[str]:
    """File names of the policies shipped in ``moerun.policies`` (``moerun.load`` finds them by name)."""
    try:
        root = importlib.resources.files("moerun.policies")
    except ModuleNotFoundError:
        return []
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".moe"))


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="python -m moerun.bench",
        description="Compare moerun with transformers and Fiddler-style offloading on one checkpoint, "
        "prompt set and VRAM budget. With no arguments: a built-in random-weight model "
        f"({'qwen1.5-moe-a2.7b shapes on this GPU' if cuda else 'tiny, since there is no GPU'}).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory or hub id (instead of a built-in model)")
    src.add_argument("--synthetic", choices=sorted(BUILTIN_MODELS),
                     help="built-in random-weight model (default: qwen1.5-moe-a2.7b with a GPU, tiny without)")
    p.add_argument("--budget", dest="budgets", action="append", metavar="SIZE",
                   help="VRAM budget for everything on the device: a size (10GiB), a share of the model (50%%), or "
                   "room for a share of the routed experts besides the rest (experts:50%%); repeat or use "
                   "--budgets for a sweep (default: 10GiB with a GPU, experts:50%% without)")
    p.add_argument("--budgets", dest="budget_list", nargs="+", metavar="SIZE", help="several budgets: a sweep")
    p.add_argument("--checkpoint-format", default=None, metavar="FORMAT",
                   help="the built-in model's experts as written to disk: float (in --dtype; the default, but for "
                   "gpt-oss, written in mxfp4 as published) or generated packed in a published layout: fp8-block128 "
                   "(the FP8 checkpoint layout), int4-g32/64/128 (GPTQ; int4 = int4-g128), mxfp4 (gpt-oss's); a 30 B "
                   "shape needs this to fit a 64 GB disk (one cached checkpoint per format)")
    p.add_argument("--expert-format", dest="expert_formats", nargs="+", default=["auto"], metavar="FORMAT",
                   help="moerun rows' expert format (moerun.load(expert_format=...)), one row per format: auto (the "
                   "checkpoint's own), float, fp8, fp8-block128, int8, int4 (= int4-g128), int4-g32, int4-g64, mxfp4; "
                   "a float checkpoint is quantized at load, a packed one runs as auto only (default: auto)")
    p.add_argument("--routing", choices=["model", "uniform"], default="model",
                   help="uniform: moerun rows draw every token's experts uniformly at random, in prefill and decode "
                   "(the UniformRouting override, on the fast decode path and transformers' layers: the worst case "
                   "for a cache; tokens are not the model's, and the baselines are skipped)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="systems to run")
    p.add_argument("--policies", nargs="+", metavar="POLICY",
                   help="moerun policies (bundled names or .moe paths; default: every bundled policy)")
    p.add_argument("--prompt-len", dest="prompt_lens", type=int, nargs="+", metavar="N",
                   help="prompt tokens per sequence (default 32; 16 on CPU); several (32 512 2048): the first is the "
                   "table's, and every system also reports TTFT and prefill tok/s at each length, moerun rows beside "
                   "the streaming bound of a uniformly routed prompt (moerun.bench.limits) and hf-resident's TTFT")
    p.add_argument("--new-tokens", type=int, help="generated tokens per sequence (default 32; 8 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="sequences generated together (default 1)")
    p.add_argument("--repeats", type=int, help="timed generations per system (default 3; 2 on CPU)")
    p.add_argument("--time-limit-s", type=float, default=60.0,
                   help="stop repeating a system once its timed repeats took this long (default 60)")
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="directory for JSON and PNG")
    p.add_argument("--cache-dir", type=Path, help="where built-in checkpoints are cached")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="compute device (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights dtype (default: bfloat16 on a GPU; float32 on CPU, where bf16 kernels are inexact)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and built-in weights")
    p.add_argument("--sample", action="store_true",
                   help="sample the full distribution (seeded, the same for every system) instead of greedy "
                   "decoding: a random-weight model decoded greedily repeats itself and reuses the same experts; "
                   "sampled tokens vary, though a random-weight model still routes unevenly (for uniform "
                   "routing see --routing uniform)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="moerun rows without torch.compile of the fast decode path (on CUDA it is on: the "
                   "warm-up generation then compiles for tens of seconds, untimed)")
    p.add_argument("--profile", action="store_true",
                   help="after each system's timed repeats, profile one more generation (torch.profiler "
                   "table + trace in --out; not counted in the table)")
    return p


# Defaults of (prompt_len, new_tokens, repeats): smaller on CPU, where the run is a tiny model that
# demonstrates the comparison (and the README's command stays short).
_GPU_DEFAULTS = {"prompt_lens": [32], "new_tokens": 32, "repeats": 3}
_CPU_DEFAULTS = {"prompt_lens": [16], "new_tokens": 8, "repeats": 2}


def _check_args(args) -> None:
    defaults = _CPU_DEFAULTS if args.device == "cpu" else _GPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.prompt_lens) < 1:
        raise SystemExit(f"--prompt-len must be at least 1, got {min(args.prompt_lens)}")
    args.prompt_lens = list(dict.fromkeys(args.prompt_lens))  # each length once, in the order given
    args.prompt_len = args.prompt_lens[0]                     # the main table's
    for name in ("new_tokens", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device; use --device cpu")


def _experts_implementation() -> str:
    """batched_mm where this transformers has it, else transformers' own default."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return "default"
    return PREFERRED_EXPERTS_IMPLEMENTATION if PREFERRED_EXPERTS_IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS else "default"


def _prompts(seed: int, count: int, batch: int, length: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=gen) for _ in range(count)]


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _plan(args, budgets: list[Budget], policies: list[str]) -> list[tuple[str, Budget | None, str | None, str]]:
    """(system, budget, policy, expert format) runs in table order; reference systems first."""
    runs = []
    for system in args.systems:
        if system in BUDGET_FREE_SYSTEMS:
            runs.append((system, None, None, "auto"))
        elif system == "moerun":
            runs += [(system, b, pol, fmt) for b in budgets for pol in (policies or [None])
                     for fmt in args.expert_formats]
        else:
            runs += [(system, b, None, "auto") for b in budgets]
    order = {name: i for i, name in enumerate(SYSTEMS)}
    return sorted(runs, key=lambda run: order[run[0]])


def _checkpoint(args, dtype: torch.dtype, log) -> tuple[Path | str, str]:
    """(checkpoint path or hub id, name for tables) of --model or the built-in model."""
    if args.model:
        if args.checkpoint_format is not None:
            raise SystemExit("--checkpoint-format applies to built-in models; a --model checkpoint is read as it is")
        return (Path(args.model) if Path(args.model).exists() else args.model), str(args.model)
    name = args.synthetic or ("qwen1.5-moe-a2.7b" if torch.cuda.is_available() and args.device != "cpu" else "tiny")
    try:
        path = prepare_checkpoint(name, dtype=dtype, cache_dir=args.cache_dir, seed=args.seed, log=log,
                                  expert_format=args.checkpoint_format)
    except ValueError as exc:
        raise SystemExit(f"--checkpoint-format: {exc}") from exc
    fmt = args.checkpoint_format or BUILTIN_MODELS[name].checkpoint_format
    return path, name if fmt == "float" else f"{name}-{fmt}"


def _run_system(setup: BenchSetup, system: str, budget_bytes: int, policy: str | None, expert_format: str,
                row: report.SystemResult, prompts: list[torch.Tensor], warmup: torch.Tensor, args, log,
                dense_ms: dict, prefill_prompts: dict[int, list[torch.Tensor]]) -> None:
    """Loads and measures one system into ``row`` (status, notes, numbers, and for moerun its format,
    slots and decode bound); profiles it if asked. ``dense_ms`` keeps the dense part's step time, measured
    on the first moerun row (the same for every row: the dense part does not depend on the experts)."""
    from tqdm.auto import tqdm

    start_s = time.perf_counter()
    loaded = load_system(system, setup, budget_bytes, policy, expert_format)
    row.load_s = time.perf_counter() - start_s
    row.system, row.notes = loaded.label, loaded.notes
    if loaded.expert_format is not None:
        row.expert_format, row.slot_bytes, row.num_slots = loaded.expert_format, loaded.slot_bytes, loaded.num_slots
    try:
        with tqdm(total=len(prompts), desc=f"  {loaded.label}", unit="rep", leave=False, file=sys.stderr) as reps:
            row.measurement = measure(loaded, prompts, warmup, args.new_tokens, setup.device, args.time_limit_s, reps,
                                      sample_seed=args.seed if args.sample else None)
        if system == "moerun":
            if "ms" not in dense_ms:
                dense_ms["ms"] = dense_step_ms(loaded.model, warmup.to(setup.device), args.new_tokens, setup.device)
            row.limit = limit_of_moerun(loaded.model.moerun, setup.info, dense_ms["ms"], setup.device.type == "cuda")
        row.prefill = _prefill_points(loaded, system, row.measurement, prefill_prompts, setup, args)
        if args.profile:
            stem = args.out / re.sub(r"[^A-Za-z0-9._-]", "_", f"profile-{loaded.label}-{row.budget}")
            for path in profile_generation(loaded.model, prompts[0], args.new_tokens, setup.device, stem):
                log(f"wrote {path}")
    finally:
        loaded.close()


def _prefill_points(loaded, system: str, main, prefill_prompts: dict[int, list[torch.Tensor]], setup: BenchSetup,
                    args) -> list[PrefillPoint]:
    """TTFT at each prompt length (the first from the main measurement), moerun's with its streaming
    bound at that many tokens (the cost model's rates after the run)."""
    points = []
    for length, prompts in prefill_prompts.items():
        if length == args.prompt_len:
            point = PrefillPoint(length, main.ttft_ms, main.prefill_tok_s, main.prefill_counters)
        else:
            point = measure_prefill(loaded, prompts, setup.device, args.time_limit_s)
        if system == "moerun":
            point.bound = prefill_bound_of_moerun(loaded.model.moerun, setup.info, args.batch * length,
                                                  setup.device.type == "cuda")
        points.append(point)
    return points


def _add_reference_ttft(results: list[report.SystemResult]) -> None:
    """hf-resident's median TTFT at each length, beside every row's point at that length."""
    resident = next((r for r in results if r.system == "hf-resident" and r.prefill), None)
    if resident is None:
        return
    ttft = {p.prompt_len: p.ttft_ms.median for p in resident.prefill if p.ttft_ms}
    for r in results:
        for p in r.prefill:
            p.reference_ttft_ms = ttft.get(p.prompt_len)


def run_bench(argv: list[str] | None = None) -> list[report.SystemResult]:
    """Runs the bench as ``python -m moerun.bench ARGV`` would; returns the rows."""
    from tqdm.auto import tqdm

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    args = build_parser().parse_args(argv)
    _check_args(args)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    budget_texts = (args.budgets or []) + (args.budget_list or []) or (["10GiB"] if on_gpu else ["experts:50%"])
    try:
        budgets = [parse_budget(text) for text in budget_texts]
    except ValueError as exc:
        raise SystemExit(f"--budget: {exc}") from exc
    policies = args.policies if args.policies is not None else bundled_policies()

    checkpoint, model_name = _checkpoint(args, dtype, log)
    info = inspect_checkpoint(checkpoint, dtype)
    seq_len = max(args.prompt_lens) + args.new_tokens
    # moerun's plan at an unlimited budget: what everything but the expert slots needs.
    probe = moerun.memory_plan(str(checkpoint), vram_budget=1 << 50, device=device, dtype=dtype,
                               max_context=seq_len, max_batch=args.batch)
    routed_slot_bytes = info.num_moe_layers * info.num_experts * probe.slot_bytes
    prompts = _prompts(args.seed + 1, args.repeats, args.batch, args.prompt_len, info.vocab_size)
    warmup = _prompts(args.seed + 1000, 1, args.batch, args.prompt_len, info.vocab_size)[0]
    calibration = _prompts(args.seed + 2000, 1, args.batch, args.prompt_len, info.vocab_size)[0]
    prefill_prompts = {length: _prompts(args.seed + 1, args.repeats, args.batch, length, info.vocab_size)
                       for length in args.prompt_lens}
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    header = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m moerun.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "device": device_name,
        "model": {"name": model_name, "path": str(checkpoint), "type": info.model_type, "dtype": str(dtype),
                  "total_bytes": info.total_bytes, "dense_bytes": info.dense_bytes,
                  "expert_bytes": info.expert_bytes, "moe_layers": info.num_moe_layers,
                  "experts": info.num_experts, "top_k": info.top_k, "expert_format": info.expert_format},
        "settings": {"batch": args.batch, "prompt_len": args.prompt_len, "prompt_lens": args.prompt_lens, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "time_limit_s": args.time_limit_s,
                     "decoding": "sampled" if args.sample else "greedy", "routing": args.routing,
                     "expert_formats": args.expert_formats,
                     "experts_implementation": _experts_implementation(), "fixed_bytes": probe.fixed_bytes},
    }
    print(f"moerun bench on {device_name}: {model_name} ({info.model_type}, {format_bytes(info.total_bytes)}, "
          f"dense {format_bytes(info.dense_bytes)}, {info.num_moe_layers} MoE layers x {info.num_experts} experts "
          f"top-{info.top_k}, {format_bytes(info.expert_bytes)}/expert in {info.expert_format}); batch {args.batch}, "
          f"prompt {' / '.join(map(str, args.prompt_lens))}, {args.new_tokens} new tokens ({'sampled' if args.sample else 'greedy'}, "
          f"{args.routing} routing), {args.repeats} repeats", flush=True)

    results: list[report.SystemResult] = []
    reference: list | None = None
    with tempfile.TemporaryDirectory(prefix="moerun-bench-") as scratch:
        setup = BenchSetup(
            checkpoint=checkpoint, info=info, device=device, dtype=dtype,
            experts_implementation=header["settings"]["experts_implementation"], fixed_bytes=probe.fixed_bytes,
            calibration_ids=calibration, calibration_new_tokens=args.new_tokens, scratch_dir=Path(scratch),
            max_context=seq_len, max_batch=args.batch, compile_decode=args.compile and device.type == "cuda",
            routing=args.routing,
        )
        dense_ms: dict = {}
        bar = tqdm(_plan(args, budgets, policies), desc="systems", unit="run", file=sys.stderr)
        for system, budget, policy, expert_format in bar:
            budget_bytes = budget.resolve(model_bytes=info.total_bytes, fixed_bytes=probe.fixed_bytes,
                                          routed_bytes=routed_slot_bytes) if budget else None
            label = f"{system}:{Path(policy).stem}" if policy else system
            bar.set_postfix_str(f"{label} {expert_format} @ {budget.text if budget else '-'}")
            row = report.SystemResult(label, budget.text if budget else "-", budget_bytes,
                                      expert_bytes=info.expert_bytes, expert_format=info.expert_format)
            results.append(row)
            if system == "moerun" and policy is None:
                row.status = "skipped: no policy given and none bundled"
                continue
            _free_device_memory(device)
            try:
                _run_system(setup, system, budget_bytes or info.total_bytes, policy, expert_format, row, prompts,
                            warmup, args, log, dense_ms, prefill_prompts)
            except SystemSkipped as exc:
                row.status = f"skipped: {exc}"
                continue
            except Exception as exc:  # one broken system must not cost the others' numbers
                row.status = f"failed: {type(exc).__name__}: {exc}"
                log(f"{label} failed:\n{traceback.format_exc()}")
                continue
            if reference is None and system in REFERENCE_SYSTEMS:
                reference = row.measurement.tokens
                row.notes += " [reference]"
            if reference is not None and args.routing == "model":
                row.match = token_match(row.measurement.tokens, reference)

    _add_reference_ttft(results)
    print(report.format_table(results))
    print(report.legend(on_gpu))
    prefill_table = report.format_prefill_table(results) if len(args.prompt_lens) > 1 else None
    if prefill_table:
        print()
        print(prefill_table)
        print(report.PREFILL_LEGEND)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path = args.out / f"bench-{model_name.replace('/', '_')}-{stamp}.json"
    report.write_json(json_path, header, results)
    print(f"wrote {json_path}")
    png_path = json_path.with_suffix(".png")
    if report.plot_budget_sweep(png_path, results, f"{model_name} on {device_name}, batch {args.batch}"):
        print(f"wrote {png_path}")
    return results


def main(argv: list[str] | None = None) -> int:
    run_bench(argv)
    return 0
