"""Shared fixtures of the serving tests: a tiny fp32 qwen2_moe checkpoint on the CPU with a word-level
tokenizer ("w0".."w121" plus role markers) and a chat template, 4 expert slots (misses happen), and
greedy references from single-request ``model.generate()``."""
import pytest
import torch

import moerun
from tiny_chat_checkpoint import build_chat_checkpoints, make_tokenizer

POLICY = "policy p { cache { eviction = lru } schedule { mode = cpu_fallback } }"
MAX_CONTEXT = 96
MAX_BATCH = 4
EOS = 2  # the synthetic config's eos_token_id


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"chat": tokenizer and chat template, "plain": tokenizer without template, "bare": no tokenizer}."""
    return build_chat_checkpoints(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def budget(checkpoints) -> int:
    plan = moerun.memory_plan(checkpoints["chat"], vram_budget=1 << 40, device="cpu", max_context=MAX_CONTEXT,
                              max_batch=MAX_BATCH)
    return plan.fixed_bytes + 4 * plan.slot_bytes


def _load_model(path, budget: int, **kw):
    return moerun.load(path, policy=POLICY, vram_budget=budget, device="cpu", max_context=MAX_CONTEXT,
                       max_batch=MAX_BATCH, progress=False, **kw)


@pytest.fixture(scope="session")
def load_model(budget):
    """``load_model(path, **load kwargs)``: the tiny model with MAX_BATCH rows of MAX_CONTEXT tokens."""
    return lambda path, **kw: _load_model(path, budget, **kw)


@pytest.fixture(scope="session")
def tokenizer_of():
    """``tokenizer_of(chat_template=TEMPLATE)``: the tests' word-level tokenizer."""
    return make_tokenizer


@pytest.fixture(scope="session")
def reference(checkpoints, budget):
    """``reference(prompt ids, new tokens) -> new token ids``: greedy single-request generate() on a model
    of its own (cached per prompt)."""
    model = _load_model(checkpoints["chat"], budget)
    cache: dict = {}

    def generate(prompt: list[int], new_tokens: int) -> list[int]:
        key = (tuple(prompt), new_tokens)
        if key not in cache:
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]
    return generate


@pytest.fixture(scope="session")
def prompts():
    """``prompts(count, seed=0)``: ``count`` prompts of 2..20 ordinary word ids (no special tokens)."""
    def make(count: int, seed: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 21, (count,), generator=g).tolist()
        return [torch.randint(6, 128, (n,), generator=g).tolist() for n in lengths]
    return make
