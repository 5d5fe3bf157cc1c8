"""Microbenchmarks of the native mechanism (moerun._C): fetch throughput, CPU executor, overlap, memory.

    python benchmarks/bench_mechanism.py [--json out.json] [--small]

Shapes default to one Qwen1.5-MoE-A2.7B expert (H=2048, I=1408, bf16: 17.3 MB). --small runs tiny shapes
on any machine (a smoke run; its numbers mean nothing). Results go in benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import time

import torch
import torch.nn.functional as F

from moerun.native import CpuExecutor, ExpertArena, HostPool, TransferEngine, build_info, slot_elems


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


def bench_cpu(pool: HostPool, executor: CpuExecutor, experts: int, repeat: int) -> dict:
    """One token through `experts` experts: native executor vs torch bf16 on the same weights."""
    H, I = pool.hidden_size, pool.inter_size
    x = torch.randn(1, H).to(pool.dtype)
    ids = torch.arange(experts, dtype=torch.int32).view(1, experts)
    w = torch.full((1, experts), 1.0 / experts)
    out = torch.empty(1, H)
    run = lambda: (executor.submit(pool, 0, x, ids, w, list(range(experts)), out), executor.wait())  # noqa: E731
    run()
    native_us = median_us(run, repeat)
    views = [pool.view(0, e) for e in range(experts)]
    mats = [(v[: 2 * I * H].view(2 * I, H), v[2 * I * H: 3 * I * H].view(H, I)) for v in views]

    def torch_run():
        y = torch.zeros(1, H, dtype=pool.dtype)
        for gate_up, down in mats:
            gu = F.linear(x, gate_up)  # [1, 2I]
            y += F.linear(F.silu(gu[:, :I]) * gu[:, I:], down)
        return y

    torch_run()
    torch_us = median_us(torch_run, repeat)
    weight_bytes = experts * 3 * H * I * torch.finfo(pool.dtype).bits // 8
    return {
        "experts": experts,
        "isa": executor.isa,
        "threads": executor.num_threads,
        "native_us": round(native_us, 1),
        "native_GBps": round(weight_bytes / native_us / 1e3, 1),
        "torch_us": round(torch_us, 1),
        "torch_GBps": round(weight_bytes / torch_us / 1e3, 1),
        "torch_threads": torch.get_num_threads(),
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke run on any machine)")
    args = ap.parse_args()
    faulthandler.enable()
    hidden, inter, experts, repeat = (256, 128, 8, 5) if args.small else (2048, 1408, 32, 30)
    dtype = torch.bfloat16
    results: dict = {"build": build_info(), "hidden": hidden, "inter": inter, "dtype": str(dtype)}
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    pool = make_pool(experts, hidden, inter, dtype)
    results["pool_build_s"] = round(time.perf_counter() - t0, 2)
    executor = CpuExecutor()
    sections = {"cpu": lambda: [bench_cpu(pool, executor, n, repeat) for n in (1, 2, 4)]}
    if torch.cuda.is_available() and build_info()["cuda"]:
        sections["fetch"] = lambda: [bench_fetch(pool, n, repeat) for n in (1, 4, 8)]
        sections["overlap"] = lambda: bench_overlap(pool, executor, repeat)
        sections["memory"] = lambda: bench_memory(pool, executor, 100 if args.small else 1000)
    for name, run in sections.items():
        results[name] = run()
        print(name, json.dumps(results[name]), flush=True)  # progress, in case a later section fails
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
