"""Held-out perplexity of the trained small MoE LMs with each expert format's experts.

For each model of ``benchmarks/train_moe.py``: the checkpoint ``--ckpt-dir/<name>`` (trained there
first with train_moe's own functions when it is missing), then

1. plain transformers on that checkpoint: the reference row;
2. for each expert format of ``moerun.native.EXPERT_FORMATS`` the same checkpoint loaded with
   ``moerun.load(expert_format=fmt)`` at a VRAM budget that keeps every expert resident, so only the
   experts' format differs between rows (dense weights, compute dtype and kernels path stay);
3. held-out perplexity per text kind on the same tokens (``train_moe.perplexity``: teacher-forced,
   non-overlapping windows of ``--seq-len``), and each format's relative change against moerun's
   ``float`` row. The targets: fp8 / int8 within 1 %, int4 g128 within 5 % (a row meets its
   target when no kind's perplexity rises by more).

The numbers are reported as measured; the JSON (``--out``) holds every row, the device, versions and
the training record. ``--tiny`` is a CPU smoke run (toy shapes whose sizes every format's groups
divide, a few steps); the corpus is ``benchmarks/moe_corpus.py``'s.

    python benchmarks/bench_quality.py --corpus .dev/traces/corpus --ckpt-dir CKPT --out quality.json \\
        --steps mixtral=700,olmoe=400
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

if importlib.util.find_spec("moerun") is None:  # not installed: moerun from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_moe, beside this file

import train_moe  # noqa: E402
from train_moe import KINDS, MODELS  # noqa: E402

# The largest rise of held-out perplexity over the float experts' that each format may cost.
TARGETS = {"fp8": 0.01, "fp8-block128": 0.01, "int8": 0.01, "int4-g128": 0.05}
# --tiny: every format's group (at most 128 inputs) divides the hidden and expert intermediate sizes.
TINY_SHAPE = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)
# Run-size options' defaults, and --tiny's.
DEFAULTS = dict(steps=None, batch=64, seq_len=512, ppl_tokens=65536, windows_per_forward=16)
TINY_DEFAULTS = dict(steps="3", batch=4, seq_len=64, ppl_tokens=512, windows_per_forward=4)


def parse_steps(text: str | None, models: list[str]) -> dict[str, int | None]:
    """``"700"`` (every model) or ``"mixtral=700,olmoe=400"`` -> steps per model (None: sized from seconds)."""
    if text is None:
        return {m: None for m in models}
    if "=" not in text:
        return {m: int(text) for m in models}
    steps = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    missing = [m for m in models if m not in steps]
    if missing:
        raise SystemExit(f"--steps {text!r} gives no step count for {', '.join(missing)}; name every model of --models")
    return {m: steps[m] for m in models}


def resident_budget(path: Path, fmt: str, device: torch.device, dtype: torch.dtype | None, seq_len: int,
                    windows: int) -> int:
    """Device bytes that hold the plan's fixed part and every routed expert in ``fmt``."""
    import moerun
    from moerun.models import adapter_for
    from transformers import AutoConfig

    adapter = adapter_for(AutoConfig.from_pretrained(path))
    plan = moerun.memory_plan(path, vram_budget=1 << 40, device=device, dtype=dtype, expert_format=fmt,
                              max_context=seq_len, max_batch=windows)
    return plan.fixed_bytes + len(adapter.moe_layers()) * adapter.num_experts * plan.slot_bytes


def measure_format(path: Path, fmt: str, heldout: dict[str, np.ndarray], *, device: torch.device,
                   dtype: torch.dtype | None, seq_len: int, ppl_tokens: int, windows: int) -> dict:
    """Held-out perplexity per kind of ``path`` loaded by moerun with ``fmt`` experts, all resident."""
    import moerun

    budget = resident_budget(path, fmt, device, dtype, seq_len, windows)
    t0 = time.perf_counter()
    model = moerun.load(path, vram_budget=budget, device=device, dtype=dtype, expert_format=fmt, max_context=seq_len,
                        max_batch=windows, fast_decode=False, progress=False)
    load_s = time.perf_counter() - t0
    memory = model.moerun.memory()
    if memory["device"]["num_slots"] < memory["host"]["experts"]:
        raise RuntimeError(f"{fmt}: the budget {budget} holds {memory['device']['num_slots']} of "
                           f"{memory['host']['experts']} experts; every expert must be resident")
    t0 = time.perf_counter()
    ppl = {k: train_moe.perplexity(model, heldout[k], seq_len, device, ppl_tokens, windows) for k in KINDS}
    eval_s = time.perf_counter() - t0
    stats = model.moerun.stats()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(slot_bytes=memory["experts"]["slot_bytes"], weight_bits=memory["experts"]["weight_bits"],
                budget_bytes=budget, perplexity=ppl, load_s=load_s, eval_s=eval_s,
                hit_rate=stats["hit_rate"], misses=stats["misses"])


