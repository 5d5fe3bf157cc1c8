"""The model survives an exception or Ctrl-C in the middle of a step, and concurrent callers.

Tiny fp32 checkpoints on the CPU (the arena in host memory). After a step is cut short, the next
generate() gives the tokens an uninterrupted model gives, the arena's slot table agrees with the
engine, and the runtime's statistics count every pair the engine saw. Threads calling one model
take turns (``model.moerun.lock``): each gets the tokens it would get alone.
"""
import threading

import pytest
import torch

import moerun
from moerun.models.synthetic import build_checkpoint, synthetic_config
from moerun.runtime.decode_cache import ContextOverflowError

NEW_TOKENS = 6
ARCH = "qwen2_moe"


def _policy(mode: str) -> str:
    return f"policy p {{ cache {{ eviction = lru }} schedule {{ mode = {mode} }} }}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(synthetic_config(ARCH), tmp_path_factory.mktemp(ARCH), seed=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (1, 6), generator=g) for _ in range(2)]


def _load(path, mode: str = "cpu_fallback", slots: int = 4, **kw):
    plan = moerun.memory_plan(path, vram_budget=1 << 40, device="cpu", max_context=64)
    return moerun.load(path, policy=_policy(mode), device="cpu", max_context=64, progress=False,
                       vram_budget=plan.fixed_bytes + slots * plan.slot_bytes, **kw)


def _generate(model, prompt, **kw):
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)


@pytest.fixture(scope="module")
def references(checkpoint, prompts):
    """Tokens of each prompt from uninterrupted models, per schedule mode."""
    refs = {}
    for mode in ("cpu_fallback", "gpu_only"):
        model = _load(checkpoint, mode)
        refs[mode] = [_generate(model, p) for p in prompts]
    return refs


def _assert_consistent(model) -> None:
    """Arena and engine agree on every resident expert; every routed pair was counted."""
    runtime = model.moerun.runtime
    stats = model.moerun.stats()  # completes a step left open first
    assert stats["pairs"] == stats["engine"]["accesses"]
    for layer in range(runtime.num_layers):
        for expert in range(runtime.num_experts):
            assert runtime.arena.lookup(layer, expert) == runtime.engine.lookup(layer, expert), (layer, expert)
    assert not runtime.cpu_executor.busy


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("error", [_Interrupt, KeyboardInterrupt])
def test_an_error_while_a_cpu_job_runs_leaves_the_model_usable(checkpoint, prompts, references, monkeypatch, error):
    model = _load(checkpoint, "cpu_fallback")
    runtime = model.moerun.runtime
    kernel, raised = runtime.moe_kernel, []

    def moe_kernel(*args, **kwargs):  # the kernel of a step whose CPU experts are running
        if not raised and runtime._open is not None and runtime._open.cpu_submitted:
            raised.append(True)
            raise error("cut short")
        return kernel(*args, **kwargs)
    monkeypatch.setattr(runtime, "moe_kernel", moe_kernel)
    with pytest.raises(error):
        _generate(model, prompts[0])
    assert raised and runtime.cpu_executor.busy  # the job was left running: the case that broke the model
    for prompt, expected in zip(prompts, references["cpu_fallback"]):
        assert torch.equal(_generate(model, prompt), expected)
    _assert_consistent(model)


@pytest.mark.parametrize("handed", [False, True])
def test_ctrl_c_between_the_plan_and_its_copies_leaves_the_model_usable(checkpoint, prompts, references, handed):
    model = _load(checkpoint, "gpu_only")
    runtime = model.moerun.runtime
    real, calls = runtime.transfer, []

    class Transfer:  # the real transfer engine, but Ctrl-C lands at the 3rd step that copies
        def __getattr__(self, name):
            return getattr(real, name)

        def begin_step(self, layer, plan):
            copies = plan.num_fetches > 0
            calls.append(copies)
            if handed:  # the copies are issued, the step's kernel not yet run
                real.begin_step(layer, plan)
            if copies and calls.count(True) == 3:
                raise KeyboardInterrupt
            if not handed:
                real.begin_step(layer, plan)
    runtime.transfer = Transfer()
    with pytest.raises(KeyboardInterrupt):
        _generate(model, prompts[0])
    assert runtime._open is not None and real.step_open == handed  # the step was left half done
    runtime.transfer = real
    for prompt, expected in zip(prompts, references["gpu_only"]):
        assert torch.equal(_generate(model, prompt), expected)
    _assert_consistent(model)


