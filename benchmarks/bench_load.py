"""Load throughput of moerun.load from the page cache, and the host memory it peaks at.

Builds (once) a random-weight checkpoint with real shapes, reads it once so it is in the page
cache, then times ``moerun.load``: checkpoint bytes / wall seconds. Reports the process's peak
resident memory against its bound (experts + skeleton + 2 GB).

    python benchmarks/bench_load.py --preset qwen1.5-moe-a2.7b --layers 24 --out load.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from pathlib import Path

import torch

import moerun
from moerun.models.synthetic import build_checkpoint, synthetic_config


def _build(preset: str, overrides: dict, path: Path) -> None:
    build_checkpoint(synthetic_config(preset, **overrides), path, dtype=torch.bfloat16, max_shard_size="4GB",
                     device="cuda" if torch.cuda.is_available() else "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen1.5-moe-a2.7b")
    p.add_argument("--layers", type=int, default=None, help="num_hidden_layers override")
    p.add_argument("--dir", default="/tmp/moerun_bench_load", help="where the checkpoint is built")
    p.add_argument("--checkpoint", default=None,
                   help="time this existing checkpoint directory instead of building one")
    p.add_argument("--budget", default="auto")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args()

    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    path = Path(args.checkpoint or Path(args.dir) / f"{args.preset}-{args.layers or 'all'}")
    if args.checkpoint is None and not (path / "config.json").is_file():
        # Built in a child process so its memory does not count in this process's peak RSS.
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_build, args=(args.preset, overrides, path))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the checkpoint failed (exit code {child.exitcode})")
    files = sorted(path.glob("*.safetensors"))
    ckpt_bytes = sum(f.stat().st_size for f in files)
    for f in files:  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = moerun.load(path, vram_budget=args.budget, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = model.moerun.memory()
    bound = mem["host"]["pool"] + mem["device"]["skeleton"] + (2 << 30)
    result = {
        "preset": args.preset, "layers": args.layers, "checkpoint_bytes": ckpt_bytes,
        "load_seconds": round(seconds, 3), "load_gb_per_s": round(ckpt_bytes / seconds / 1e9, 3),
        "peak_rss_bytes": peak_rss_bytes, "rss_before_load_bytes": rss_before_kib * 1024,
        "host_bound_bytes": bound, "within_host_bound": peak_rss_bytes <= bound,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "memory": mem,
        "stages_seconds": {k: round(v, 3) for k, v in model.moerun.load_seconds.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
