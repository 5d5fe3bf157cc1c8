"""CpuExecutor: SwiGLU experts on host threads against a plain torch reference."""
import pytest
import torch
import torch.nn.functional as F

from moerun.native import CpuExecutor, HostPool

H, I, E = 64, 40, 6  # I=40 and H=64: kernels' vector tails and main loops both run


def reference(x, ids, weights, experts, params):
    """sum over (t, k) with ids[t, k] in experts of weights[t, k] * down(silu(gate x) * up x), in fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    xf = x.float()
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e in experts:
                gate, up, down = (w.float() for w in params[e])
                h = F.silu(xf[t] @ gate.T) * (xf[t] @ up.T)
                out[t] += weights[t, k] * (h @ down.T)
    return out


def make_pool(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = HostPool(2, E, H, I, dtype)
    params = {}
    for e in range(E):
        gate, up, down = (torch.randn(s, generator=g) / s[1] ** 0.5 for s in ((I, H), (I, H), (H, I)))
        pool.write_expert(1, e, gate, up, down)
        params[e] = [w.to(dtype) for w in (gate, up, down)]  # what the pool holds
    return pool, params


@pytest.fixture(scope="module")
def executor():
    return CpuExecutor(num_threads=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_matches_torch_reference(executor, dtype, tokens):
    pool, params = make_pool(dtype)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(tokens)]).to(torch.int32)  # [T, K]
    weights = torch.rand(tokens, 3, generator=g)
    experts = [0, 2, 3, 5]
    out = torch.full((tokens, H), float("nan"))
    executor.submit(pool, 1, x, ids, weights, experts, out)
    executor.wait()
    want = reference(x, ids, weights, experts, params)
    # bf16 paths may round activations to bf16 (AVX-512-BF16), as a bf16 model's are.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, want, **tol)


def test_tokens_with_no_cpu_expert_get_zero_rows(executor):
    pool, params = make_pool(torch.float32)
    x = torch.randn(2, H)
    ids = torch.tensor([[0, 1], [4, 5]])
    out = torch.full((2, H), 7.0)
    executor.submit(pool, 1, x, ids, torch.ones(2, 2), [0], out)
    executor.wait()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, reference(x, ids, torch.ones(2, 2), [0], params))


def test_repeated_jobs_reuse_the_pool_and_stay_correct(executor):
    pool, params = make_pool(torch.float32, seed=3)
    for step in range(20):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(1, H, generator=g)
        ids = torch.randperm(E, generator=g)[:2].view(1, 2)
        experts = [int(ids[0, step % 2])]
        out = torch.empty(1, H)
        executor.submit(pool, 1, x, ids, torch.tensor([[0.7, 0.3]]), experts, out)
        executor.wait()
        torch.testing.assert_close(out, reference(x, ids, torch.tensor([[0.7, 0.3]]), experts, params))


def test_every_isa_this_cpu_offers_agrees(monkeypatch):
    pool, params = make_pool(torch.bfloat16, seed=5)
    x = torch.randn(2, H).bfloat16()
    ids = torch.tensor([[1, 2], [2, 3]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    want = reference(x, ids, w, [1, 2, 3], params)
    best = CpuExecutor(1).isa
    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
    for isa in order[: order.index(best) + 1]:
        monkeypatch.setenv("MOERUN_CPU_ISA", isa)
        ex = CpuExecutor(1)
        assert ex.isa == isa
        out = torch.empty(2, H)
        ex.submit(pool, 1, x, ids, w, [1, 2, 3], out)
        ex.wait()
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


def test_defaults_to_physical_cores_but_one_and_reports_isa():
    from moerun.native import physical_cores

    ex = CpuExecutor()
    assert ex.num_threads == max(1, physical_cores() - 1)
    assert ex.isa in {"scalar", "avx2", "avx512", "avx512_bf16"}


def test_bad_inputs_are_rejected_before_work(executor):
    pool, _ = make_pool(torch.float32)
    x, ids, w = torch.randn(2, H), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2)
    with pytest.raises(ValueError, match="hidden size is 64"):
        executor.submit(pool, 1, torch.randn(2, H + 1), ids, w, [0], torch.empty(2, H))
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        executor.submit(pool, 1, x, ids, w, [0], torch.empty(2, H, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        executor.submit(pool, 1, x, ids, w.double(), [0], torch.empty(2, H))
    with pytest.raises(IndexError, match="expert 9"):
        executor.submit(pool, 1, x, ids, w, [9], torch.empty(2, H))
