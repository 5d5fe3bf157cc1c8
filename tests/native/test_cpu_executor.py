"""CpuExecutor: SwiGLU experts on host threads against a plain torch reference."""
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moerun.models.base import ExpertActivation
from moerun.native import EXPERT_FORMATS, CpuExecutor, HostPool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import expert_format_reference as ref  # noqa: E402

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


def test_one_thread_runs_the_job_on_the_caller_inside_wait():
    # num_threads counts the caller: with one there are no workers, and wait() does all the work.
    ex = CpuExecutor(num_threads=1)
    assert ex.num_threads == 1
    pool, params = make_pool(torch.float32, seed=5)
    x, ids, w = torch.randn(3, H), torch.tensor([[0, 1], [2, 3], [1, 4]]), torch.rand(3, 2)
    out = torch.full((3, H), float("nan"))
    ex.submit(pool, 1, x, ids, w, [1, 2, 4], out)
    assert ex.busy  # nothing ran yet: no worker took a task
    ex.wait()
    assert not ex.busy
    torch.testing.assert_close(out, reference(x, ids, w, [1, 2, 4], params))


def test_more_threads_than_cores_back_to_back_and_after_sleeps_stay_correct():
    # Workers outnumber the cores (2 on CI): some wake after the caller and the others have finished
    # a phase or the whole job, and must neither run a task twice nor read the next job's phases.
    import time

    ex = CpuExecutor(num_threads=8)
    pool, params = make_pool(torch.float32, seed=6)
    for step in range(60):
        g = torch.Generator().manual_seed(100 + step)
        t = 1 + step % 3
        x = torch.randn(t, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(t)])  # [T, 3]
        w = torch.rand(t, 3, generator=g)
        experts = sorted({int(e) for e in ids.flatten()})[: 1 + step % 4]
        out = torch.full((t, H), float("nan"))
        ex.submit(pool, 1, x, ids, w, experts, out)
        if step % 5 == 0:
            time.sleep(0.002)  # longer than the workers' spin: they sleep before the next job
        ex.wait()
        torch.testing.assert_close(out, reference(x, ids, w, experts, params), msg=lambda m: f"step {step}: {m}")


def test_last_job_us_is_the_workers_time_not_the_callers(executor):
    # The cost model learns the CPU's rate from it: time the caller spends elsewhere between submit
    # and wait (here a sleep, in a decode step a kernel launch that compiles) must not count.
    import time

    pool, _ = make_pool(torch.float32)
    ids = torch.tensor([[0, 1]])
    executor.submit(pool, 1, torch.randn(1, H), ids, torch.ones(1, 2), [0, 1], torch.empty(1, H))
    time.sleep(0.3)
    executor.wait()
    assert 0 < executor.last_job_us < 0.2e6


ISAS = ["scalar", "avx2", "avx512", "avx512_bf16", "amx_bf16"]


def reference64(x, ids, weights, experts, params):
    """The float64 reference: same weights and activations as the executor reads, exact arithmetic."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e in experts:
                gate, up, down = (w.double() for w in params[e])
                h = F.silu(x[t].double() @ gate.T) * (x[t].double() @ up.T)
                out[t] += float(weights[t, k]) * (h @ down.T)
    return out


def _run_every_isa(monkeypatch, isas, tokens, hidden, inter):
    g = torch.Generator().manual_seed(tokens)
    pool = HostPool(2, E, hidden, inter, torch.bfloat16)
    params = {}
    for e in range(E):
        gate, up, down = (torch.randn(s, generator=g) / s[1] ** 0.5 for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
        pool.write_expert(1, e, gate, up, down)
        params[e] = [w.bfloat16() for w in (gate, up, down)]
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    want = reference64(x, ids, w, [1, 2, 3], params).float()
    for isa in isas:
        monkeypatch.setenv("MOERUN_CPU_ISA", isa)
        ex = CpuExecutor(2)
        assert ex.isa == isa
        out = torch.empty(tokens, hidden)
        ex.submit(pool, 1, x, ids, w, [1, 2, 3], out)
        ex.wait()
        # bf16 paths round the SwiGLU activations to bf16 before the down projection.
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2, msg=lambda m: f"{isa}: {m}")


@pytest.mark.parametrize("tokens", [1, 5, 17])
def test_every_isa_this_cpu_offers_matches_float64(monkeypatch, tokens):
    best = CpuExecutor(1).isa
    _run_every_isa(monkeypatch, ISAS[: ISAS.index(best) + 1], tokens, H, I)


@pytest.mark.gpu  # only the GPU machine's Xeon has AMX; the test needs AMX, not the GPU
@pytest.mark.parametrize("tokens", [4, 16, 21])
def test_needs_amx_tile_path_matches_float64(monkeypatch, tokens):
    if CpuExecutor(1).isa != "amx_bf16":
        pytest.skip("needs a CPU with AMX-BF16 and a kernel that grants tile data (Linux >= 5.16)")
    # I and H multiples of 32 and of the 16-row tiles: the AMX kernel runs both projections.
    _run_every_isa(monkeypatch, ["avx512_bf16", "amx_bf16"], tokens, 128, 96)


def _format_pool(fmt: str, gen: torch.Generator):
    """A pool of E random experts in `fmt` (bf16 model) and each expert's (gate, up, down) as the reference
    decodes the pool's slot: the weights the executor reads."""
    # Group formats need H and I divisible by the group (128 at most); the others get vector tails
    # (I = 40) and, for fp8-block128, partial 128-blocks (H = 160).
    hidden, inter = (256, 128) if fmt.startswith("int4") or fmt == "mxfp4" else (160, 40)
    pool = HostPool(2, E, hidden, inter, torch.bfloat16, pinned=False, format=fmt)
    params = {}
    for e in range(E):
        gate, up, down = (torch.randn(s, generator=gen) / s[1] ** 0.5
                          for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
        pool.write_expert(1, e, gate, up, down)
        gate_up, down_fp32 = ref.decode(pool.layout, pool.view(1, e))
        params[e] = [gate_up[:inter], gate_up[inter:], down_fp32]
    return pool, params


@pytest.mark.parametrize("fmt", EXPERT_FORMATS)
@pytest.mark.parametrize("tokens", [1, 6, 17])
def test_every_format_on_every_isa_this_cpu_offers_matches_float64(monkeypatch, fmt, tokens):
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    pool, params = _format_pool(fmt, g)
    assert pool.layout.format == fmt
    hidden = pool.hidden_size
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(tokens)])
    w = torch.rand(tokens, 3, generator=g)
    experts = [0, 2, 3, 5]
    want = reference64(x, ids, w, experts, params).float()
    # Quantized formats compute on fp32 activations on every ISA (fp32 rounding only); the float format's
    # bf16 paths round the activations to bf16 first.
    tol = 2e-2 if fmt == "float" else 1e-4
    best = CpuExecutor(1).isa
    for isa in ISAS[: ISAS.index(best) + 1]:
        monkeypatch.setenv("MOERUN_CPU_ISA", isa)
        ex = CpuExecutor(2)
        assert ex.isa == isa
        out = torch.full((tokens, hidden), float("nan"))
        ex.submit(pool, 1, x, ids, w, experts, out)
        ex.wait()
        torch.testing.assert_close(out, want, rtol=tol, atol=tol * want.abs().max().item(),
                                   msg=lambda m: f"seed {seed}, {isa}: {m}")


