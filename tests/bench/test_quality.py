"""benchmarks/bench_quality.py --tiny end to end on the CPU: a toy model trained on a toy corpus, then
every expert format's held-out perplexity through moerun.load beside plain transformers'."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


quality = _module("bench_quality")
moe_corpus = _module("moe_corpus")


def _texts(kind: str, n: int, rng: np.random.Generator) -> list[str]:
    """Small documents with some structure to learn: Python-like lines or English-like sentences."""
    words = ["the", "model", "expert", "routes", "each", "token", "to", "a", "layer", "and", "weights", "are",
             "kept", "in", "host", "memory", "while", "cache", "holds", "hot", "ones"]
    docs = []
    for _ in range(n):
        if kind == "code":
            lines = [f"def f{rng.integers(9)}(x, y):\n    return x {rng.choice(['+', '-', '*'])} y * "
                     f"{rng.integers(100)}\n" for _ in range(12)]
        else:
            lines = [" ".join(rng.choice(words, 8)).capitalize() + ".\n" for _ in range(12)]
            if kind == "mixed":
                lines += [f"    pip install pkg{rng.integers(50)}\n"]
        docs.append("".join(lines))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A corpus directory in moe_corpus.py's layout, from generated text."""
    out = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    splits = {k: (_texts(k, 30, rng), _texts(k, 8, rng)) for k in quality.KINDS}
    tok = moe_corpus.train_tokenizer([t for train, _ in splits.values() for t in train], 512)
    tok.save(str(out / "tokenizer.json"))
    arrays = {}
    train = []
    for k, (tr, held) in splits.items():
        train.append(moe_corpus.encode_docs(tok, tr)[0])
        arrays[f"heldout_{k}"], arrays[f"heldout_{k}_starts"] = moe_corpus.encode_docs(tok, held)
    arrays["train"] = np.concatenate(train)
    np.savez_compressed(out / "corpus.npz", **arrays)
    (out / "corpus.json").write_text(json.dumps(dict(vocab_size=tok.get_vocab_size(),
                                                     eos_id=tok.token_to_id(moe_corpus.EOS))))
    return out


def _dequantized_copy(src: Path, dst: Path, fmt: str) -> Path:
    """``src`` with every routed expert replaced by its ``fmt`` encoding decoded (fp32 tensors): what
    moerun's ``fmt`` experts compute with."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from moerun.models import adapter_for
    from moerun.native import decode_expert, encode_expert, slot_layout

    shutil.copytree(src, dst)
    adapter = adapter_for(AutoConfig.from_pretrained(src))
    layout = slot_layout(torch.float32, adapter.hidden_size, adapter.expert_inter_size, fmt)
    [file] = dst.glob("*.safetensors")
    tensors = load_file(file)
    for layer in adapter.moe_layers():
        for expert in range(adapter.num_experts):
            keys = adapter.expert_keys(layer, expert)
            gate_up, down = decode_expert(layout, encode_expert(
                layout, *(tensors[k].float() for k in (keys.gate, keys.up, keys.down))))  # [2I, H], [H, I]
            tensors[keys.gate], tensors[keys.up] = gate_up.chunk(2)
            tensors[keys.down] = down
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})
    return dst


def test_every_format_is_measured_against_float_and_transformers(corpus, tmp_path):
    from moerun.native import EXPERT_FORMATS

    out = tmp_path / "quality.json"
    # fp32 compute: moerun and transformers then agree to float rounding, far below a format's effect.
    assert quality.main(["--tiny", "--corpus", str(corpus), "--ckpt-dir", str(tmp_path / "ckpt"),
                         "--out", str(out), "--models", "mixtral", "--device", "cpu", "--dtype", "float32"]) == 0
    result = json.loads(out.read_text())["models"]["mixtral"]
    rows = result["formats"]
    assert list(rows) == list(EXPERT_FORMATS)
    assert result["training"]["train"]["steps"] == 3
    assert result["tokens_per_kind"] == {k: 512 for k in quality.KINDS}
    ref, base = result["transformers_perplexity"], rows["float"]["perplexity"]
    for kind in quality.KINDS:
        assert math.isfinite(ref[kind]) and base[kind] == pytest.approx(ref[kind], rel=1e-5)
    # A quantized row is transformers on the checkpoint with those experts dequantized.
    dequantized = _dequantized_copy(tmp_path / "ckpt" / "mixtral", tmp_path / "int4", "int4-g128")
    want = quality.reference_perplexity(dequantized, {k: np.load(corpus / "corpus.npz")[f"heldout_{k}"]
                                                      for k in quality.KINDS},
                                        device=torch.device("cpu"), dtype=torch.float32, seq_len=64, ppl_tokens=512,
                                        windows=4)
    for kind in quality.KINDS:
        assert rows["int4-g128"]["perplexity"][kind] == pytest.approx(want[kind], rel=1e-5)
        assert abs(want[kind] / ref[kind] - 1) > 1e-4  # the format's effect, far above the agreement above
    for fmt, row in rows.items():
        assert row["hit_rate"] == 1.0  # every expert resident: only the format differs
        assert set(row["perplexity"]) == set(quality.KINDS)
        if fmt == "float":
            assert row["relative_change"] == {k: 0.0 for k in quality.KINDS}
            continue
        assert row["slot_bytes"] < rows["float"]["slot_bytes"]
        # The quantized experts were really used: a different perplexity on every kind.
        assert all(row["perplexity"][k] != base[k] for k in quality.KINDS), fmt
        worst = max(row["perplexity"][k] / base[k] - 1 for k in quality.KINDS)
        assert row["worst_change"] == pytest.approx(worst)
        target = quality.TARGETS.get(fmt)
        assert row["target_met"] == (None if target is None else worst <= target)
    # Run again on the saved checkpoint: not retrained, the same numbers.
    again = tmp_path / "again.json"
    quality.main(["--tiny", "--corpus", str(corpus), "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(again),
                  "--models", "mixtral", "--device", "cpu", "--dtype", "float32", "--formats", "int4-g128"])
    second = json.loads(again.read_text())["models"]["mixtral"]
    assert second["training"] is None and list(second["formats"]) == ["float", "int4-g128"]
    assert second["formats"]["int4-g128"]["perplexity"] == rows["int4-g128"]["perplexity"]


def test_steps_per_model():
    assert quality.parse_steps("mixtral=7,olmoe=4", ["olmoe", "mixtral"]) == {"olmoe": 4, "mixtral": 7}
    assert quality.parse_steps("5", ["olmoe"]) == {"olmoe": 5}
    with pytest.raises(SystemExit, match="olmoe"):
        quality.parse_steps("mixtral=7", ["olmoe", "mixtral"])
