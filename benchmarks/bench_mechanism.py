"""Microbenchmarks of the native mechanism (moerun._C): fetch throughput, CPU executor (per ISA),
host tier (the pool as a cache in front of the files), overlap, memory, and the host work of one MoE
layer step.

    python benchmarks/bench_mechanism.py [--json out.json] [--small]
    python benchmarks/bench_mechanism.py --sections host_step   # the host part of a decode layer step
    python benchmarks/bench_mechanism.py --sections cpu --formats float fp8 int8 int4-g128 mxfp4  # per format

Shapes default to one Qwen1.5-MoE-A2.7B expert (H=2048, I=1408, bf16: 17.3 MB). --small runs tiny shapes
on any machine (a smoke run; its numbers mean nothing). Results go in benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from moerun.native import (SLOT_PARTS, CpuExecutor, ExpertArena, HostPool, TransferEngine, build_info, encode_expert,
                           slot_elems, slot_layout, slot_views)
from moerun.policy import compile_policy
from moerun.policy_engine import CostModel, PolicyEngine
from moerun.runtime.offload import HostStep, OffloadRuntime
from moerun.trace.replay import REFERENCE_EXPERT


def expert_bytes_read(layout) -> int:
    """The bytes of one expert a job reads from its slot in ``layout``: every part (weights, scales, zero
    points, biases), the slot's padding left out."""
    return sum(getattr(layout, f"{part}_bytes") for part in SLOT_PARTS)


def median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def make_pool(num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> HostPool:
    pool = HostPool(1, num_experts, hidden, inter, dtype)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g).to(dtype) * 0.02 for s in ((inter, hidden), (inter, hidden), (hidden, inter))]
    for e in range(num_experts):
        pool.write_expert(0, e, *base)
    return pool