def test_an_error_while_waiting_for_cpu_experts_is_counted_once(checkpoint, prompts, references, monkeypatch):
    model = _load(checkpoint, "cpu_fallback")
    runtime = model.moerun.runtime
    wait_cpu, raised = runtime.wait_cpu, []

    def interrupted(step):
        if not raised:
            raised.append(step)
            raise KeyboardInterrupt
        return wait_cpu(step)
    monkeypatch.setattr(runtime, "wait_cpu", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _generate(model, prompts[0])
    _assert_consistent(model)  # stats() first: it completes the step (waits for its CPU job)
    assert torch.equal(_generate(model, prompts[1]), references["cpu_fallback"][1])
    _assert_consistent(model)


def test_threads_calling_one_model_take_turns_and_get_the_tokens_they_get_alone(checkpoint, prompts, references):
    model = _load(checkpoint, "cpu_fallback")
    runtime = model.moerun.runtime
    begin, order, first_inside, second_inside = runtime.begin, [], threading.Event(), threading.Event()

    def watched(layer, host):  # the first step waits to see whether another caller gets in meanwhile
        order.append(threading.get_ident())
        if len(order) == 1:
            first_inside.set()
            second_inside.wait(timeout=2)
        elif order[-1] != order[0]:
            second_inside.set()
        return begin(layer, host)
    runtime.begin = watched
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = _generate(model, prompts[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader():
        for _ in range(10):
            stats = model.moerun.stats()
            assert stats["pairs"] == stats["engine"]["accesses"]  # never read mid-step

    first = threading.Thread(target=worker, args=(0,))
    first.start()
    assert first_inside.wait(timeout=600)
    others = [threading.Thread(target=worker, args=(1,)), threading.Thread(target=reader)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(timeout=600)
    assert not errors, errors
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches == 1, "the two generations' steps interleaved"
    for i, expected in enumerate(references["cpu_fallback"]):
        assert torch.equal(results[i], expected)
    _assert_consistent(model)


def test_two_models_in_two_threads_get_their_own_tokens(checkpoint, prompts, references):
    models = [_load(checkpoint, "cpu_fallback"), _load(checkpoint, "gpu_only")]
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = [_generate(models[i], p) for p in prompts]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert all(torch.equal(a, b) for a, b in zip(results[0], references["cpu_fallback"]))
    assert all(torch.equal(a, b) for a, b in zip(results[1], references["gpu_only"]))


def test_the_transformers_path_stops_at_max_context(checkpoint, prompts):
    model = _load(checkpoint, "gpu_only", fast_decode=False)
    assert not model.moerun.fast_decode
    # N new tokens write prompt + N - 1 positions (the last token is never fed back).
    with pytest.raises(ContextOverflowError, match="max_context=64"):
        model.generate(prompts[0], max_new_tokens=64 - 6 + 2, do_sample=False)
    out = model.generate(prompts[0], max_new_tokens=64 - 6 + 1, do_sample=False)  # exactly fills it
    assert out.shape == (1, 65)
    with pytest.raises(ContextOverflowError):
        model(torch.randint(3, 128, (1, 65)))


def test_record_trace_to_a_bad_path_fails_before_generating(checkpoint, prompts, tmp_path):
    model = _load(checkpoint, "gpu_only")
    steps = model.moerun.stats()["steps"]
    with pytest.raises(OSError, match="does not exist"):
        with model.moerun.record_trace(tmp_path / "no" / "such" / "t.npz"):
            _generate(model, prompts[0])
    assert model.moerun.stats()["steps"] == steps  # nothing ran
