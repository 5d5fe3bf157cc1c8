"""fused_moe against a float64 torch reference, on random placements with non-resident experts.

CPU runs go through the Triton interpreter (fp32/fp16, tiny shapes); bf16 at real model shapes
runs on a GPU (marked ``gpu``). Every expert format: experts encoded by the tests' reference encoder
(tests/expert_format_reference.py) into the slots, the reference computed on the reference-decoded
weights.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from moerun.kernels.fused_moe import fused_moe, sort_pairs_by_expert
from moerun.kernels.fused_moe_config import DecodeConfig, FusedMoeConfig, GemmTile, PrefillConfig, get_config
from moerun.models.base import ExpertActivation
from moerun.native import EXPERT_FORMATS, slot_layout, slot_views


def _load_format_reference():
    """tests/expert_format_reference.py (the tests import by file: pytest runs in importlib mode)."""
    spec = importlib.util.spec_from_file_location(
        "expert_format_reference", Path(__file__).parents[1] / "expert_format_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


formats = _load_format_reference()

# small blocks so tiny shapes still cover several blocks and the masked edges
# the interpreter on CPU in CI; real kernels where a GPU exists
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = FusedMoeConfig(DecodeConfig(block_n=16, block_h=32, block_out=8, block_i=16),
                      PrefillConfig(block_m=32, tail_m=8, gate_up=GemmTile(16, 16, 4, 2),
                                    down=GemmTile(16, 16, 4, 2, group_m=2), sum_block_h=16))
# weight tiles by TMA descriptors (the interpreter runs them on the CPU), no short tail, other launch orders
TINY_TMA = FusedMoeConfig(TINY.decode, PrefillConfig(block_m=16, tail_m=16,
                                                     gate_up=GemmTile(16, 16, 4, 2, tma=True, group_m=3),
                                                     down=GemmTile(16, 16, 4, 2, tma=True, group_m=0)))


def make_problem(tokens, hidden, inter, experts, top_k, slots, dtype, device, resident_frac=0.7, seed=None):
    """Random experts, a random placement of some of them in a NaN-poisoned arena, random routing."""
    gen = torch.Generator(device=device).manual_seed(seed if seed is not None else torch.seed() % 2**31)
    rand = dict(generator=gen, device=device)
    gate_up = (torch.randn(experts, 2 * inter, hidden, **rand) * hidden ** -0.5).to(dtype)  # [E, 2I, H]
    down = (torch.randn(experts, hidden, inter, **rand) * inter ** -0.5).to(dtype)  # [E, H, I]
    n_resident = min(slots, max(1, round(resident_frac * experts)))
    resident = torch.randperm(experts, **rand)[:n_resident].tolist()
    slot_of = torch.randperm(slots, **rand)[:n_resident].tolist()
    table = torch.full((experts,), -1, dtype=torch.int32, device=device)
    table[resident] = torch.tensor(slot_of, dtype=torch.int32, device=device)
    # unused slots are NaN: reading one poisons the output; the padding of used slots is zero
    layout = slot_layout(dtype, hidden, inter)
    arena = torch.full((slots, layout.slot_elems), float("nan"), dtype=dtype, device=device)
    for e, s in zip(resident, slot_of):
        arena[s] = 0
        slot_gate_up, slot_down = slot_views(layout, arena[s])
        slot_gate_up.copy_(gate_up[e])
        slot_down.copy_(down[e])
    x = torch.randn(tokens, hidden, **rand).to(dtype)  # [T, H]
    ids = torch.stack([torch.randperm(experts, **rand)[:top_k] for _ in range(tokens)]).int()  # [T, K]
    weights = torch.rand(tokens, top_k, **rand)  # [T, K]
    return dict(x=x, ids=ids, weights=weights, table=table, arena=arena, gate_up=gate_up, down=down, inter=inter,
                layout=layout)


def make_format_problem(fmt, tokens, hidden, inter, experts, top_k, slots, dtype, device, resident_frac=0.7,
                        bias=False):
    """make_problem for any expert format: random experts encoded into their slots by the reference
    encoder; gate_up/down are the reference-decoded weights (with ``bias``, the slots hold random biases
    too, gate_up_bias/down_bias as stored). Unused slots are 0xFF bytes: NaN as a float and as an fp32
    scale, so a kernel that reads one poisons the output."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    layout = slot_layout(dtype, hidden, inter, fmt, bias=bias)
    n_resident = min(slots, max(1, round(resident_frac * experts)))
    resident = torch.randperm(experts, generator=gen)[:n_resident].tolist()
    slot_of = torch.randperm(slots, generator=gen)[:n_resident].tolist()
    table = torch.full((experts,), -1, dtype=torch.int32)
    table[resident] = torch.tensor(slot_of, dtype=torch.int32)
    arena = torch.empty((slots, layout.slot_elems), dtype=dtype)
    arena.view(torch.uint8).fill_(0xFF)
    gate_up = torch.zeros(experts, 2 * inter, hidden)  # [E, 2I, H] decoded (zero where not resident)
    down = torch.zeros(experts, hidden, inter)  # [E, H, I]
    gate_up_bias = torch.zeros(experts, 2 * inter)  # [E, 2I] as stored (bias only)
    down_bias = torch.zeros(experts, hidden)  # [E, H]
    for e, s in zip(resident, slot_of):
        gate = torch.randn(inter, hidden, generator=gen) * hidden ** -0.5
        up = torch.randn(inter, hidden, generator=gen) * hidden ** -0.5
        dn = torch.randn(hidden, inter, generator=gen) * inter ** -0.5
        biases = (torch.randn(2 * inter, generator=gen), torch.randn(hidden, generator=gen)) if bias else ()
        slot = formats.encode(layout, gate, up, dn, *biases)  # uint8 [slot_bytes]
        arena[s].view(torch.uint8).copy_(slot)
        gate_up[e], down[e] = formats.decode(layout, slot)
        if bias:
            gate_up_bias[e], down_bias[e] = formats.decode_biases(layout, slot)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)  # [T, H]
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).int()  # [T, K]
    weights = torch.rand(tokens, top_k, generator=gen)  # [T, K]
    p = dict(x=x, ids=ids, weights=weights, table=table, arena=arena, gate_up=gate_up, down=down, inter=inter,
             layout=layout)
    if bias:
        p.update(gate_up_bias=gate_up_bias, down_bias=down_bias)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}