def bench_fetch(pool: HostPool, in_flight: int, rounds: int) -> dict:
    """Fetch bandwidth through TransferEngine vs a plain pinned torch copy of the same bytes."""
    dev = torch.device("cuda")
    slot_bytes = pool.slot_bytes
    arena = ExpertArena(in_flight, pool.slot_elems, pool.dtype, dev, 1, pool.num_experts)
    xfer = TransferEngine(arena, pool, num_streams=3, max_inflight_prefetches=in_flight)
    src = torch.empty(in_flight, pool.slot_elems, dtype=pool.dtype).pin_memory()
    dst = torch.empty(in_flight, pool.slot_elems, dtype=pool.dtype, device=dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(body) -> float:
        best = []
        for r in range(rounds):
            torch.cuda.synchronize()
            start.record()
            body(r)
            end.record()
            end.synchronize()
            best.append(start.elapsed_time(end))
        return in_flight * slot_bytes / (statistics.median(best) * 1e-3) / 1e9

    def torch_copy(_):
        dst.copy_(src, non_blocking=True)

    def engine(demand: bool):
        def body(r):
            base = (r * in_flight) % pool.num_experts
            for s in range(in_flight):
                xfer.fetch(0, (base + s) % pool.num_experts, s, demand=demand)
            xfer.wait_slots(list(range(in_flight)))
            xfer.release_slots(list(range(in_flight)))
        return body

    pinned = timed(torch_copy)
    demand = timed(engine(True))
    prefetch = timed(engine(False))
    stats = xfer.stats()
    return {
        "expert_bytes": slot_bytes,
        "in_flight": in_flight,
        "pinned_torch_GBps": round(pinned, 2),
        "engine_demand_GBps": round(demand, 2),
        "engine_prefetch_GBps": round(prefetch, 2),
        "demand_fraction_of_pinned": round(demand / pinned, 3),
        "prefetch_fraction_of_pinned": round(prefetch / pinned, 3),
        "mean_copy_us": round(stats["copy_time_us"] / max(1, stats["timed_copies"]), 1),
    }


def bench_cpu(pool: HostPool, executor: CpuExecutor, experts: int, tokens: int, repeat: int) -> dict:
    """`tokens` tokens through `experts` experts: native executor vs torch on the same weights, same threads."""
    H, I = pool.hidden_size, pool.inter_size
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(pool.dtype)
    ids = torch.arange(experts, dtype=torch.int32).repeat(tokens, 1)  # [T, experts]: every token, every expert
    w = torch.full((tokens, experts), 1.0 / experts)
    out = torch.empty(tokens, H)
    run = lambda: (executor.submit(pool, 0, x, ids, w, list(range(experts)), out), executor.wait())  # noqa: E731
    run()
    native_us = median_us(run, repeat)
    views = [pool.view(0, e) for e in range(experts)]
    mats = [slot_views(pool.layout, v) for v in views]  # (gate_up [2I, H], down [H, I]) each

    def torch_run():
        y = torch.zeros(tokens, H, dtype=pool.dtype)
        for gate_up, down in mats:
            gu = F.linear(x, gate_up)  # [T, 2I]
            y += F.linear(F.silu(gu[:, :I]) * gu[:, I:], down)
        return y

    torch_run()
    torch_us = median_us(torch_run, repeat)
    time.sleep(0.2)  # let torch's OpenMP workers stop spinning before the next native run
    weight_bytes = experts * expert_bytes_read(pool.layout)
    return {
        "tokens": tokens,
        "experts": experts,
        "isa": executor.isa,
        "threads": executor.num_threads,
        "native_us": round(native_us, 1),
        "native_GBps": round(weight_bytes / native_us / 1e3, 1),
        "torch_us": round(torch_us, 1),
        "torch_GBps": round(weight_bytes / torch_us / 1e3, 1),
        "torch_threads": torch.get_num_threads(),
    }


def bench_cpu_isas(pool: HostPool, repeat: int) -> list[dict]:
    """T = 1, 4, 16 tokens x 1, 2, 4 experts for the best ISA and, where AMX is the best, AVX-512-BF16 too.

    torch gets the executor's thread count, so neither side runs with more threads than cores it may use.
    """
    best = CpuExecutor(1).isa
    isas = ["avx512_bf16", "amx_bf16"] if best == "amx_bf16" else [best]
    rows = []
    for isa in isas:
        os.environ["MOERUN_CPU_ISA"] = isa
        executor = CpuExecutor()
        torch.set_num_threads(executor.num_threads)
        rows += [bench_cpu(pool, executor, e, t, repeat) for t in (1, 4, 16) for e in (1, 2, 4)]
        del executor
    os.environ.pop("MOERUN_CPU_ISA", None)
    return rows


def dram_read_GBps(nbytes: int, threads: int, repeat: int) -> float:
    """Host DRAM read rate with `threads` threads: torch summing a buffer far larger than any cache."""
    buf = torch.ones(nbytes // 4)
    torch.set_num_threads(threads)
    buf.sum()
    return nbytes / median_us(lambda: buf.sum(), repeat) / 1e3


def bench_cpu_formats(formats: list[str], hidden: int, inter: int, dtype: torch.dtype, pool_bytes: int,
                      repeat: int) -> list[dict]:
    """The CPU executor on experts in each expert format, weights cold: T = 1, 4, 16 tokens x 1, 4 experts
    per job, each job taking the pool's next experts (a pool of ~pool_bytes, far beyond the last level
    cache), so the weights stream from DRAM as under uniform routing. ``packed_GBps`` counts the slots'
    packed bytes (weights, scales, zero points) a job reads; ``of_dram`` divides it by the host's DRAM
    read rate with as many threads (torch summing a buffer of pool_bytes), the issue-25 target's ratio.
    """
    executor = CpuExecutor()
    dram = dram_read_GBps(pool_bytes, executor.num_threads, repeat)
    g = torch.Generator().manual_seed(0)
    expert = [torch.randn(s, generator=g).to(dtype) * 0.02 for s in ((inter, hidden), (inter, hidden), (hidden, inter))]
    rows = []
    for fmt in formats:
        layout = slot_layout(dtype, hidden, inter, fmt)
        num_experts = max(8, pool_bytes // layout.slot_bytes)
        pool = HostPool(1, num_experts, hidden, inter, dtype, pinned=False, format=fmt)
        slot = encode_expert(layout, *expert)  # one encode, copied: the bytes' values do not change the speed
        for e in range(num_experts):
            pool.view(0, e).view(torch.uint8).copy_(slot)
        packed = expert_bytes_read(layout)
        for tokens in (1, 4, 16):
            for experts in (1, 4):
                x = torch.randn(tokens, hidden, generator=g).to(dtype)
                ids = torch.arange(experts, dtype=torch.int32).repeat(tokens, 1)
                w = torch.full((tokens, experts), 1.0 / experts)
                out = torch.empty(tokens, hidden)
                jobs = []
                for i in range(repeat + 2):
                    first = (i * experts) % (num_experts - experts + 1)
                    executor.submit(pool, 0, x, ids + first, w, list(range(first, first + experts)), out)
                    executor.wait()
                    jobs.append(executor.last_job_us)
                us = statistics.median(jobs[2:])
                rate = experts * packed / us / 1e3
                rows.append({"format": fmt, "tokens": tokens, "experts": experts, "isa": executor.isa,
                             "threads": executor.num_threads, "expert_bytes": packed, "job_us": round(us, 1),
                             "packed_GBps": round(rate, 1), "dram_GBps": round(dram, 1),
                             "of_dram": round(rate / dram, 2)})
        del pool
    return rows


def bench_cpu_gapped(pool: HostPool, repeat: int) -> list[dict]:
    """3 experts x 1 token (a uniform-routing decode layer's CPU share), jobs separated by a busy gap.

    In a decode step CPU jobs come between the GPU's layers, not back to back: the workers have
    spun out (or slept) when the next one comes. Busy gaps stand for the host thread syncing and
    planning; the time is the caller's, submit to wait's return, as a decode step sees it. Each job
    takes the next 3 of the pool's experts, so (unlike ``bench_cpu``'s same experts every call) the
    weights come from memory, not from the last level cache, as under uniform routing.
    """
    experts, tokens = 3, 1
    x = torch.randn(tokens, pool.hidden_size).to(pool.dtype)
    ids = torch.arange(experts, dtype=torch.int32).repeat(tokens, 1)
    w = torch.full((tokens, experts), 1.0 / experts)
    out = torch.empty(tokens, pool.hidden_size)
    weight_bytes = experts * 3 * pool.hidden_size * pool.inter_size * torch.finfo(pool.dtype).bits // 8
    rows = []
    default = CpuExecutor().num_threads
    for threads in sorted({default, max(1, default // 2), 1}, reverse=True):
        executor = CpuExecutor(threads)
        for gap_us in (0, 300, 2000):
            times, jobs = [], []
            for _ in range(repeat + 3):
                end = time.perf_counter() + gap_us * 1e-6
                while time.perf_counter() < end:
                    pass
                t0 = time.perf_counter()
                first = (len(times) * experts) % (pool.num_experts - experts + 1)
                executor.submit(pool, 0, x, ids + first, w, list(range(first, first + experts)), out)
                executor.wait()
                times.append((time.perf_counter() - t0) * 1e6)
                jobs.append(executor.last_job_us)
            us = statistics.median(times[3:])
            rows.append({"threads": threads, "gap_us": gap_us, "median_us": round(us, 1),
                         "p90_us": round(sorted(times[3:])[int(0.9 * (len(times) - 3))], 1),
                         "job_us": round(statistics.median(jobs[3:]), 1),
                         "GBps": round(weight_bytes / us / 1e3, 1)})
        del executor
    return rows


def bench_host_tier(hidden: int, inter: int, dtype: torch.dtype, experts: int, capacity: int, repeat: int,
                    tmp: str) -> dict:
    """The host pool as a cache in front of a safetensors file: one expert read from disk (cold: dropped
    from the page cache; warm: in it), a host hit, and demand fetches to the GPU that miss / hit in host."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(experts):
        for name, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            tensors[f"e{e}.{name}"] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    path = os.path.join(tmp, "experts.safetensors")
    save_file(tensors, path)
    del tensors
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)

    def drop_page_cache():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    sources = [(0, e, [(path, f"e{e}.{n}") for n in ("gate", "up", "down")]) for e in range(experts)]
    pool = HostPool(1, experts, hidden, inter, dtype, capacity=capacity)
    pool.fill(sources)
    expert_bytes = expert_bytes_read(pool.layout)  # what a miss reads from the file
    order = iter(range(10**9))

    def miss():  # a new expert each time: with capacity < experts the LRU victim leaves
        e = next(order) % experts
        pool.acquire(0, e)
        pool.release(0, e)

    drop_page_cache()
    cold = []
    for _ in range(min(repeat, experts)):
        drop_page_cache()
        t0 = time.perf_counter()
        miss()
        cold.append((time.perf_counter() - t0) * 1e6)
    for _ in range(experts):  # every expert once more, now into the page cache (the cold reads dropped it)
        miss()
    warm_us = median_us(miss, repeat)
    pool.acquire(0, 0)
    pool.release(0, 0)
    hit_us = median_us(lambda: (pool.acquire(0, 0), pool.release(0, 0)), repeat)
    out = {
        "experts": experts, "capacity": capacity, "expert_MB": round(expert_bytes / 1e6, 1),
        "cold_read_us": round(statistics.median(cold), 1),
        "cold_read_GBps": round(expert_bytes / statistics.median(cold) / 1e3, 2),
        "page_cache_read_us": round(warm_us, 1),
        "page_cache_read_GBps": round(expert_bytes / warm_us / 1e3, 2),
        "host_hit_us": round(hit_us, 1),
    }
    if torch.cuda.is_available() and build_info()["cuda"]:
        dev = torch.device("cuda")
        arena = ExpertArena(1, pool.slot_elems, pool.dtype, dev, 1, experts)
        xfer = TransferEngine(arena, pool)

        def fetch(e):
            xfer.fetch(0, e, 0)
            xfer.wait_slots([0])
            xfer.release_slots([0])
            torch.cuda.current_stream().synchronize()

        out["fetch_host_miss_us"] = round(median_us(lambda: fetch(next(order) % experts), repeat), 1)
        fetch(0)
        out["fetch_host_hit_us"] = round(median_us(lambda: fetch(0), repeat), 1)
        xfer.synchronize()
    out["stats"] = pool.stats()
    os.close(fd)
    os.remove(path)
    return out


def bench_overlap(pool: HostPool, executor: CpuExecutor, repeat: int) -> dict:
    """A layer with 2 fetches and 2 CPU experts: both paths at once should take about the slower one."""
    dev = torch.device("cuda")
    H = pool.hidden_size
    arena = ExpertArena(2, pool.slot_elems, pool.dtype, dev, 1, pool.num_experts)
    xfer = TransferEngine(arena, pool)
    x = torch.randn(1, H).to(pool.dtype)
    ids = torch.tensor([[2, 3]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.5]])
    out = torch.empty(1, H).pin_memory()

    def fetches():
        xfer.fetch(0, 0, 0)
        xfer.fetch(0, 1, 1)
        xfer.wait_slots([0, 1])
        xfer.release_slots([0, 1])
        torch.cuda.current_stream().synchronize()

    def cpu():
        executor.submit(pool, 0, x, ids, w, [2, 3], out)
        executor.wait()

    def both():
        xfer.fetch(0, 0, 0)
        xfer.fetch(0, 1, 1)
        executor.submit(pool, 0, x, ids, w, [2, 3], out)
        xfer.wait_slots([0, 1])
        xfer.release_slots([0, 1])
        executor.wait()
        torch.cuda.current_stream().synchronize()

    for f in (fetches, cpu, both):
        f()
    fetch_us, cpu_us, both_us = (median_us(f, repeat) for f in (fetches, cpu, both))
    return {
        "fetch_2_us": round(fetch_us, 1),
        "cpu_2_us": round(cpu_us, 1),
        "both_us": round(both_us, 1),
        "max_us": round(max(fetch_us, cpu_us), 1),
        "sum_us": round(fetch_us + cpu_us, 1),
    }


def bench_memory(pool: HostPool, executor: CpuExecutor, steps: int) -> dict:
    """GPU memory across decode-like steps: fetch 2 experts, read the slots, run 1 CPU expert."""
    dev = torch.device("cuda")
    H = pool.hidden_size
    arena = ExpertArena(4, pool.slot_elems, pool.dtype, dev, 1, pool.num_experts)
    xfer = TransferEngine(arena, pool)
    x = torch.randn(1, H).to(pool.dtype)
    out = torch.empty(1, H).pin_memory()
    acc = torch.zeros((), device=dev, dtype=torch.float32)

    def step(i):
        slots = [i % 4, (i + 1) % 4]
        for s in slots:
            xfer.fetch(0, (i + s) % pool.num_experts, s, demand=(i % 3 != 0))
        xfer.wait_slots(slots)
        acc.add_(arena.weights[slots[0], :64].float().sum())
        xfer.release_slots(slots)
        executor.submit(pool, 0, x, torch.tensor([[i % pool.num_experts]]), torch.ones(1, 1), [i % pool.num_experts], out)
        executor.wait()

    step(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    after_first = torch.cuda.memory_allocated()
    reserved_first = torch.cuda.memory_reserved()
    for i in range(1, steps):
        step(i)
    torch.cuda.synchronize()
    return {
        "steps": steps,
        "allocated_after_first_step": after_first,
        "allocated_after_last_step": torch.cuda.memory_allocated(),
        "peak_allocated_during_steps": torch.cuda.max_memory_allocated(),
        "reserved_first": reserved_first,
        "reserved_last": torch.cuda.memory_reserved(),
    }


def bench_host_step(steps: int, warmup_steps: int, policy: str = "per_layer") -> dict:
    """The host work of one MoE layer's decode step (what the profile's ``plan`` phase and the
    bookkeeping after the kernel cost), at Qwen1.5-MoE-A2.7B's routing shape: 24 MoE layers x 60
    experts, top-4, batch 1, 399 slots (its 10 GiB budget), routing uniform at random.

    The runtime's phases run as the fast decode path calls them (``begin``; the kernel is left
    out; ``after_kernel``; ``wait_cpu`` when the plan has CPU experts; ``finish``) over an arena
    and a pool in host memory with tiny experts (H=64, I=32): copies are memcpy of 12 KiB and CPU
    experts take microseconds, so what is timed is the host's own work, not the copies'. On a
    GPU the native calls also issue CUDA work (copies, events, the slot table's copy), which only
    the decode profile shows (benchmarks/bench_decode.py). The cost model's starting numbers are
    kept (``ema`` 0: it learns nothing from the tiny experts' times), so the hybrid schedule splits
    misses between copies and the CPU as it would on the GPU (per_layer: two thirds on the CPU, the
    H100 run of benchmarks/RESULTS.md: about 60 %). ``plan_us`` = ``begin`` (the decode profile's
    ``plan``); ``post_us`` = ``after_kernel`` + ``finish`` (its ``after``); medians per layer step.
    The section runs ``per_layer`` (hybrid), ``fiddler`` (misses on the CPU) and ``balanced`` (hybrid, with
    history prefetches every layer step).
    """
    num_layers, num_experts, top_k, num_slots = 24, 60, 4, 399
    hidden, inter, dtype = 64, 32, torch.bfloat16
    # a Qwen1.5-MoE expert's slot in bf16 (replay's reference expert): what the cost model prices
    expert_bytes = slot_layout(**REFERENCE_EXPERT).slot_bytes
    pool = HostPool(num_layers, num_experts, hidden, inter, dtype, pinned=False)
    g = torch.Generator().manual_seed(0)
    for layer in range(num_layers):
        for e in range(num_experts):
            pool.write_expert(layer, e, *((torch.randn(s, generator=g) * 0.02).to(dtype)
                                          for s in ((inter, hidden), (inter, hidden), (hidden, inter))))
    arena = ExpertArena(num_slots, pool.slot_elems, dtype, "cpu", num_layers, num_experts)
    transfer = TransferEngine(arena, pool, 2)
    engine = PolicyEngine(compile_policy(policy), num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                          num_slots=num_slots, expert_bytes=expert_bytes, cost=CostModel(ema=0.0))
    runtime = OffloadRuntime(engine=engine, arena=arena, pool=pool, transfer=transfer, cpu_executor=CpuExecutor(1),
                             layout=pool.layout, num_layers=num_layers, num_experts=num_experts,
                             slot_bytes=expert_bytes, device=torch.device("cpu"), lookahead=engine.setup.lookahead,
                             observe_timings=engine.setup.observe_timings)
    # The fast path's static host buffers: one set, refilled per layer (here from routing drawn up front).
    host = HostStep(x=torch.randn(1, hidden, generator=g).to(dtype), ids=torch.zeros(1, top_k, dtype=torch.int64),
                    weights=torch.full((1, top_k), 1.0 / top_k), cpu_out=torch.zeros(1, hidden))
    total = warmup_steps + steps
    routing = torch.stack([torch.randperm(num_experts, generator=g)[:top_k]
                           for _ in range(total * num_layers)]).view(total, num_layers, 1, top_k)
    plan_us, post_us, cpu_layers = [], [], 0
    clock = time.perf_counter
    for step in range(total):
        for layer in range(num_layers):
            host.ids.copy_(routing[step, layer])
            t0 = clock()
            host.started_at = t0
            plan = runtime.begin(layer, host)
            t1 = clock()
            runtime.after_kernel(plan)
            t2 = clock()
            if plan.cpu_experts:
                runtime.wait_cpu(plan)
            t3 = clock()
            runtime.finish(plan)
            t4 = clock()
            if step >= warmup_steps:
                plan_us.append((t1 - t0) * 1e6)
                post_us.append(((t2 - t1) + (t4 - t3)) * 1e6)
                cpu_layers += bool(plan.cpu_experts)
    totals = [a + b for a, b in zip(plan_us, post_us)]
    s = engine.stats()
    return {
        "policy": policy, "layer_steps": len(plan_us), "layers": num_layers, "experts": num_experts, "top_k": top_k,
        "slots": num_slots, "hit_rate": round(s["hit_rate"], 3), "cpu_share": round(s["cpu_share"], 3),
        "layer_steps_with_cpu_experts": round(cpu_layers / max(len(plan_us), 1), 3),
        "plan_us": round(statistics.median(plan_us), 1), "post_us": round(statistics.median(post_us), 1),
        "host_us": round(statistics.median(totals), 1),
        "host_us_p90": round(sorted(totals)[int(0.9 * len(totals))], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke run on any machine)")
    ap.add_argument("--sections", help="comma-separated subset of cpu,cpu_gapped,host_tier,host_step,fetch,overlap,"
                                       "memory (default: all)")
    ap.add_argument("--tmp", help="directory for the host-tier benchmark's safetensors file (default: system tmp)")
    ap.add_argument("--formats", nargs="+", metavar="FORMAT",
                    help="the cpu section runs the executor on cold experts in these expert formats (e.g. float fp8 "
                         "int8 int4-g128 mxfp4) against the DRAM read rate, instead of its per-ISA bf16 rows")
    args = ap.parse_args()
    faulthandler.enable()
    hidden, inter, experts, repeat = (256, 128, 8, 5) if args.small else (2048, 1408, 32, 30)
    dtype = torch.bfloat16
    results: dict = {"build": build_info(), "hidden": hidden, "inter": inter, "dtype": str(dtype)}
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name()

    @functools.cache
    def pool() -> HostPool:  # built on first use: host_step alone needs none
        t0 = time.perf_counter()
        built = make_pool(experts, hidden, inter, dtype)
        results["pool_build_s"] = round(time.perf_counter() - t0, 2)
        return built

    sections = {"cpu": lambda: (bench_cpu_formats(args.formats, hidden, inter, dtype, (64 if args.small else 2048) << 20,
                                                  repeat) if args.formats else bench_cpu_isas(pool(), repeat)),
                "cpu_gapped": lambda: bench_cpu_gapped(pool(), 4 * repeat),
                "host_tier": lambda: bench_host_tier(hidden, inter, dtype, experts, experts // 4, repeat,
                                                     args.tmp or tempfile.gettempdir()),
                "host_step": lambda: [bench_host_step(20 if args.small else 200, 5 if args.small else 20, p)
                                      for p in ("per_layer", "fiddler", "balanced")]}
    if torch.cuda.is_available() and build_info()["cuda"]:
        # One executor at a time: idle workers of another would compete for the same cores.
        sections["fetch"] = lambda: [bench_fetch(pool(), n, repeat) for n in (1, 4, 8)]
        sections["overlap"] = lambda: bench_overlap(pool(), CpuExecutor(), repeat)
        sections["memory"] = lambda: bench_memory(pool(), CpuExecutor(), 100 if args.small else 1000)
    if args.sections:
        sections = {k: v for k, v in sections.items() if k in args.sections.split(",")}
    for name, run in sections.items():
        results[name] = run()
        print(name, json.dumps(results[name]), flush=True)  # progress, in case a later section fails
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
