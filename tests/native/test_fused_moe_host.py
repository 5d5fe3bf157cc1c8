"""The CPU device's fused MoE over a host arena equals a float64 reference on the slots' weights, in every
expert format (the reference decodes the slots with tests/expert_format_reference.py)."""
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moerun import native
from moerun.models.base import ExpertActivation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import expert_format_reference as ref  # noqa: E402


def shape_for(fmt: str) -> tuple[int, int]:
    """(H, I): group formats need multiples of their group (128 at most); the others get sizes that leave
    vector tails (96 = 3 * 32, 40 = 2 * 16 + 8) and, for fp8-block128, partial blocks (200 = 128 + 72)."""
    if fmt.startswith("int4") or fmt == "mxfp4":
        return 256, 128
    return (96, 40) if fmt == "float" else (168, 200)


def _arena(layout, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[N, slot_elems] of layout.dtype, each slot a random expert encoded in layout.format."""
    H, I = layout.hidden_size, layout.inter_size
    arena = torch.empty(num_slots, layout.slot_elems, dtype=layout.dtype)
    for s in range(num_slots):
        gate, up, down = (torch.randn(r, c, generator=gen) / c ** 0.5 for r, c in ((I, H), (I, H), (H, I)))
        native.encode_expert(layout, gate, up, down, out=arena[s])
    return arena


def _reference(x, ids, weights, table, arena, layout) -> torch.Tensor:
    """Sum over resident pairs of w * down(silu(gate(x)) * up(x)), in float64 on the decoded weights."""
    inter = layout.inter_size
    decoded = {}
    y = torch.zeros(x.shape, dtype=torch.float64)  # [T, H]
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            slot = int(table[ids[t, k]])
            if slot < 0:
                continue
            if slot not in decoded:
                decoded[slot] = [w.double() for w in ref.decode(layout, arena[slot])]
            gate_up, down = decoded[slot]
            xt = x[t].double()
            h = F.silu(gate_up[:inter] @ xt) * (gate_up[inter:] @ xt)  # [I]
            y[t] += float(weights[t, k]) * (down @ h)
    return y


@pytest.mark.parametrize("fmt", native.EXPERT_FORMATS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_matches_a_float64_reference_with_experts_missing(fmt, dtype, tol, tokens):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    experts, top_k = 12, 3
    layout = native.slot_layout(dtype, *shape_for(fmt), fmt)
    arena = _arena(layout, 8, gen)
    table = torch.full((experts,), -1, dtype=torch.int32)
    table[torch.randperm(experts, generator=gen)[:7]] = torch.randperm(8, generator=gen)[:7].int()  # 5 not resident
    x = torch.randn(tokens, layout.hidden_size, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])  # [T, K]
    weights = torch.rand(tokens, top_k, generator=gen)
    out = torch.full_like(x, float("nan"))
    got = native.fused_moe_host(x, ids, weights, table, arena, layout, out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    want = _reference(x, ids, weights, table, arena, layout)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item(),
                               msg=lambda m: f"seed {seed}: {m}")


def test_a_token_with_no_resident_expert_gets_zeros():
    layout = native.slot_layout(torch.float32, 64, 32)
    arena = _arena(layout, 2, torch.Generator().manual_seed(0))
    table = torch.tensor([0, -1, -1, 1], dtype=torch.int32)
    ids = torch.tensor([[1, 2], [0, 3]])
    y = native.fused_moe_host(torch.randn(2, 64), ids, torch.rand(2, 2), table, arena, layout)
    assert torch.count_nonzero(y[0]) == 0 and torch.count_nonzero(y[1]) > 0


LAYOUT = native.slot_layout(torch.float32, 64, 32)


@pytest.mark.parametrize("change,message", [
    (dict(ids=torch.tensor([[0, 9]])), r"expert id 9 is outside \[0, 4\)"),
    (dict(table=torch.tensor([0, 5, -1, -1], dtype=torch.int32)), r"slot 5 of expert 1 is outside the arena's 2"),
    (dict(layout=native.slot_layout(torch.float32, 64, 48)),
     r"slot_elems = \d+ \(a float slot of \(H=64, I=48\)\), got \[2, \d+\]"),
    (dict(layout=native.slot_layout(torch.float32, 64, 32, "int8")), r"\(a int8 slot of \(H=64, I=32\)\)"),
    (dict(layout=native.slot_layout(torch.float32, 128, 32)), r"x is \[1, 64\] but the layout's hidden_size is 128"),
    (dict(layout=native.slot_layout(torch.bfloat16, 64, 32)), "must both be the layout's dtype BFloat16"),
    (dict(x=torch.randn(1, 64).half()), r"x \(Half\) and the arena \(Float\) must both be the layout's dtype Float"),
    (dict(weights=torch.rand(1, 2).double()), "topk_weights must be float32"),
])
def test_bad_arguments_are_clear_errors(change, message):
    args = dict(x=torch.randn(1, 64), ids=torch.tensor([[0, 1]]), weights=torch.rand(1, 2),
                table=torch.tensor([0, 1, -1, -1], dtype=torch.int32),
                arena=_arena(LAYOUT, 2, torch.Generator().manual_seed(0)), layout=LAYOUT)
    args.update(change)
    with pytest.raises((ValueError, IndexError), match=message):
        native.fused_moe_host(args["x"], args["ids"], args["weights"], args["table"], args["arena"], args["layout"])


# -- expert activations and biases (gpt-oss) ---------------------------------------------------------------------
# the clamp at 0.6: gate and up values (x ~ N(0, 1), unit-variance rows, biases ~ N(0, 1)) pass it often
SWIGLU = ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.6, bias=True)


@pytest.mark.parametrize("fmt", ["float", "fp8", "int8", "int4-g32", "mxfp4"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tokens", [1, 19])
def test_biases_and_the_clamped_swiglu_match_a_float64_reference(fmt, dtype, tol, tokens):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    experts, top_k, hidden, inter = 6, 2, 128, 64
    layout = native.slot_layout(dtype, hidden, inter, fmt, bias=True)
    arena = torch.empty(4, layout.slot_elems, dtype=dtype)
    for s in range(4):
        gate, up, down = (torch.randn(r, c, generator=gen) / c ** 0.5 for r, c in ((inter, hidden), (inter, hidden), (hidden, inter)))
        native.encode_expert(layout, gate, up, down, out=arena[s], gate_up_bias=torch.randn(2 * inter, generator=gen),
                             down_bias=torch.randn(hidden, generator=gen))
    table = torch.tensor([2, -1, 0, 3, -1, 1], dtype=torch.int32)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])  # [T, K]
    weights = torch.rand(tokens, top_k, generator=gen)
    got = native.fused_moe_host(x, ids, weights, table, arena, layout, activation=SWIGLU)
    want = torch.zeros(tokens, hidden, dtype=torch.float64)
    clamped = False
    for t in range(tokens):
        for k in range(top_k):
            slot = int(table[ids[t, k]])
            if slot >= 0:
                gate_up, down = ref.decode(layout, arena[slot])
                biases = ref.decode_biases(layout, arena[slot])
                want[t] += float(weights[t, k]) * ref.expert_output(x[t:t + 1], gate_up, down, biases, SWIGLU)[0]
                pre = gate_up.double() @ x[t].double() + biases[0].double()
                clamped |= bool((pre[:inter] > SWIGLU.limit).any() and (pre[inter:].abs() > SWIGLU.limit).any())
    assert clamped or tokens == 1  # the clamp is exercised (one token may miss it)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item(),
                               msg=lambda m: f"seed {seed}: {m}")


def test_an_activation_is_checked_against_the_native_list():
    arena = _arena(LAYOUT, 2, torch.Generator().manual_seed(0))
    args = (torch.randn(1, 64), torch.tensor([[0, 1]]), torch.rand(1, 2), torch.tensor([0, 1, -1, -1], dtype=torch.int32),
            arena, LAYOUT)
    with pytest.raises(ValueError, match="unknown expert activation 'gelu': the activations are silu, swiglu_clamped"):
        native.fused_moe_host(*args, activation=ExpertActivation("gelu"))
    with pytest.raises(ValueError, match="positive finite limit"):
        native.fused_moe_host(*args, activation=ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.0))
    with pytest.raises(ValueError, match="ExpertActivation"):
        native.fused_moe_host(*args, activation="silu")
    assert native.EXPERT_ACTIVATIONS == ("silu", "swiglu_clamped")