def test_defaults_to_physical_cores_but_one_and_reports_isa():
    from moerun.native import physical_cores

    ex = CpuExecutor()
    assert ex.num_threads == max(1, physical_cores() - 1)
    assert ex.isa in ISAS


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


@pytest.mark.parametrize("fmt", ["float", "fp8", "int8", "int4-g32", "mxfp4"])
@pytest.mark.parametrize("tokens", [1, 7, 18])
def test_biases_and_the_clamped_swiglu_on_every_isa_match_float64(monkeypatch, fmt, tokens):
    # gpt-oss's experts: biases in the slots (the pool's layout) and the clamped SwiGLU; the clamp at 0.6 is
    # passed often by gate and up values of x ~ N(0, 1), unit-variance rows and biases ~ N(0, 1)
    act = ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.6, bias=True)
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    hidden, inter = 128, 64
    pool = HostPool(2, E, hidden, inter, torch.bfloat16, pinned=False, format=fmt, bias=True)
    assert pool.layout.has_bias
    for e in range(E):
        gate, up, down = (torch.randn(s, generator=g) / s[1] ** 0.5 for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
        pool.write_expert(1, e, gate, up, down, torch.randn(2 * inter, generator=g), torch.randn(hidden, generator=g))
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(tokens)])
    w = torch.rand(tokens, 3, generator=g)
    experts = [0, 2, 3, 5]
    want = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for k in range(3):
            e = int(ids[t, k])
            if e in experts:
                gate_up, down = ref.decode(pool.layout, pool.view(1, e))
                biases = ref.decode_biases(pool.layout, pool.view(1, e))
                want[t] += float(w[t, k]) * ref.expert_output(x[t:t + 1], gate_up, down, biases, act)[0]
    tol = 2e-2 if fmt == "float" else 1e-4  # bf16 weights on the bf16 ISAs: activations rounded to bf16
    best = CpuExecutor(1).isa
    for isa in ISAS[: ISAS.index(best) + 1]:
        monkeypatch.setenv("MOERUN_CPU_ISA", isa)
        ex = CpuExecutor(2)
        out = torch.full((tokens, hidden), float("nan"))
        ex.submit(pool, 1, x, ids, w, experts, out, act)
        ex.wait()
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * want.abs().max().item(),
                                   msg=lambda m: f"seed {seed}, {isa}: {m}")


def test_a_bias_layout_needs_both_biases_and_a_plain_one_takes_none():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(64, 32, generator=g)
    with_bias = HostPool(1, 2, 64, 32, torch.float32, pinned=False, bias=True)
    with pytest.raises(ValueError, match="holds biases: pass the expert's gate, up and down biases"):
        with_bias.write_expert(0, 0, gate, up, down)
    with pytest.raises(ValueError, match=r"gate_up_bias \[32\] and down_bias \[64\] must be \[64\] and \[64\]"):
        with_bias.write_expert(0, 0, gate, up, down, torch.zeros(32), torch.zeros(64))
    plain = HostPool(1, 2, 64, 32, torch.float32, pinned=False)
    with pytest.raises(ValueError, match="holds no biases"):
        plain.write_expert(0, 0, gate, up, down, torch.zeros(64), torch.zeros(64))
