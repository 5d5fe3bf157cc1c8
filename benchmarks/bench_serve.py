"""Serving: N concurrent streaming clients against `moerun serve`'s engine and API, beside batch-N
``generate()`` on the same loaded model, in one run.

The model (a built-in bench model, ``python -m moerun.bench --help``, or a checkpoint directory) is
loaded once with ``max_batch = --clients``. Rows:

- ``generate``: ``model.generate()`` of a batch of ``--clients`` prompts, ``--new-tokens`` each;
  aggregate tok/s over the whole call (prefill included, as a client's view of the server is);
- ``serve burst``: the server (uvicorn on localhost, in this process; the engine on its own thread)
  with ``--clients`` clients (asyncio + httpx, in a process of their own so that parsing the streams
  does not take the server's interpreter lock) that each stream ``--requests`` completions one after
  the other, all starting at once;
- ``serve staggered``: the same clients starting ``--stagger-s`` apart (default: one request's
  generate() time spread over the clients), so requests join and leave a running batch.

Each serve row gives aggregate tok/s (tokens / first request sent -> last token), its ratio to the
generate row, time to first token and time between tokens (p50 and p99 over every request and
token). Prompts are token ids (``--prompt-tokens`` random ids), generation ignores end-of-sequence
(every request makes ``--new-tokens``); greedy unless ``--sample`` (seeded sampling in both). A
built-in model has no tokenizer: a word-level one ("t0".."t{V-1}") is written beside it, in a
directory that links the checkpoint's files. Before anything is timed, a warm-up runs each path
once with every batch size a serve row can meet (graphs captured, kernels compiled).

    python benchmarks/bench_serve.py                  # CPU smoke: tiny model, 4 clients
    MOERUN_CACHE=/tmp/mc python benchmarks/bench_serve.py --model qwen1.5-moe-a2.7b --vram-budget 10GiB \\
        --clients 8 --out bench_results/serve_h100.json
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import torch

import moerun
from moerun.bench.models import BUILTIN_MODELS, DTYPES, default_cache_dir, prepare_checkpoint


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _with_tokenizer(path: Path, cache_dir: Path) -> Path:
    """``path`` if it has a tokenizer, else a directory linking its files plus a word-level tokenizer."""
    from moerun.checkpoint import read_tokenizer

    if read_tokenizer(path)[0] is not None:
        return path
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    served = cache_dir / "serve" / f"{path.name}-{key}"
    if (served / "tokenizer.json").is_file():
        return served
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    config = AutoConfig.from_pretrained(path)
    words = [f"t{i}" for i in range(config.vocab_size)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # words joined by spaces: every token shows as text
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=words[eos] if eos is not None else None)
    served.mkdir(parents=True, exist_ok=True)
    for item in path.iterdir():
        link = served / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    tokenizer.save_pretrained(served)
    return served


def _generate_row(model, prompts: torch.Tensor, new_tokens: int, sample: bool, device: torch.device) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample,
                  attention_mask=torch.ones_like(prompts))
    if sample:
        kwargs.update(temperature=1.0, top_k=0)
        torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model.generate(prompts, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - prompts.shape[1]) * prompts.shape[0]
    return {"row": "generate", "requests": prompts.shape[0], "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


class _Server:
    """uvicorn on a free localhost port, on a thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start (see its log above)")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


async def _stream_one(client, body: dict) -> tuple[float, list[float]]:
    """Send one streaming completion; (sent at, arrival time of each token's chunk)."""
    sent, stamps = time.perf_counter(), []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"the stream failed: {chunk['error']['message']}")
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    return sent, stamps


async def _drive(url: str, bodies: list[list[dict]], starts_s: list[float]) -> list[tuple[float, list[float]]]:
    """Client i waits ``starts_s[i]``, then streams its requests ``bodies[i]`` one after another."""
    import httpx

    async def client_run(client, own: list[dict], delay: float):
        await asyncio.sleep(delay)
        return [await _stream_one(client, body) for body in own]

    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        per_client = await asyncio.gather(*(client_run(client, own, d) for own, d in zip(bodies, starts_s)))
    return [r for results in per_client for r in results]


def _drive_here(url: str, bodies: list[list[dict]], starts_s: list[float]) -> list[tuple[float, list[float]]]:
    return asyncio.run(_drive(url, bodies, starts_s))


