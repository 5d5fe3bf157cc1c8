"""Fused-MoE kernel benchmark: decode (1 token) and prefill (2048 tokens) at real model shapes.

For each shape it writes down the two floors first (bytes to move, flops to do), measures the two
ceilings of this device in the same run (a large device-to-device copy; a dense bf16 matmul),
times ``fused_moe`` with every expert resident (CUDA-graph replays, so launch gaps stay out; decode
rotates 16 input sets so the experts are not served from L2), and times transformers' own experts
implementations (grouped_mm, batched_mm, eager) and a per-expert torch loop on the same inputs.
With ``--tune`` it sweeps launch configs and writes the best per shape to ``--config-out``
(the format of ``kernels/fused_moe_configs.json``; merged into the file if it exists). The prefill's
time per kernel (profiler) says where it goes.

Every expert format (``--formats``, default all): the float rows as above; a quantized format's rows
time the same two paths over random packed slots (valid codes, scales near the float experts'),
decode bandwidth counted in packed bytes (codes + scales + zero points of the experts touched) against
the copy rate, and check the result against a torch loop over the reference-decoded weights
(tests/expert_format_reference.py). The ``gpt-oss-20b`` shape's experts carry biases and the clamped
SwiGLU (``ACTIVATIONS``): its rows time the kernels with both and check them against the tests' float64
expert; transformers' Qwen2MoeExperts rows are left out there (they compute silu experts). ``--small``
runs every format once at a tiny shape in the Triton interpreter on the CPU, silu and gpt-oss's
activation (a smoke test of this script: no timing).

    python benchmarks/bench_kernels.py --tune --out results.json --config-out fused_moe_configs.json
    python benchmarks/bench_kernels.py --decode-only --out bench_kernels_formats.json   # every format, decode
    python benchmarks/bench_kernels.py --small
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--small" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from moerun.kernels.fused_moe import fused_moe, sort_pairs_by_expert  # noqa: E402
from moerun.models.base import ExpertActivation  # noqa: E402
from moerun.models.gpt_oss import SWIGLU_ALPHA, SWIGLU_LIMIT  # noqa: E402
from moerun.native import EXPERT_FORMATS, SLOT_PARTS, slot_layout, slot_parts, slot_views  # noqa: E402
from moerun.kernels.fused_moe_config import (  # noqa: E402
    DecodeConfig, FusedMoeConfig, GemmTile, PrefillConfig, device_key, get_config, shape_key,
)

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "expert_format_reference.py"


def format_reference():
    """The tests' reference encoder/decoder of the expert formats (tests/expert_format_reference.py)."""
    spec = importlib.util.spec_from_file_location("expert_format_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# name: (H, I, E, K)
SHAPES = {
    "qwen1.5-moe": (2048, 1408, 60, 4),
    "mixtral": (4096, 14336, 8, 2),
    "olmoe": (2048, 1024, 64, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "gpt-oss-20b": (2880, 2880, 32, 4),
}
# Shapes whose experts are not silu without biases: their activation (moerun.models.base.ExpertActivation).
ACTIVATIONS = {"gpt-oss-20b": ExpertActivation("swiglu_clamped", alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT, bias=True)}
DECODE_SWEEP = [
    DecodeConfig(block_n=bn, block_h=bh, block_out=bo, block_i=bi, num_warps=w)
    for bn, bh, bo, bi, w in [
        (16, 256, 8, 256, 4), (8, 512, 4, 512, 4), (16, 512, 8, 512, 8), (8, 1024, 4, 1024, 8),
        (4, 1024, 4, 512, 4), (8, 512, 8, 512, 8), (16, 1024, 4, 1024, 8), (8, 2048, 4, 512, 8),
        (8, 256, 4, 256, 4), (4, 512, 2, 512, 4), (8, 512, 2, 1024, 4), (8, 1024, 8, 256, 4),
        (32, 256, 8, 512, 8), (4, 2048, 4, 1024, 4),
    ]
]
# Prefill: the blocks (rows per full block, smallest short block), then gate_up's tile,
# then its launch order, then the same two for down, each with the rest fixed (the GEMMs' times add
# up), starting from the shape's current config; last the summing kernel's width. Tiles of 64
# columns hold half the accumulator: two programs fit on an SM.
PREFILL_BLOCKS = [(128, 64), (128, 32)]
GATE_UP_TILES = [
    GemmTile(block_n=n, block_k=k, num_warps=w, num_stages=s, tma=t)
    for n, k, w, s, t in [
        (128, 64, 8, 4, False), (128, 64, 8, 3, False), (128, 32, 8, 5, False), (64, 64, 8, 4, False),
        (64, 128, 8, 3, False), (128, 64, 8, 4, True), (128, 32, 8, 6, True),
    ]
]
DOWN_TILES = [
    GemmTile(block_n=n, block_k=k, num_warps=w, num_stages=s, tma=t)
    for n, k, w, s, t in [
        (128, 64, 8, 3, False), (128, 64, 8, 3, True), (256, 64, 8, 3, False), (256, 64, 8, 3, True),
        (128, 64, 4, 3, True), (128, 64, 8, 2, True),
    ]
]
GROUP_M = [0, 1, 4, 8, 16]
SUM_BLOCK_H = [512, 1024, 2048]


def median_us(fn, reps: int = 50) -> float:
    """Median device time of fn() in µs (events around each call, after warm-up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_us(fns, replays: int = 20) -> float:
    """Device time per call of a CUDA graph holding fns (one call each), replayed; no launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return median_us(graph.replay, reps=replays) / len(fns)


def kernel_us(fn, reps: int = 10) -> dict:
    """Device time per call of each kernel fn() launches, by kernel name (profiler, eager launches:
    a kernel's own duration does not include the host's launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = ev.cuda_time_total
        if us > 0:
            out[ev.key[:60]] = us / reps
    return out


def device_ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written) and dense bf16 matmul rate."""
    n = 1 << 30
    src = torch.randn(n // 4, device="cuda").view(torch.uint8)
    dst = torch.empty_like(src)
    copy_us = median_us(lambda: dst.copy_(src), reps=20)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = median_us(lambda: a @ b, reps=20)
    return {"copy_GBps": 2 * n / copy_us / 1e3, "matmul_TFLOPs": 2 * 8192**3 / mm_us / 1e6}


def random_packed_slots(layout, experts: int, device) -> torch.Tensor:
    """[E, slot_elems] arena of random quantized experts: every code valid (no fp8 NaN), scales that
    give weights of about the float experts' size, zero padding."""
    arena = torch.zeros(experts, layout.slot_elems, dtype=layout.dtype, device=device)
    raw = arena.view(torch.uint8)  # [E, slot_bytes]
    fmt, rows_cols = layout.format, {"gate_up": layout.hidden_size, "down": layout.inter_size}
    for part in SLOT_PARTS:
        off, size = getattr(layout, part + "_offset"), getattr(layout, part + "_bytes")
        if not size or part.endswith("_bias"):  # biases: Problem writes them in the model dtype
            continue
        view = raw[:, off:off + size]
        fan_in = rows_cols["gate_up" if part.startswith("gate_up") else "down"]
        if part.endswith("_zeros"):
            view.copy_(torch.randint(5, 11, view.shape, dtype=torch.uint8, device=device))
        elif part.endswith("_scales") and fmt == "mxfp4":  # e8m0: 2^-5 .. 2^-3 times e2m1 codes up to 6
            view.copy_(torch.randint(122, 125, view.shape, dtype=torch.uint8, device=device))
        elif part.endswith("_scales"):  # fp32, so weights come out near fan_in^-0.5
            code_rms = {"fp8": 100.0, "fp8-block128": 100.0, "int8": 73.0}.get(fmt, 5.0)
            scales = torch.full((experts, size // 4), fan_in ** -0.5 / code_rms, device=device)
            view.copy_(scales.view(torch.uint8))
        else:
            codes = torch.randint(0, 256, view.shape, dtype=torch.uint8, device=device)
            if fmt.startswith("fp8"):
                codes[(codes & 0x7F) == 0x7F] = 0x7E  # e4m3fn's NaN codes
            view.copy_(codes)
    return arena


class Problem:
    """All E experts of one shape, resident in an arena (one slot each), plus HF-layout copies (float
    format; quantized formats hold random packed slots, decoded on demand for the checks)."""

    def __init__(self, hidden, inter, experts, top_k, dtype=torch.bfloat16, format="float", device="cuda",
                 activation: ExpertActivation | None = None):
        self.H, self.I, self.E, self.K = hidden, inter, experts, top_k
        self.activation = activation  # None: silu without biases
        bias = activation is not None and activation.bias
        self.layout = slot_layout(dtype, hidden, inter, format, bias=bias)
        self.device = device
        if self.layout.quantized:
            self.gate_up = self.down = None
            self.arena = random_packed_slots(self.layout, experts, device)
            self._decoded = {}
        else:
            self.gate_up = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype) * hidden**-0.5
            self.down = torch.randn(experts, hidden, inter, device=device, dtype=dtype) * inter**-0.5
            self.arena = torch.zeros(experts, self.layout.slot_elems, device=device, dtype=dtype)  # [N=E, S]
            for e in range(experts):
                gate_up, down = slot_views(self.layout, self.arena[e])
                gate_up.copy_(self.gate_up[e])
                down.copy_(self.down[e])
        self.biases = None  # (gate_up_bias [E, 2I], down_bias [E, H]) in the model dtype
        if bias:
            self.biases = (0.5 * torch.randn(experts, 2 * inter, device=device).to(dtype),
                           0.1 * torch.randn(experts, hidden, device=device).to(dtype))
            for e in range(experts):
                parts = slot_parts(self.layout, self.arena[e])
                parts["gate_up_bias"].copy_(self.biases[0][e].view(torch.uint8))
                parts["down_bias"].copy_(self.biases[1][e].view(torch.uint8))
        self.table = torch.randperm(experts, device=device).int()  # expert e -> a random slot
        self.arena = self.arena[self.table.argsort()].contiguous()  # place expert e in slot table[e]

    def inputs(self, tokens, seed):
        g = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(tokens, self.H, device=self.device, dtype=self.arena.dtype, generator=g)
        ids = torch.rand(tokens, self.E, device=self.device, generator=g).argsort(-1)[:, : self.K].int()  # [T, K]
        w = torch.rand(tokens, self.K, device=self.device, generator=g)
        return x, ids, w

    def expert_bytes(self) -> int:
        """Bytes of one expert as stored (codes, scales, zero points, biases; the slot without its padding)."""
        return sum(getattr(self.layout, part + "_bytes") for part in SLOT_PARTS)

    def expert_weights(self, e):
        """(gate_up [2I, H], down [H, I]) of expert e in the model dtype's compute precision: the float
        format's own, a quantized format's reference-decoded (fp32)."""
        if not self.layout.quantized:
            return self.gate_up[e], self.down[e]
        if e not in self._decoded:
            slot = self.arena[self.table[e]].cpu()
            self._decoded[e] = tuple(t.to(self.device) for t in format_reference().decode(self.layout, slot))
        return self._decoded[e]

    def floors(self, tokens, ids) -> dict:
        touched = torch.unique(ids).numel()
        act_bytes = 2 * tokens * self.H * self.arena.element_size()
        return {"bytes": touched * self.expert_bytes() + act_bytes,
                "flops": 2 * tokens * self.K * 3 * self.I * self.H}

    def hf_experts(self, impl):
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
        cfg = Qwen2MoeConfig(hidden_size=self.H, moe_intermediate_size=self.I, num_experts=self.E,
                             num_experts_per_tok=self.K)
        cfg._experts_implementation = impl
        with torch.device("meta"):
            mod = Qwen2MoeExperts(cfg)
        mod.gate_up_proj = torch.nn.Parameter(self.gate_up, requires_grad=False)
        mod.down_proj = torch.nn.Parameter(self.down, requires_grad=False)
        return mod

    def torch_loop(self, x, ids, w):
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in torch.unique(ids).tolist():
            tok, k = (ids == e).nonzero(as_tuple=True)
            gate_up, down = self.expert_weights(e)
            if self.activation is None:
                h = F.linear(x[tok].to(gate_up.dtype), gate_up)
                h = F.silu(h[:, : self.I]) * h[:, self.I:]
                y = F.linear(h, down).float()
            else:  # the tests' float64 expert (biases, the shape's activation)
                biases = (self.biases[0][e], self.biases[1][e]) if self.biases is not None else None
                y = format_reference().expert_output(x[tok], gate_up, down, biases, self.activation).float()
            out.index_add_(0, tok, y * w[tok, k, None])
        return out.to(x.dtype)


def floor_us(floors: dict, ceilings: dict) -> float:
    """The larger of bytes / copy rate and flops / matmul rate, in µs."""
    return max(floors["bytes"] / (ceilings["copy_GBps"] * 1e3), floors["flops"] / (ceilings["matmul_TFLOPs"] * 1e6))


def check(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def format_fits(layout, cfg) -> bool:
    """Whether a launch config is one the kernels take for this layout's format (sweeps skip the rest)."""
    if not layout.quantized:
        return True
    if isinstance(cfg, DecodeConfig):
        vc = 128 // layout.weight_bits
        return cfg.block_h % vc == 0 and cfg.block_i % vc == 0
    tiles = [cfg] if isinstance(cfg, GemmTile) else [cfg.gate_up, cfg.down]
    return all(not t.tma and (not layout.group_size or layout.group_size % t.block_k == 0) for t in tiles)


def bench_shape(name, shape, ceilings, tune, decode_tokens, prefill_tokens, fmt="float", decode_only=False) -> dict:
    prob = Problem(*shape, format=fmt, activation=ACTIVATIONS.get(name))
    quantized = prob.layout.quantized
    silu = prob.activation is None  # transformers' Qwen2MoeExperts (the hf rows) compute silu experts only
    row = {"shape": name, "format": fmt, "H": shape[0], "I": shape[1], "E": shape[2], "K": shape[3],
           "activation": prob.activation.name if prob.activation else "silu", "expert_bytes": prob.expert_bytes()}
    base_cfg = get_config(torch.device("cuda"), shape[0], shape[1], format=fmt)
    best = {"decode": base_cfg.decode, "prefill": base_cfg.prefill}

    # ---- decode: distinct random experts each call, 16 calls in one graph (rotating inputs)
    sets = [prob.inputs(decode_tokens, seed) for seed in range(16)]
    outs = [torch.empty_like(s[0]) for s in sets]
    fl = prob.floors(decode_tokens, sets[0][1])
    row["decode_floor_bytes"], row["decode_floor_flops"] = fl["bytes"], fl["flops"]
    row["decode_floor_us"] = floor_us(fl, ceilings)
    sweep = [c for c in DECODE_SWEEP if format_fits(prob.layout, c)] if tune in ("both", "decode") else [best["decode"]]
    decode_times = {}
    for dc in sweep:
        cfg = FusedMoeConfig(decode=dc, prefill=best["prefill"])
        fns = [lambda s=s, o=o, cfg=cfg: fused_moe(s[0], s[1], s[2], prob.table, prob.arena, prob.layout, o,
                                                   prob.activation, config=cfg)
               for s, o in zip(sets, outs)]
        decode_times[dc] = graph_us(fns)
    best["decode"] = min(decode_times, key=decode_times.get)
    row["decode_us"] = decode_times[best["decode"]]
    row["decode_GBps"] = fl["bytes"] / row["decode_us"] / 1e3
    row["decode_frac_of_copy_bw"] = row["decode_GBps"] / ceilings["copy_GBps"]
    x, ids, w = sets[0]
    ref = prob.torch_loop(x, ids, w)
    chosen = FusedMoeConfig(best["decode"], best["prefill"])
    out = fused_moe(x, ids, w, prob.table, prob.arena, prob.layout, activation=prob.activation, config=chosen)
    row["decode_rel_err_vs_torch_loop"] = check(out, ref)
    row["decode_kernels_us"] = kernel_us(lambda: fused_moe(x, ids, w, prob.table, prob.arena, prob.layout,
                                                           activation=prob.activation, config=chosen))
    for impl in ("grouped_mm", "batched_mm", "eager") if silu and not quantized else ():  # bf16 silu experts only
        mod = prob.hf_experts(impl)
        try:
            row[f"decode_hf_{impl}_us"] = median_us(lambda: mod(x, ids.long(), w))
        except Exception as exc:  # report, do not hide, an implementation this torch cannot run
            row[f"decode_hf_{impl}_us"] = f"failed: {type(exc).__name__}: {exc}"[:200]
    if silu and not quantized:
        row["decode_torch_loop_us"] = median_us(lambda: prob.torch_loop(x, ids, w))
    row["decode_eager_launch_us"] = median_us(lambda: fused_moe(x, ids, w, prob.table, prob.arena, prob.layout,
                                                                activation=prob.activation, config=chosen))

    if decode_only:
        row["config"] = FusedMoeConfig(best["decode"], best["prefill"]).to_dict()
        row["decode_sweep_us"] = {str(k): v for k, v in decode_times.items()}
        del prob
        torch.cuda.empty_cache()
        return row

    # ---- prefill
    x, ids, w = prob.inputs(prefill_tokens, 1234)
    out = torch.empty_like(x)
    fl = prob.floors(prefill_tokens, ids)
    row["prefill_floor_bytes"], row["prefill_floor_flops"] = fl["bytes"], fl["flops"]
    row["prefill_floor_us"] = floor_us(fl, ceilings)
    prefill_times = {}

    def time_prefill(pc):
        cfg = FusedMoeConfig(decode=best["decode"], prefill=pc)
        try:
            prefill_times[pc] = graph_us([lambda: fused_moe(x, ids, w, prob.table, prob.arena, prob.layout, out,
                                                            prob.activation, config=cfg)], replays=10)
        except Exception as exc:  # e.g. out of shared memory for a large tile
            print(f"  {name} prefill {pc}: {type(exc).__name__}: {str(exc)[:120]}")
            prefill_times[pc] = float("inf")
        return prefill_times[pc]

    if tune in ("both", "prefill"):
        base = best["prefill"]
        for bm, tm in PREFILL_BLOCKS:
            pc = PrefillConfig(block_m=bm, tail_m=tm, gate_up=base.gate_up, down=base.down)
            for gemm, tiles in (("gate_up", GATE_UP_TILES), ("down", DOWN_TILES)):
                order = getattr(pc, gemm).group_m  # tiles compared in the current launch order
                tiles = [t for t in tiles if format_fits(prob.layout, t)] or [getattr(pc, gemm)]
                tile = min([dataclasses.replace(t, group_m=order) for t in tiles],
                           key=lambda t: time_prefill(dataclasses.replace(pc, **{gemm: t})))
                tile = min([dataclasses.replace(tile, group_m=g) for g in GROUP_M],
                           key=lambda t: time_prefill(dataclasses.replace(pc, **{gemm: t})))
                pc = dataclasses.replace(pc, **{gemm: tile})
            min(SUM_BLOCK_H, key=lambda bh: time_prefill(dataclasses.replace(pc, sum_block_h=bh)))
    else:
        time_prefill(best["prefill"])
    best["prefill"] = min(prefill_times, key=prefill_times.get)
    row["prefill_us"] = prefill_times[best["prefill"]]
    row["prefill_TFLOPs"] = fl["flops"] / row["prefill_us"] / 1e6
    row["prefill_frac_of_matmul"] = row["prefill_TFLOPs"] / ceilings["matmul_TFLOPs"]
    cfg = FusedMoeConfig(best["decode"], best["prefill"])
    out = fused_moe(x, ids, w, prob.table, prob.arena, prob.layout, activation=prob.activation, config=cfg)
    ref = prob.torch_loop(x, ids, w)
    row["prefill_rel_err_vs_torch_loop"] = check(out, ref)
    for impl in ("grouped_mm", "batched_mm", "eager") if silu and not quantized else ():
        mod = prob.hf_experts(impl)
        try:
            if impl == "batched_mm" and prefill_tokens * prob.K * prob.H * prob.I * 3 * 2 > 40e9:
                raise MemoryError("batched_mm gathers one weight copy per pair: too large at this shape")
            row[f"prefill_hf_{impl}_us"] = median_us(lambda: mod(x, ids.long(), w), reps=10)
        except Exception as exc:
            row[f"prefill_hf_{impl}_us"] = f"failed: {type(exc).__name__}: {exc}"[:200]
        torch.cuda.empty_cache()
    if silu and not quantized:
        row["prefill_torch_loop_us"] = median_us(lambda: prob.torch_loop(x, ids, w), reps=10)
    # share of the prefill time spent grouping pairs by expert
    row["prefill_sort_us"] = graph_us([lambda: sort_pairs_by_expert(ids, prob.table, best["prefill"].block_m,
                                                                     best["prefill"].tail_m)])
    # rows the GEMMs compute (padding included) per useful row
    _, blocks = sort_pairs_by_expert(ids, prob.table, best["prefill"].block_m, best["prefill"].tail_m)
    row["prefill_rows_computed_per_pair"] = blocks[2].sum().item() / ids.numel()
    # where the prefill time goes, kernel by kernel
    row["prefill_kernels_us"] = kernel_us(lambda: fused_moe(x, ids, w, prob.table, prob.arena, prob.layout, out,
                                                            prob.activation, config=cfg))
    # the same call launched eagerly (host launch cost included, unlike the graph replays above)
    row["prefill_eager_launch_us"] = median_us(lambda: fused_moe(x, ids, w, prob.table, prob.arena, prob.layout, out,
                                                                 prob.activation, config=cfg), reps=10)
    row["config"] = cfg.to_dict()
    row["decode_sweep_us"] = {str(k): v for k, v in decode_times.items()}
    row["prefill_sweep_us"] = {str(k): v for k, v in prefill_times.items()}
    del prob
    torch.cuda.empty_cache()
    return row


def small_smoke(formats: list[str]) -> None:
    """Every format once at a tiny shape in the Triton interpreter (CPU): both paths against the torch
    loop over the reference-decoded weights. Checks this script and the kernels' launch; times nothing."""
    small = FusedMoeConfig(DecodeConfig(block_n=32, block_h=64, block_out=32, block_i=64),
                           PrefillConfig(block_m=16, tail_m=4, gate_up=GemmTile(32, 32, 4, 2),
                                         down=GemmTile(64, 32, 4, 2, group_m=2), sum_block_h=64))
    print("format        activation      packed bytes/expert  decode rel err  prefill rel err")
    for fmt in formats:
        for activation in (None, ACTIVATIONS["gpt-oss-20b"]):
            prob = Problem(128, 128, 4, 2, dtype=torch.float32, format=fmt, device="cpu", activation=activation)
            errs = []
            for tokens, path in ((1, "decode"), (9, "prefill")):
                x, ids, w = prob.inputs(tokens, 7)
                out = fused_moe(x, ids, w, prob.table, prob.arena, prob.layout, activation=prob.activation,
                                config=small, path=path)
                errs.append(check(out, prob.torch_loop(x, ids, w)))
            act = activation.name if activation else "silu"
            print(f"{fmt:13s} {act:15s} {prob.expert_bytes():19d} {errs[0]:15.1e} {errs[1]:16.1e}")
            if max(errs) > 1e-4 or any(e != e for e in errs):
                raise SystemExit(f"{fmt} {act}: the kernels disagree with the reference")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--formats", nargs="*", default=list(EXPERT_FORMATS), choices=list(EXPERT_FORMATS),
                    help="expert formats to run (default: all)")
    ap.add_argument("--tune", nargs="?", const="both", choices=["both", "decode", "prefill"],
                    help="sweep launch configs of both paths (or only one), keep the best per shape")
    ap.add_argument("--decode-only", action="store_true", help="time the decode path only")
    ap.add_argument("--decode-tokens", type=int, default=1)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--out", default="bench_kernels.json")
    ap.add_argument("--config-out", default=None, help="write the chosen configs here (fused_moe_configs.json)")
    ap.add_argument("--small", action="store_true",
                    help="every format once at a tiny shape in the Triton interpreter on the CPU (no timing)")
    args = ap.parse_args()
    if args.small:
        small_smoke(args.formats)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device (or --small for the interpreter)")
    torch.manual_seed(0)
    ceilings = device_ceilings()
    print(f"device {torch.cuda.get_device_name()}  copy {ceilings['copy_GBps']:.0f} GB/s  "
          f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    rows = []
    for name in args.shapes:
        for fmt_name in args.formats:
            t0 = time.time()
            rows.append(bench_shape(name, SHAPES[name], ceilings, args.tune, args.decode_tokens, args.prefill_tokens,
                                    fmt_name, args.decode_only))
            print(f"  {name} {fmt_name} done in {time.time() - t0:.0f} s: decode {rows[-1]['decode_us']:.1f} us, "
                  f"{100 * rows[-1]['decode_frac_of_copy_bw']:.1f} % of copy", flush=True)
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "ceilings": ceilings, "rows": rows}, f, indent=1)
            if args.config_out:  # merged into the file's other devices and shapes, after every shape
                try:
                    with open(args.config_out) as f:
                        table = json.load(f)
                except FileNotFoundError:
                    table = {}
                table.setdefault(device_key(torch.device("cuda")), {}).update(
                    {shape_key(r["H"], r["I"], r["format"]): r["config"] for r in rows})
                with open(args.config_out, "w") as f:
                    json.dump(table, f, indent=1, sort_keys=True)

    def fmt(v):
        return f"{v:9.1f}" if isinstance(v, float) else "   failed"
    full = [r for r in rows if r["format"] == "float" and "prefill_us" in r]
    if full:
        print("\nshape              | decode us  floor  %copyBW | HF grouped batched  eager  loop "
              "| prefill us floor TFLOP/s %mm | HF grouped  loop")
    for r in full:
        print(f"{r['shape']:18s} | {r['decode_us']:8.1f} {r['decode_floor_us']:6.1f} "
              f"{100 * r['decode_frac_of_copy_bw']:6.1f}% |"
              f"{fmt(r['decode_hf_grouped_mm_us'])}{fmt(r['decode_hf_batched_mm_us'])}{fmt(r['decode_hf_eager_us'])}"
              f"{fmt(r['decode_torch_loop_us'])} | {r['prefill_us']:8.1f} {r['prefill_floor_us']:6.1f} "
              f"{r['prefill_TFLOPs']:6.0f} {100 * r['prefill_frac_of_matmul']:4.1f}% |"
              f"{fmt(r['prefill_hf_grouped_mm_us'])}{fmt(r['prefill_torch_loop_us'])}")
        print(f"{'':18s}   sort {r['prefill_sort_us']:.1f} us;  err decode {r['decode_rel_err_vs_torch_loop']:.1e} "
              f"prefill {r['prefill_rel_err_vs_torch_loop']:.1e}  eager-launched: "
              f"decode {r['decode_eager_launch_us']:.1f} us, prefill {r['prefill_eager_launch_us']:.1f} us")
        print(f"{'':18s}   prefill {r['config']['prefill']}; kernels: "
              + ", ".join(f"{k.split('(')[0]} {v:.1f}" for k, v in r["prefill_kernels_us"].items()))
    # every format: decode at the copy rate counted in packed bytes (target >= 70 %)
    print(f"\ndecode at {args.decode_tokens} token(s), bytes counted as stored (codes + scales + zero points); "
          f"copy {ceilings['copy_GBps']:.0f} GB/s")
    print("shape              format        MB/expert decode us   GB/s  %copy target | err decode  prefill us  err")
    for r in rows:
        pre = (f"{r['prefill_us']:10.1f} {r['prefill_rel_err_vs_torch_loop']:8.1e}" if "prefill_us" in r else "")
        print(f"{r['shape']:18s} {r['format']:13s} {r['expert_bytes'] / 1e6:9.2f} {r['decode_us']:9.1f} "
              f"{r['decode_GBps']:6.0f} {100 * r['decode_frac_of_copy_bw']:5.1f}% "
              f"{'met' if r['decode_frac_of_copy_bw'] >= 0.7 else 'MISSED':6s} | {r['decode_rel_err_vs_torch_loop']:8.1e}  "
              + pre)


if __name__ == "__main__":
    main()
