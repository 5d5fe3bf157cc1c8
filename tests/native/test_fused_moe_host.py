"""The CPU device's fused MoE over a host arena equals a float64 reference on the slots' weights."""
import pytest
import torch
import torch.nn.functional as F

from moerun import native


def _arena(layout, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(num_slots, layout.slot_elems, generator=gen) * 0.1).to(layout.dtype)  # [N, S]


def _reference(x, ids, weights, table, arena, layout) -> torch.Tensor:
    """Sum over resident pairs of w * down(silu(gate(x)) * up(x)), in float64."""
    inter = layout.inter_size
    y = torch.zeros(x.shape, dtype=torch.float64)  # [T, H]
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            slot = int(table[ids[t, k]])
            if slot < 0:
                continue
            gate_up, down = (w.double() for w in native.slot_views(layout, arena[slot]))
            xt = x[t].double()
            h = F.silu(gate_up[:inter] @ xt) * (gate_up[inter:] @ xt)  # [I]
            y[t] += float(weights[t, k]) * (down @ h)
    return y


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_matches_a_float64_reference_with_experts_missing(dtype, tol, tokens):
    gen = torch.Generator().manual_seed(tokens)
    hidden, inter, experts, top_k = 96, 40, 12, 3
    layout = native.slot_layout(dtype, hidden, inter)
    arena = _arena(layout, 8, gen)
    table = torch.full((experts,), -1, dtype=torch.int32)
    table[torch.randperm(experts, generator=gen)[:7]] = torch.randperm(8, generator=gen)[:7].int()  # 5 not resident
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])  # [T, K]
    weights = torch.rand(tokens, top_k, generator=gen)
    out = torch.full_like(x, float("nan"))
    got = native.fused_moe_host(x, ids, weights, table, arena, inter, out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    want = _reference(x, ids, weights, table, arena, layout)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_a_token_with_no_resident_expert_gets_zeros():
    layout = native.slot_layout(torch.float32, 64, 32)
    arena = _arena(layout, 2, torch.Generator().manual_seed(0))
    table = torch.tensor([0, -1, -1, 1], dtype=torch.int32)
    ids = torch.tensor([[1, 2], [0, 3]])
    y = native.fused_moe_host(torch.randn(2, 64), ids, torch.rand(2, 2), table, arena, 32)
    assert torch.count_nonzero(y[0]) == 0 and torch.count_nonzero(y[1]) > 0


@pytest.mark.parametrize("change,message", [
    (dict(ids=torch.tensor([[0, 9]])), r"expert id 9 is outside \[0, 4\)"),
    (dict(table=torch.tensor([0, 5, -1, -1], dtype=torch.int32)), r"slot 5 of expert 1 is outside the arena's 2"),
    (dict(inter=48), r"arena rows hold .* a slot of \(H=64, I=48\)"),
    (dict(weights=torch.rand(1, 2).double()), "topk_weights must be float32"),
])
def test_bad_arguments_are_clear_errors(change, message):
    layout = native.slot_layout(torch.float32, 64, 32)
    args = dict(x=torch.randn(1, 64), ids=torch.tensor([[0, 1]]), weights=torch.rand(1, 2),
                table=torch.tensor([0, 1, -1, -1], dtype=torch.int32),
                arena=_arena(layout, 2, torch.Generator().manual_seed(0)), inter=32)
    args.update(change)
    with pytest.raises((ValueError, IndexError), match=message):
        native.fused_moe_host(args["x"], args["ids"], args["weights"], args["table"], args["arena"], args["inter"])