def reference_perplexity(path: Path, heldout: dict[str, np.ndarray], *, device: torch.device,
                         dtype: torch.dtype | None, seq_len: int, ppl_tokens: int, windows: int) -> dict[str, float]:
    """Plain transformers on the checkpoint, in ``dtype`` (None: the checkpoint's)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device)
    ppl = {k: train_moe.perplexity(model, heldout[k], seq_len, device, ppl_tokens, windows) for k in KINDS}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ppl


def judge(rows: dict[str, dict]) -> None:
    """Adds to each format's row its relative change per kind against ``float``, the worst kind, and
    whether the issue's target is met (None: no target for this format)."""
    base = rows["float"]["perplexity"]
    for fmt, row in rows.items():
        if "error" in row:
            continue
        row["relative_change"] = {k: row["perplexity"][k] / base[k] - 1.0 for k in KINDS}
        row["worst_change"] = max(row["relative_change"].values())
        row["target"] = TARGETS.get(fmt)
        row["target_met"] = None if row["target"] is None else row["worst_change"] <= row["target"]


def table(name: str, result: dict) -> str:
    rows, ref = result["formats"], result["transformers_perplexity"]
    lines = [f"{name}: {result['checkpoint']}; held-out tokens "
             + ", ".join(f"{k} {n}" for k, n in result["tokens_per_kind"].items()),
             "| format | bytes/expert | bits/weight | " + " | ".join(f"ppl {k}" for k in KINDS) + " | "
             + " | ".join(f"change {k}" for k in KINDS) + " | target | met |",
             "|---" * (5 + 2 * len(KINDS)) + "|"]
    float_ppl = rows["float"]["perplexity"] if "float" in rows else None
    ref_change = [f"{(ref[k] / float_ppl[k] - 1) * 100:+.3f} %" if float_ppl else "" for k in KINDS]
    lines.append("| transformers (reference) | | | " + " | ".join(f"{ref[k]:.4f}" for k in KINDS) + " | "
                 + " | ".join(ref_change) + " | | |")
    for fmt, row in rows.items():
        if "error" in row:
            lines.append(f"| {fmt} | failed: {row['error'][:200]} |")
            continue
        target = "" if row["target"] is None else f"<= {row['target'] * 100:g} %"
        met = "" if row["target_met"] is None else ("met" if row["target_met"] else "NOT met")
        lines.append(f"| {fmt} | {row['slot_bytes']} | {row['weight_bits']} | "
                     + " | ".join(f"{row['perplexity'][k]:.4f}" for k in KINDS) + " | "
                     + " | ".join(f"{row['relative_change'][k] * 100:+.3f} %" for k in KINDS)
                     + f" | {target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from moerun.native import EXPERT_FORMATS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="directory written by benchmarks/moe_corpus.py")
    ap.add_argument("--ckpt-dir", required=True,
                    help="checkpoints <dir>/<model> (train_moe.py's); a missing one is trained and written here")
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--formats", nargs="+", default=list(EXPERT_FORMATS), choices=list(EXPERT_FORMATS),
                    help="expert formats (float is always measured: the other rows are judged against it)")
    ap.add_argument("--retrain", action="store_true", help="train even where a checkpoint exists")
    ap.add_argument("--steps", help="training steps: N, or per model 'mixtral=700,olmoe=400' "
                                    "(default: sized from --train-seconds)")
    ap.add_argument("--train-seconds", type=float, default=60.0, help="per model, when --steps is not given")
    ap.add_argument("--batch", type=int, help=f"training batch (default {DEFAULTS['batch']})")
    ap.add_argument("--seq-len", type=int, help=f"window of training and evaluation (default {DEFAULTS['seq_len']})")
    ap.add_argument("--ppl-tokens", type=int, help=f"held-out tokens per kind (default {DEFAULTS['ppl_tokens']})")
    ap.add_argument("--windows-per-forward", type=int,
                    help=f"windows of --seq-len in one forward (default {DEFAULTS['windows_per_forward']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="toy shapes, few steps: a CPU smoke run in seconds "
                                                        f"(defaults {TINY_DEFAULTS})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("checkpoint", "bfloat16", "float16", "float32"), default="checkpoint",
                    help="compute dtype of every row (the checkpoints are bf16)")
    args = ap.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    formats = ["float"] + [f for f in args.formats if f != "float"]
    unknown = sorted(set(TARGETS) - set(EXPERT_FORMATS))
    if unknown:
        raise SystemExit(f"TARGETS names formats moerun does not have: {unknown} (moerun.native.EXPERT_FORMATS)")
    device = torch.device(args.device)
    corpus_dir, ckpt_dir, out = Path(args.corpus), Path(args.ckpt_dir), Path(args.out)
    for f in ("corpus.npz", "corpus.json", "tokenizer.json"):
        if not (corpus_dir / f).is_file():
            raise SystemExit(f"{corpus_dir / f} is missing: build the corpus with benchmarks/moe_corpus.py --out {corpus_dir}")
    steps = parse_steps(args.steps, args.models)
    info = json.loads((corpus_dir / "corpus.json").read_text())
    with np.load(corpus_dir / "corpus.npz") as z:
        corpus = {k: z[k] for k in z.files}
    heldout = {k: corpus[f"heldout_{k}"] for k in KINDS}

    import transformers

    results = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:] if argv is None else argv,
                   torch=torch.__version__, transformers=transformers.__version__, corpus=info, targets=TARGETS,
                   models={})
    print(f"device {results['device']}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    for name in args.models:
        path = ckpt_dir / name
        trained = None
        if args.retrain or not (path / "config.json").is_file():
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True  # as train_moe.py trains
            model, trained = train_moe.train_model(
                name, corpus, info, seq_len=args.seq_len, batch=args.batch, steps=steps[name],
                train_seconds=args.train_seconds, seed=args.seed, tiny=args.tiny, device=device, log=print,
                shape=TINY_SHAPE if args.tiny else None)
            train_moe.save_checkpoint(model, path, corpus_dir / "tokenizer.json")
            del model
        else:
            print(f"{name}: checkpoint {path} (not retrained)", flush=True)
        measure = dict(dtype=None if args.dtype == "checkpoint" else getattr(torch, args.dtype), seq_len=args.seq_len,
                       ppl_tokens=args.ppl_tokens, windows=args.windows_per_forward)
        tokens = {k: min(heldout[k].size - 1, args.ppl_tokens) // args.seq_len * args.seq_len for k in KINDS}
        t0 = time.perf_counter()
        ref = reference_perplexity(path, heldout, device=device, **measure)
        print(f"  transformers: {', '.join(f'{k} {v:.4f}' for k, v in ref.items())} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        rows = {}
        for fmt in formats:
            try:
                rows[fmt] = measure_format(path, fmt, heldout, device=device, **measure)
            except Exception as exc:  # noqa: BLE001 - one format's failure is a result; the other rows still count
                if fmt == "float":
                    raise  # every other row is judged against it
                rows[fmt] = dict(error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
                print(f"  {fmt}: FAILED {rows[fmt]['error']}", flush=True)
                continue
            print(f"  {fmt}: {', '.join(f'{k} {v:.4f}' for k, v in rows[fmt]['perplexity'].items())} "
                  f"(load {rows[fmt]['load_s']:.1f} s, eval {rows[fmt]['eval_s']:.1f} s)", flush=True)
        judge(rows)
        config = json.loads((path / "config.json").read_text())
        results["models"][name] = dict(checkpoint=str(path), config=config, training=trained, tokens_per_kind=tokens,
                                       transformers_perplexity=ref, formats=rows)
        print(table(name, results["models"][name]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
