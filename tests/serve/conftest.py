"""Shared fixtures of the serving tests: a tiny fp32 qwen2_moe checkpoint on the CPU with a word-level
tokenizer ("w0".."w121" plus role markers) and a chat template, 4 expert slots (misses happen), and
greedy references from single-request ``model.generate()``."""
import shutil

import pytest
import torch

import moerun
from moerun.models.synthetic import build_checkpoint, synthetic_config

POLICY = "policy p { cache { eviction = lru } schedule { mode = cpu_fallback } }"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
MAX_CONTEXT = 96
MAX_BATCH = 4
EOS = 2  # the synthetic config's eos_token_id


def make_tokenizer(chat_template: str | None = TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ids 0, 1, 2 are the synthetic config's pad, bos and eos
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"] + [f"w{i}" for i in range(122)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"chat": tokenizer and chat template, "plain": tokenizer without template, "bare": no tokenizer}."""
    root = tmp_path_factory.mktemp("serve")
    bare = build_checkpoint(synthetic_config("qwen2_moe"), root / "bare", seed=3)
    paths = {"bare": bare}
    for name, template in (("chat", TEMPLATE), ("plain", None)):
        paths[name] = root / name
        shutil.copytree(bare, paths[name])
        make_tokenizer(template).save_pretrained(paths[name])
    return paths


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