def reference(p, activation=None) -> torch.Tensor:
    """float64 loop over (token, expert) pairs of resident experts (with their biases when p has them)."""
    x = p["x"].cpu().double()
    out = torch.zeros_like(x)  # [T, H]
    ids, weights = p["ids"].cpu(), p["weights"].cpu()
    for e in range(p["table"].shape[0]):
        if p["table"][e].item() < 0:
            continue
        tok, k = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        biases = (p["gate_up_bias"][e].cpu(), p["down_bias"][e].cpu()) if "gate_up_bias" in p else None
        y = formats.expert_output(x[tok], p["gate_up"][e].cpu(), p["down"][e].cpu(), biases, activation)  # [n, H]
        out.index_add_(0, tok, y * weights[tok, k].double()[:, None])
    return out.to(p["x"].device)


def run(p, path=None, config=TINY, ids_dtype=torch.int32, activation=None):
    out = torch.full_like(p["x"], float("nan"))  # poisoned: every element must be written
    got = fused_moe(p["x"], p["ids"].to(ids_dtype), p["weights"], p["table"], p["arena"], p["layout"], out,
                    activation, config=config, path=path)
    assert got is out
    return out


def rel_err(out, ref) -> float:
    assert not torch.isnan(out).any(), "an output element was not written (or a non-resident slot was read)"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path,tokens", [("decode", 1), ("decode", 5), ("prefill", 21), ("prefill", 70)])