def _drive_elsewhere(url: str, bodies: list[list[dict]], starts_s: list[float]) -> list[tuple[float, list[float]]]:
    """:func:`_drive` in a client process (its time stamps are read there, on the same monotonic clock)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_drive_here, (url, bodies, starts_s))


def _serve_row(name: str, results: list[tuple[float, list[float]]], new_tokens: int, generate_tok_s: float) -> dict:
    first_sent = min(sent for sent, _ in results)
    last_token = max(stamps[-1] for _, stamps in results if stamps)
    tokens = sum(len(stamps) for _, stamps in results)
    ttft = [stamps[0] - sent for sent, stamps in results if stamps]
    tbt = [b - a for _, stamps in results for a, b in zip(stamps, stamps[1:])]
    wall = last_token - first_sent
    row = {"row": name, "requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
           "vs_generate": tokens / wall / generate_tok_s,
           "ttft_p50_ms": 1e3 * _percentile(ttft, 50), "ttft_p99_ms": 1e3 * _percentile(ttft, 99),
           "tbt_p50_ms": 1e3 * _percentile(tbt, 50), "tbt_p99_ms": 1e3 * _percentile(tbt, 99)}
    row["tbt_p99_over_p50"] = row["tbt_p99_ms"] / row["tbt_p50_ms"] if row["tbt_p50_ms"] else None
    short = [len(stamps) for _, stamps in results if len(stamps) != new_tokens]
    if short:
        print(f"warning: {len(short)} request(s) streamed another number of text chunks than tokens "
              f"({short[:4]}...): tok/s counts chunks", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen1.5-moe-a2.7b" if cuda else "tiny",
                   help=f"a built-in model ({', '.join(BUILTIN_MODELS)}) or a checkpoint directory")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16" if cuda else "float32",
                   help="built-in models: the dtype they are built and loaded in")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: CUDA when available)")
    p.add_argument("--vram-budget", default="10GiB" if cuda else "auto")
    p.add_argument("--policy", default="balanced.moe")
    p.add_argument("--clients", type=int, default=8 if cuda else 4, help="concurrent clients = max_batch")
    p.add_argument("--requests", type=int, default=2, help="completions each client streams, one after another")
    p.add_argument("--prompt-tokens", type=int, default=64 if cuda else 16)
    p.add_argument("--new-tokens", type=int, default=128 if cuda else 24)
    p.add_argument("--arrivals", choices=("burst", "staggered", "both"), default="both")
    p.add_argument("--stagger-s", type=float, default=None,
                   help="staggered: seconds between client starts (default: a request's generate() time / clients)")
    p.add_argument("--max-prefill-tokens", type=int, default=None, help="the engine's (default: its own)")
    p.add_argument("--sample", action="store_true", help="seeded sampling (temperature 1) instead of greedy")
    p.add_argument("--compile", action="store_true", help="load with compile_decode=True")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    from moerun.serve.app import create_app
    from moerun.serve.batching import BatchingEngine

    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    cache_dir = default_cache_dir()
    if args.model in BUILTIN_MODELS:
        path = prepare_checkpoint(args.model, dtype=DTYPES[args.dtype], cache_dir=cache_dir)
    else:
        path = Path(args.model)
    path = _with_tokenizer(path, cache_dir)
    max_context = args.prompt_tokens + args.new_tokens + 8
    model = moerun.load(path, policy=args.policy, vram_budget=args.vram_budget, device=device,
                        max_context=max_context, max_batch=args.clients, compile_decode=args.compile,
                        progress=False)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.clients, args.prompt_tokens), generator=g)  # [N, P]
    body_base = {"model": "bench", "max_tokens": args.new_tokens, "ignore_eos": True, "stream": True,
                 "temperature": 1.0 if args.sample else 0.0}
    if args.sample:
        body_base["seed"] = 0

    # Warm-up of generate (graphs of batch N), then its timed row.
    _generate_row(model, prompts.to(device), 8, args.sample, device)
    gen = _generate_row(model, prompts.to(device), args.new_tokens, args.sample, device)
    print(f"generate: {gen['tok_s']:.1f} tok/s ({gen['requests']} x {args.new_tokens} tokens in {gen['wall_s']:.2f} s)")

    engine_kw = {} if args.max_prefill_tokens is None else {"max_prefill_tokens": args.max_prefill_tokens}
    engine = BatchingEngine(model, **engine_kw)
    server = _Server(create_app(engine, model.moerun.tokenizer, model_name="bench", runtime_stats=model.moerun.stats))
    rows = [gen]
    try:
        # Warm-up: requests of 2, 4, ... tokens leave one by one, so every batch size 1..N meets its graphs.
        warm = [[{**body_base, "prompt": prompts[i].tolist(), "max_tokens": 2 + 2 * i}] for i in range(args.clients)]
        _drive_elsewhere(server.url, warm, [0.0] * args.clients)
        modes = ["burst", "staggered"] if args.arrivals == "both" else [args.arrivals]
        for mode in modes:
            stagger = args.stagger_s if args.stagger_s is not None else gen["wall_s"] / args.clients
            starts = [i * stagger if mode == "staggered" else 0.0 for i in range(args.clients)]
            bodies = [[{**body_base, "prompt": prompts[(i + r) % args.clients].tolist()} for r in range(args.requests)]
                      for i in range(args.clients)]
            before = model.moerun.stats()
            results = _drive_elsewhere(server.url, bodies, starts)
            after = model.moerun.stats()
            row = _serve_row(f"serve {mode}", results, args.new_tokens, gen["tok_s"])
            accesses = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
            row["hit_rate"] = (after["hits"] - before["hits"]) / accesses if accesses else None
            if mode == "staggered":
                row["stagger_s"] = stagger
            rows.append(row)
            print(f"{row['row']}: {row['tok_s']:.1f} tok/s ({100 * row['vs_generate']:.0f}% of generate), "
                  f"TTFT p50 {row['ttft_p50_ms']:.1f} ms p99 {row['ttft_p99_ms']:.1f} ms, "
                  f"TBT p50 {row['tbt_p50_ms']:.2f} ms p99 {row['tbt_p99_ms']:.2f} ms "
                  f"(p99/p50 {row['tbt_p99_over_p50']:.2f})")
        engine_stats = engine.stats()
    finally:
        server.stop()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": str(args.model), "dtype": args.dtype, "vram_budget": args.vram_budget, "policy": args.policy,
            "clients": args.clients, "requests_per_client": args.requests, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "sample": args.sample, "compile": args.compile,
            "decode_path": engine_stats["decode_path"], "max_prefill_tokens": engine_stats["max_prefill_tokens"],
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
