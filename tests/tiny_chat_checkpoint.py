"""A tiny chat checkpoint for the tests of the commands that read text (`moerun run`, `moerun serve`): a
fp32 qwen2_moe checkpoint with a word-level tokenizer ("w0".."w121" plus role markers) and a chat template,
one copy without a template and one without any tokenizer."""
import shutil
from pathlib import Path

from moerun.models.synthetic import build_checkpoint, synthetic_config

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


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


def build_chat_checkpoints(root: Path) -> dict[str, Path]:
    """{"chat": tokenizer and chat template, "plain": tokenizer without template, "bare": no tokenizer}."""
    bare = build_checkpoint(synthetic_config("qwen2_moe"), root / "bare", seed=3)
    paths = {"bare": bare}
    for name, template in (("chat", TEMPLATE), ("plain", None)):
        paths[name] = root / name
        shutil.copytree(bare, paths[name])
        make_tokenizer(template).save_pretrained(paths[name])
    return paths