def test_fused_moe_matches_reference_interpreter(dtype, path, tokens):
    p = make_problem(tokens, hidden=40, inter=24, experts=7, top_k=3, slots=6, dtype=dtype, device=DEVICE)
    assert rel_err(run(p, path), reference(p)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_with_tma_weight_tiles_matches_reference_interpreter(dtype):
    # slot elements divisible by H and I: the arena is read through descriptors (rows of H, rows of I)
    p = make_problem(37, hidden=40, inter=24, experts=7, top_k=3, slots=9, dtype=dtype, device=DEVICE)
    assert p["arena"].shape[1] % 40 == 0 and p["arena"].shape[1] % 24 == 0
    assert rel_err(run(p, "prefill", config=TINY_TMA), reference(p)) < TOL[dtype]


def test_both_paths_agree_with_int64_ids_and_odd_sizes():
    p = make_problem(9, hidden=33, inter=17, experts=5, top_k=2, slots=5, dtype=torch.float32, device=DEVICE)
    ref = reference(p)
    for path in ("decode", "prefill"):
        assert rel_err(run(p, path, ids_dtype=torch.int64), ref) < TOL[torch.float32]
    # H = 33 rows are not 16-byte aligned: the TMA config falls back to pointer loads
    assert rel_err(run(p, "prefill", config=TINY_TMA), ref) < TOL[torch.float32]


def test_no_resident_expert_gives_zeros():
    p = make_problem(3, hidden=32, inter=16, experts=4, top_k=2, slots=2, dtype=torch.float32, device=DEVICE)
    p["table"].fill_(-1)
    for path in ("decode", "prefill"):
        assert torch.equal(run(p, path), torch.zeros_like(p["x"]))


def check_pair_blocks(ids, table, sorted_pairs, blocks, block_m, tail_m):
    """Every resident pair exactly once, in a block of its expert; each expert's blocks contiguous, in
    expert order, full-size, then the rest rounded up to tail_m in halving sizes; then unused
    blocks (expert E); padding rows in blocks hold the sentinel P."""
    experts, flat = table.numel(), ids.reshape(-1)
    pairs = flat.numel()
    counts = torch.bincount(flat[table[flat] >= 0], minlength=experts).tolist()
    want_expert, want_rows = [], []
    for e, c in enumerate(counts):
        full, rem = divmod(c, block_m)
        rest = -(-rem // tail_m) * tail_m  # rounded up to tail_m
        if rest == block_m:
            full, rest = full + 1, 0
        short = [size for size in (block_m // 2, block_m // 4) if size >= tail_m and rest & size]
        want_expert += [e] * (full + len(short))
        want_rows += [block_m] * full + short
    block_expert, first, rows = blocks.tolist()
    n = len(want_expert)
    assert block_expert[:n] == want_expert and rows[:n] == want_rows
    assert all(e == experts for e in block_expert[n:])
    # blocks tile the sorted rows from 0 without gaps or overlap
    assert first[:n] == [sum(want_rows[:i]) for i in range(n)]
    assert sum(want_rows) <= sorted_pairs.numel()
    seen = []
    for e, f, r in zip(block_expert[:n], first[:n], rows[:n]):
        real = [q for q in sorted_pairs[f:f + r].tolist() if q < pairs]
        assert real and all(flat[q].item() == e for q in real)
        seen += real
    assert sorted(seen) == [q for q in range(pairs) if table[flat[q]] >= 0]
    used = sorted_pairs[:sum(want_rows)]  # rows past the last block are never read (nor written)
    assert ((used < pairs) | (used == pairs)).all()
    assert (used < pairs).sum().item() == len(seen)


def test_sort_pairs_by_expert_groups_resident_pairs_in_blocks():
    ids = torch.tensor([[0, 2], [2, 3], [1, 0], [3, 2]], dtype=torch.int32)  # P = 8
    table = torch.tensor([5, -1, 0, 1], dtype=torch.int32)  # expert 1 not resident
    sorted_pairs, blocks = sort_pairs_by_expert(ids.to(DEVICE), table.to(DEVICE), block_m=4, tail_m=2)
    assert blocks.cpu().tolist()[0][:3] == [0, 2, 3]  # experts with pairs, in order; 1 is skipped
    assert blocks.cpu().tolist()[2][:3] == [2, 4, 2]  # 2 pairs: a short block; 3 pairs: a full one
    check_pair_blocks(ids, table, sorted_pairs.cpu(), blocks.cpu(), 4, 2)


@pytest.mark.parametrize("block_m,tail_m", [(1, 1), (16, 16), (16, 4), (64, 32), (128, 32)])
def test_sort_pairs_by_expert_random_routings(block_m, tail_m):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for tokens, experts, top_k in [(300, 13, 3), (2100, 64, 8), (5, 3, 1)]:
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])  # [T, K]
        table = torch.randperm(experts, generator=gen).int()
        table[torch.rand(experts, generator=gen) < 0.3] = -1
        sorted_pairs, blocks = sort_pairs_by_expert(ids.to(DEVICE), table.to(DEVICE), block_m, tail_m)
        check_pair_blocks(ids, table, sorted_pairs.cpu(), blocks.cpu(), block_m, tail_m)


def test_sort_pairs_rejects_a_tail_that_does_not_divide_the_block():
    ids, table = torch.zeros(2, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="tail_m"):
        sort_pairs_by_expert(ids.to(DEVICE), table.to(DEVICE), block_m=16, tail_m=2)


def test_rejects_mismatched_arena_dtype():
    p = make_problem(2, hidden=32, inter=16, experts=4, top_k=2, slots=3, dtype=torch.float32, device=DEVICE)
    with pytest.raises(TypeError, match="arena dtype"):
        fused_moe(p["x"], p["ids"], p["weights"], p["table"], p["arena"].half(), p["layout"])


def test_rejects_an_arena_of_another_layout():
    p = make_problem(2, hidden=32, inter=16, experts=4, top_k=2, slots=3, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="slot_elems|slots are"):
        fused_moe(p["x"], p["ids"], p["weights"], p["table"], p["arena"], slot_layout(torch.float32, 32, 32))
    with pytest.raises(ValueError, match="slots are"):  # same H, I and dtype, another format
        fused_moe(p["x"], p["ids"], p["weights"], p["table"], p["arena"], slot_layout(torch.float32, 32, 16, "fp8"))
    with pytest.raises(TypeError, match="SlotLayout"):  # the old signature's inter_size
        fused_moe(p["x"], p["ids"], p["weights"], p["table"], p["arena"], 16)
    with pytest.raises(TypeError, match="slot layout is for"):
        fused_moe(p["x"], p["ids"], p["weights"], p["table"], p["arena"], slot_layout(torch.float16, 32, 16))


# (H, I, E, K) of Qwen1.5-MoE, Mixtral, OLMoE, DeepSeek-V2-Lite, and an odd shape
GPU_SHAPES = {
    "qwen1.5-moe": (2048, 1408, 60, 4),
    "mixtral": (4096, 14336, 8, 2),
    "olmoe": (2048, 1024, 64, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "odd": (1000, 333, 13, 3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_fused_moe_bf16_real_shapes_gpu(shape, tokens):
    hidden, inter, experts, top_k = GPU_SHAPES[shape]
    slots = min(experts, 6) if shape == "mixtral" else experts  # Mixtral experts are 352 MB each
    p = make_problem(tokens, hidden, inter, experts, top_k, slots, torch.bfloat16, "cuda")
    out = torch.full_like(p["x"], float("nan"))
    fused_moe(p["x"], p["ids"], p["weights"], p["table"], p["arena"], p["layout"], out)  # tuned default config
    torch.cuda.synchronize()
    assert rel_err(out, reference(p)) < TOL[torch.bfloat16]


def test_tuned_config_table_loads_and_names_known_fields():
    import json
    from moerun.kernels.fused_moe_config import CONFIG_FILE

    from moerun.kernels.fused_moe_config import DEFAULTS_KEY

    table = json.loads(CONFIG_FILE.read_text())
    for device, shapes in table.items():
        for key, entry in shapes.items():
            if device == DEFAULTS_KEY:
                assert key in EXPERT_FORMATS and key != "float", key  # the float defaults are the dataclasses'
            else:
                hidden, inter, *fmt = key.split(",")
                assert int(hidden) > 0 and int(inter) > 0 and all(f in EXPERT_FORMATS for f in fmt), (device, key)
            cfg = FusedMoeConfig.from_dict(entry)  # raises on an unknown field
            assert cfg.prefill.block_m >= 16 and cfg.decode.block_n >= 1, (device, key)
    # tuned in bf16; fp32 takes the defaults, whose shared-memory stages fit at 4 bytes an element
    assert get_config(torch.device("cpu"), 2048, 1408, torch.float32) == FusedMoeConfig()


# ---- expert formats -------------------------------------------------------------------------------------------
# small blocks, as TINY, sized so tiny shapes still take several steps of every loop and a vector of
# 16 bytes of codes (16 or 32 columns) fits a step; the prefill's reduction step stays within the
# smallest group (32)
TINY_Q = FusedMoeConfig(DecodeConfig(block_n=32, block_h=64, block_out=32, block_i=64),
                        PrefillConfig(block_m=16, tail_m=4, gate_up=GemmTile(32, 32, 4, 2),
                                      down=GemmTile(64, 32, 4, 2, group_m=2), sum_block_h=64))
# tolerance on the decoded weights: the kernels compute with exactly those values (decode, and the
# prefill in fp32), or round them to x's dtype for tl.dot (prefill in fp16)
FORMAT_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("fmt", EXPERT_FORMATS)
@pytest.mark.parametrize("path,tokens", [("decode", 2), ("prefill", 9)])
def test_every_expert_format_matches_reference_interpreter(fmt, path, tokens):
    # H and I multiples of 128: every format's group divides them (fp8-block128: one block of each)
    p = make_format_problem(fmt, tokens, hidden=128, inter=128, experts=4, top_k=2, slots=3,
                            dtype=torch.float32, device=DEVICE)
    assert rel_err(run(p, path, config=TINY_Q), reference(p)) < FORMAT_TOL[torch.float32]


@pytest.mark.parametrize("fmt", ["fp8-block128", "int4-g64"])
@pytest.mark.parametrize("path,tokens", [("decode", 2), ("prefill", 9)])
def test_expert_formats_with_fp16_activations_interpreter(fmt, path, tokens):
    p = make_format_problem(fmt, tokens, hidden=128, inter=128, experts=4, top_k=2, slots=3,
                            dtype=torch.float16, device=DEVICE)
    assert rel_err(run(p, path, config=TINY_Q), reference(p)) < FORMAT_TOL[torch.float16]


@pytest.mark.parametrize("fmt", ["fp8-block128", "int8"])
@pytest.mark.parametrize("path,tokens", [("decode", 2), ("prefill", 9)])
def test_8bit_formats_with_partial_blocks_and_vectors_interpreter(fmt, path, tokens):
    # H = 136, I = 72: partial fp8 blocks (gate and up blocked apart) and a partial 16-byte vector a row
    p = make_format_problem(fmt, tokens, hidden=136, inter=72, experts=3, top_k=2, slots=3,
                            dtype=torch.float32, device=DEVICE, resident_frac=1.0)
    assert rel_err(run(p, path, config=TINY_Q), reference(p)) < FORMAT_TOL[torch.float32]


@pytest.mark.parametrize("fmt", EXPERT_FORMATS)
def test_every_expert_format_has_a_launch_config_the_kernels_take(fmt):
    layout = slot_layout(torch.bfloat16, 2048, 1408 if fmt not in ("int4-g128",) else 1536, fmt)
    cfg = get_config(torch.device("cpu"), layout.hidden_size, layout.inter_size, torch.bfloat16, fmt)
    if layout.quantized:
        vc = 128 // layout.weight_bits
        assert cfg.decode.block_h % vc == 0 and cfg.decode.block_i % vc == 0
        assert not cfg.prefill.gate_up.tma and not cfg.prefill.down.tma
        if layout.group_size:
            assert layout.group_size % cfg.prefill.gate_up.block_k == 0
            assert layout.group_size % cfg.prefill.down.block_k == 0


def test_a_config_that_breaks_a_format_constraint_is_named():
    p = make_format_problem("int4-g32", 2, hidden=64, inter=64, experts=2, top_k=1, slots=2,
                            dtype=torch.float32, device=DEVICE)
    bad = FusedMoeConfig(DecodeConfig(block_h=16), TINY_Q.prefill)  # 16 columns: half a vector of nibbles
    with pytest.raises(ValueError, match="block_h=16"):
        run(p, "decode", config=bad)
    bad = FusedMoeConfig(TINY_Q.decode, PrefillConfig(block_m=32, tail_m=8, gate_up=GemmTile(16, 64, 4, 2)))
    with pytest.raises(ValueError, match="gate_up.block_k=64"):
        run(p, "prefill", config=bad)


# (H, I, E, K, slots) at real shapes, few experts: they are encoded on the CPU by the reference encoder
GPU_FORMAT_SHAPES = {
    "qwen1.5-moe": (2048, 1408, 8, 4, 6),
    "olmoe": (2048, 1024, 8, 8, 6),
    "mixtral": (4096, 14336, 3, 2, 2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", EXPERT_FORMATS)
@pytest.mark.parametrize("shape", list(GPU_FORMAT_SHAPES))
@pytest.mark.parametrize("tokens", [1, 300])
def test_every_expert_format_bf16_real_shapes_gpu(fmt, shape, tokens):
    hidden, inter, experts, top_k, slots = GPU_FORMAT_SHAPES[shape]
    p = make_format_problem(fmt, tokens, hidden, inter, experts, top_k, slots, torch.bfloat16, "cuda")
    out = torch.full_like(p["x"], float("nan"))
    fused_moe(p["x"], p["ids"], p["weights"], p["table"], p["arena"], p["layout"], out)  # default config
    torch.cuda.synchronize()
    assert rel_err(out, reference(p)) < FORMAT_TOL[torch.bfloat16]


def test_the_kernels_codes_are_the_native_format_kinds():
    # The kernels branch on SlotLayout.kind: their codes must be the native enum's, name for name, and
    # every format of the one list must have a kind the kernels compute.
    from moerun.kernels.fused_moe import KERNEL_KINDS
    from moerun.native import EXPERT_FORMATS, FORMAT_KINDS

    assert {name: code.value for name, code in KERNEL_KINDS.items()} == {n: i for i, n in enumerate(FORMAT_KINDS)}
    for fmt in EXPERT_FORMATS:
        assert FORMAT_KINDS[slot_layout(torch.float32, 128, 128, fmt).kind] in KERNEL_KINDS


# ---- expert activations and biases (gpt-oss) ----------------------------------------------------------------
# the clamp at 0.6: the gate and up values (x ~ N(0, 1), unit-variance rows, biases ~ N(0, 1)) pass it often,
# on both sides for up
SWIGLU = ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.6, bias=True)


@pytest.mark.parametrize("fmt", ["float", "fp8", "int8", "int4-g32", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path,tokens", [("decode", 3), ("prefill", 11)])
def test_biases_and_the_clamped_swiglu_match_reference_interpreter(fmt, dtype, path, tokens):
    p = make_format_problem(fmt, tokens, hidden=128, inter=64, experts=5, top_k=3, slots=4, dtype=dtype,
                            device=DEVICE, bias=True)
    ref = reference(p, SWIGLU)
    assert rel_err(run(p, path, config=TINY_Q, activation=SWIGLU), ref) < FORMAT_TOL[dtype]
    # the clamp is exercised: gate values above the limit, up values beyond it on both sides
    x, gu, b = p["x"].cpu().double(), p["gate_up"].cpu().double(), p["gate_up_bias"].cpu().double()
    gate = torch.einsum("th,eih->tei", x, gu[:, :64]) + b[None, :, :64]
    up = torch.einsum("th,eih->tei", x, gu[:, 64:]) + b[None, :, 64:]
    assert (gate > SWIGLU.limit).any() and (up > SWIGLU.limit).any() and (up < -SWIGLU.limit).any()


@pytest.mark.parametrize("path,tokens", [("decode", 2), ("prefill", 9)])
def test_biases_with_silu_and_swiglu_without_biases_interpreter(path, tokens):
    # the two are independent: a bias layout under silu, and the clamped activation over a slot without biases
    p = make_format_problem("float", tokens, hidden=64, inter=32, experts=4, top_k=2, slots=3,
                            dtype=torch.float32, device=DEVICE, bias=True)
    assert rel_err(run(p, path, config=TINY_Q), reference(p)) < FORMAT_TOL[torch.float32]
    p = make_format_problem("fp8", tokens, hidden=64, inter=32, experts=4, top_k=2, slots=3,
                            dtype=torch.float32, device=DEVICE)
    assert rel_err(run(p, path, config=TINY_Q, activation=SWIGLU), reference(p, SWIGLU)) < FORMAT_TOL[torch.float32]


def test_an_unknown_activation_or_a_bad_limit_is_named():
    p = make_format_problem("float", 2, hidden=64, inter=32, experts=2, top_k=1, slots=2,
                            dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="gelu"):
        run(p, activation=ExpertActivation("gelu"))
    with pytest.raises(ValueError, match="limit"):
        run(p, activation=ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.0))


def test_the_kernels_activation_codes_are_the_native_ones():
    from moerun.kernels.fused_moe import KERNEL_ACTIVATIONS
    from moerun.native import EXPERT_ACTIVATIONS

    assert {name: code.value for name, code in KERNEL_ACTIVATIONS.items()} == {
        n: i for i, n in enumerate(EXPERT_ACTIVATIONS)}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["float", "mxfp4"])
@pytest.mark.parametrize("tokens", [1, 4, 300])
def test_gpt_oss_shape_with_biases_bf16_gpu(fmt, tokens):
    # gpt-oss-20b's expert shape: H = I = 2880, 32 experts, top-4, swiglu_limit 7 (the published config)
    act = ExpertActivation("swiglu_clamped", alpha=1.702, limit=7.0, bias=True)
    p = make_format_problem(fmt, tokens, 2880, 2880, 32, 4, 24, torch.bfloat16, "cuda", bias=True)
    out = torch.full_like(p["x"], float("nan"))
    fused_moe(p["x"], p["ids"], p["weights"], p["table"], p["arena"], p["layout"], out, act)  # default config
    torch.cuda.synchronize()
    assert rel_err(out, reference(p, act)) < FORMAT_TOL[torch.bfloat16]
