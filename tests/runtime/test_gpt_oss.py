"""gpt-oss through moerun generates what transformers generates, on both decode paths.

Two tiny fp32 checkpoints of the same config (4 layers alternating sliding-window (8 tokens) and full
attention, attention sinks and biases, YaRN, 8 experts top-2 with biases and the clamped SwiGLU): the hub's
MXFP4 layout (``*_blocks`` / ``*_scales``, read by moerun straight into MXFP4 slots; transformers dequantizes
the same files itself with ``Mxfp4Config(dequantize=True)``: an independent reference) and transformers'
float layout (``save_pretrained``). Prompts are longer than the sliding window. The float layout also runs
through every architecture-parametrized test of test_generate.py and test_prefill.py (synthetic's tiny
gpt_oss); this file adds the MXFP4 layout, padding, policies, schedule modes and the serving engine's rows.
"""
import pytest
import torch
from generation_helpers import NEW_TOKENS, assert_matches as _assert_matches, budget_for as _budget_for
from generation_helpers import check_decode_masks, greedy as _generate, policy as _policy
from transformers import AutoModelForCausalLM, Mxfp4Config

import moerun
from moerun.models.synthetic import build_checkpoint, build_packed_checkpoint, synthetic_config

LAYOUTS = ("mxfp4", "float")
TOP_K = 2
WINDOW = synthetic_config("gpt_oss").sliding_window


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    config = synthetic_config("gpt_oss")
    return {"mxfp4": build_packed_checkpoint(config, tmp_path_factory.mktemp("mxfp4"), expert_format="mxfp4",
                                             dtype=torch.float32, seed=3),
            "float": build_checkpoint(config, tmp_path_factory.mktemp("float"), seed=3)}


def _transformers(path, layout):
    """transformers' own model of the checkpoint in fp32 (5.17 dequantizes MXFP4 experts to bf16, whose
    values are exact: the fp32 copy holds the same numbers)."""
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if layout == "mxfp4" else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).float()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 128, (1, 3 * WINDOW // 2), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def references(checkpoints, prompt):
    refs = {}
    for layout, path in checkpoints.items():
        out = _transformers(path, layout).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                   output_logits=True, return_dict_in_generate=True)
        refs[layout] = (out.sequences, torch.stack(out.logits))
    return refs


def test_mxfp4_experts_are_read_packed(checkpoints):
    from moerun.native import slot_layout

    model = moerun.load(checkpoints["mxfp4"], device="cpu", max_context=64, progress=False)
    info = model.moerun.model_info
    assert info["expert_format"] == "mxfp4" and info["checkpoint_quantization"] == "gpt-oss-mxfp4"
    layout = slot_layout(torch.float32, 64, 64, "mxfp4", bias=True)
    assert layout.has_bias and model.moerun.plan.slot_bytes == layout.slot_bytes
    with pytest.raises(ValueError, match="would not be exact"):
        moerun.load(checkpoints["mxfp4"], device="cpu", max_context=64, progress=False, expert_format="int4")


