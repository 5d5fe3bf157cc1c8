"""Finding checkpoints (local dirs, the offline HF cache) and rejecting unusable files early."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from moerun.checkpoint import Checkpoint, CheckpointError, hub_cache_dir, read_safetensors_header, resolve_checkpoint


def _fake_cache(root, repo="org/tiny-moe", commit="abc123"):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_local_directory_resolves_to_itself(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_resolves_offline_from_cache(tmp_path, monkeypatch, env):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    cache = tmp_path / "hub" if env == "HF_HOME" else tmp_path
    monkeypatch.setenv(env, str(tmp_path))
    assert hub_cache_dir() == cache
    snap = _fake_cache(cache)
    assert resolve_checkpoint("org/tiny-moe") == snap
    assert resolve_checkpoint("org/tiny-moe", revision="abc123") == snap


def test_uncached_hub_id_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*huggingface-cli download org/absent"):
        resolve_checkpoint("org/absent")


def test_nonexistent_path_that_is_not_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "a" / "b" / "c"))


def test_bin_only_checkpoint_is_rejected_with_conversion_hint(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only.*save_pretrained"):
        Checkpoint(tmp_path)


def test_truncated_file_is_detected_from_the_header(tmp_path):
    save_file({"a": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("payload", [b"\x01\x02", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"nope"])
def test_corrupted_header_is_rejected(tmp_path, payload):
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(tmp_path)


def test_sharded_checkpoint_reads_every_shard_and_flags_a_missing_one(tmp_path):
    save_file({"a": torch.ones(3)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(tmp_path / "s2.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.tensors["b"].dtype == torch.bfloat16 and ckpt.tensors["b"].shape == (2, 2)
    got = dict(ckpt.read(["a", "b"]))
    assert torch.equal(got["a"], torch.ones(3))
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: s2.safetensors"):
        Checkpoint(tmp_path)


def test_header_offsets_point_at_the_data(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file({"x": torch.zeros(5), "t": t}, str(tmp_path / "model.safetensors"))
    info = read_safetensors_header(tmp_path / "model.safetensors")["t"]
    raw = (tmp_path / "model.safetensors").read_bytes()[info.offset_bytes: info.offset_bytes + info.nbytes]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).view(3, 4), t)