@pytest.mark.parametrize("fast", [False, True], ids=["transformers_path", "fast_path"])
@pytest.mark.parametrize("budget", ["evict_every_step", "resident"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_matches_transformers(layout, budget, fast, checkpoints, references, prompt):
    path = checkpoints[layout]
    slots = TOP_K if budget == "evict_every_step" else None
    model = moerun.load(path, policy=_policy("gpu_only"), device="cpu", max_context=64, fast_decode=fast,
                        vram_budget=_budget_for(path, slots) if slots else "auto", progress=False)
    _assert_matches(_generate(model, prompt), references[layout])
    stats = model.moerun.stats()
    assert stats["decode"]["fast_steps"] == (NEW_TOKENS - 1 if fast else 0)
    if slots:
        for counts in stats["per_layer"].values():
            assert counts["evictions"] >= counts["steps"] - 1


@pytest.mark.parametrize("mode", ["cpu_fallback", "hybrid"])
def test_cpu_experts_take_the_biases_and_the_clamped_activation(mode, checkpoints, references, prompt):
    path = checkpoints["mxfp4"]
    for fast in (True, False):
        model = moerun.load(path, policy=_policy(mode), device="cpu", max_context=64, fast_decode=fast,
                            vram_budget=_budget_for(path, 3), progress=False)
        _assert_matches(_generate(model, prompt), references["mxfp4"])
        assert mode == "hybrid" or model.moerun.stats()["cpu_experts"] > 0


@pytest.mark.parametrize("policy", ["balanced.moe", "aggressive.moe", "lookahead.moe", "per_layer.moe"])
def test_bundled_policies_match(policy, checkpoints, references, prompt):
    path = checkpoints["mxfp4"]
    model = moerun.load(path, policy=policy, device="cpu", max_context=64, fast_decode=True,
                        vram_budget=_budget_for(path, 6), progress=False)
    _assert_matches(_generate(model, prompt), references["mxfp4"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_left_padded_batch_longer_than_the_window_matches(layout, checkpoints):
    path = checkpoints[layout]
    ids = torch.randint(3, 128, (2, 2 * WINDOW), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # left-padded second row
    kw = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = _transformers(path, layout).generate(ids, **kw)
    model = moerun.load(path, policy=_policy("gpu_only"), device="cpu", max_context=64, max_batch=2,
                        vram_budget=_budget_for(path, 3, max_batch=2), fast_decode=True, progress=False)
    assert torch.equal(model.generate(ids, **kw), ref)
    assert model.moerun.stats()["decode"]["fast_steps"] == NEW_TOKENS - 1
    model.moerun.fast_decode = False
    assert torch.equal(model.generate(ids, **kw), ref)


def test_decode_masks_extended_on_the_device_equal_transformers_own(checkpoints):
    # Both kinds: the full mask gains the new column, the sliding-window one also loses the column W back.
    model = moerun.load(checkpoints["mxfp4"], device="cpu", max_context=64, max_batch=2, fast_decode=True,
                        progress=False)
    extended = check_decode_masks(model.moerun.decoder, {"full_attention", "sliding_attention"})
    ids = torch.randint(3, 128, (2, WINDOW + 3), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert sum(extended) == NEW_TOKENS - 2  # every decode step but the first


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "transformers_path"])
def test_serving_rows_match_single_generate(fast, checkpoints):
    from moerun.serve.batching import BatchingEngine, Request

    path = checkpoints["mxfp4"]
    ref = _transformers(path, "mxfp4")
    model = moerun.load(path, policy=_policy("cpu_fallback"), device="cpu", max_context=64, max_batch=3,
                        vram_budget=_budget_for(path, 4, max_batch=3), fast_decode=fast, progress=False)
    engine = BatchingEngine(model)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (WINDOW + 5, 3, 2 * WINDOW, WINDOW)]
    tokens = [[] for _ in prompts]
    for prompt, out in zip(prompts, tokens):  # four requests, three rows: one waits for a row to free
        engine.submit(Request(prompt, 10, lambda event, out=out: out.append(event.token_id)))
    for _ in range(500):
        if not engine.step():
            break
    for prompt, got in zip(prompts, tokens):
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
        want = want[:want.index(2) + 1] if 2 in want else want  # the engine stops at (and sends) EOS
        assert [t for t in got if t is not None] == want


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "transformers_path"])
def test_bf16_on_the_gpu_agrees_with_transformers(fast, checkpoints):
    # bf16 rounds differently in moerun's fused kernels (fp32 accumulation, one rounding) than in
    # transformers' eager experts: report the agreement, require most greedy tokens to agree.
    path = checkpoints["mxfp4"]
    prompts = torch.randint(3, 128, (4, 3 * WINDOW), generator=torch.Generator().manual_seed(11)).cuda()
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                               quantization_config=Mxfp4Config(dequantize=True)).cuda()
    want = torch.stack([ref.generate(p[None], **kw)[0] for p in prompts])
    model = moerun.load(path, dtype=torch.bfloat16, policy=_policy("gpu_only"), device="cuda", max_context=128,
                        vram_budget=_budget_for(path, 4, max_context=128), fast_decode=fast, progress=False)
    got = torch.stack([model.generate(p[None], **kw)[0] for p in prompts])
    new = slice(prompts.shape[1], None)
    first_difference = [(g != w).nonzero()[0, 0].item() if (g != w).any() else 32
                        for g, w in zip(got[:, new], want[:, new])]
    print(f"gpt-oss bf16 (fast={fast}): greedy tokens identical before the first difference: {first_difference} of 32")
    assert sum(first_difference) >= 0.5 * 32 * len(prompts)
