"""Bad checkpoints and bad load() arguments are moerun errors that name the input, raised before
anything large is allocated: never an AttributeError, KeyError, TypeError, OverflowError or
AssertionError from deeper down, and never silently accepted."""
import argparse
import json
import os
import random
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import moerun
from moerun import loader
from moerun.checkpoint import Checkpoint, CheckpointError, read_safetensors_header, resolve_checkpoint
from moerun.loader import LoadError
from moerun.models.synthetic import build_checkpoint, synthetic_config
from moerun.policy.errors import PolicyError
from moerun.runtime.memory import BudgetError

POLICY = "policy p { cache { eviction = lru } }"
MOERUN_ERRORS = (CheckpointError, BudgetError, LoadError)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_checkpoint(synthetic_config("qwen2_moe"), tmp_path_factory.mktemp("qwen2"), seed=4)


@pytest.fixture
def copy(tiny, tmp_path):
    """A writable copy of the tiny checkpoint."""
    return shutil.copytree(tiny, tmp_path / "ckpt")


def _load(path, **kw):
    return moerun.load(path, **{"policy": POLICY, "device": "cpu", "max_context": 64, "progress": False, **kw})


def _header_file(tmp_path, header) -> os.PathLike:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    return f


@pytest.mark.parametrize("header,why", [
    ([1, 2], "JSON list, not an object"),
    ({"w": 5}, "not an object with dtype"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "shape"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "shape"),
    ({"w": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}}, "dtype 7"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype Q4"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12 bytes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, "data_offsets"),
    (b"[" * 100_000, "unreadable safetensors header"),
    (b"\xff\xfe{}", "unreadable safetensors header"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_safetensors_header_is_a_checkpoint_error(tmp_path, header, why):
    with pytest.raises(CheckpointError, match=why):
        read_safetensors_header(_header_file(tmp_path, header))


def test_fuzzed_safetensors_files_are_read_or_rejected(tmp_path):
    save_file({"a": torch.randn(4, 4), "b": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "good"))
    data = (tmp_path / "good").read_bytes()
    rng = random.Random(5)
    for i in range(200):
        broken = bytearray(data[: rng.randrange(len(data) + 1)] if i % 3 == 0 else data)
        for _ in range(1 + i % 3):
            if broken:
                broken[rng.randrange(min(len(broken), 200))] ^= 1 << rng.randrange(8)
        f = tmp_path / "model.safetensors"
        f.write_bytes(bytes(broken))
        try:
            read_safetensors_header(f)
        except CheckpointError:
            pass


@pytest.mark.parametrize("index,why", [
    ("{not json", "not a readable safetensors index"),
    ("[1]", "JSON object, not list"),
    (json.dumps({"metadata": {}}), "'weight_map' must map"),
    (json.dumps({"weight_map": {"a": 3}}), "'weight_map' must map"),
    (json.dumps({"weight_map": {"a": "../outside.safetensors"}}), "points outside"),
    (json.dumps({"weight_map": {"a": "/etc/passwd"}}), "points outside"),
], ids=["not json", "a list", "no weight_map", "number shard", "dot-dot shard", "absolute shard"])
def test_a_bad_index_is_a_checkpoint_error(tmp_path, index, why):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=why):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("ref", ["../../../elsewhere", "/tmp", "a/../../b", ""])
def test_a_hub_ref_cannot_point_outside_the_cache(tmp_path, monkeypatch, ref):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (repo / "refs" / "main").write_text(ref)
    with pytest.raises(CheckpointError):
        resolve_checkpoint("acme/tiny")
    (repo / "refs" / "main").write_text("abc")
    assert resolve_checkpoint("acme/tiny") == repo / "snapshots" / "abc"
    with pytest.raises(CheckpointError, match="points outside"):
        resolve_checkpoint("acme/tiny", revision="../../models--acme--tiny/refs/main")


@pytest.mark.parametrize("config,why", [
    ("{not json", "not a readable config.json"),
    ("[1, 2]", "JSON object, not list"),
])
def test_a_config_that_is_not_a_json_object_is_a_checkpoint_error(copy, config, why):
    (copy / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=why):
        _load(copy)


@pytest.mark.parametrize("field,value,why", [
    ("num_experts", "8", "config.json: .*'num_experts'"),
    ("num_experts", 0, "num_experts must be a whole number >= 1, got 0"),
    ("num_experts_per_tok", 99, "experts per token but"),
    ("num_hidden_layers", 1, "in layer 1, but config.json gives 1 layers"),
    ("num_experts", 4, "is expert 4, but config.json gives 4 experts"),
])
def test_a_config_that_does_not_match_the_weights_is_a_checkpoint_error(copy, field, value, why):
    config = json.loads((copy / "config.json").read_text())
    config[field] = value
    if field == "num_hidden_layers" and "layer_types" in config:
        config["layer_types"] = config["layer_types"][:value]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=why):
        _load(copy)


def test_a_dense_weight_stored_as_integers_is_rejected_before_the_experts_are_loaded(copy, monkeypatch):
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(loader, "_build_runtime", _must_not_run)
    with pytest.raises(CheckpointError, match="model.norm.weight is torch.int32"):
        _load(copy)


@pytest.mark.parametrize("fault,why", [
    ("missing", r"no tensor for model.layers.0.self_attn.q_proj.weight\b.*re-download or re-save"),
    ("shape", r"model.layers.0.self_attn.q_proj.weight \[3, 5\] \(the model wants \[64, 64\]\)"),
    ("both", r"no tensor for model.norm.weight; shapes that differ.*q_proj.weight \[3, 5\]"),
])
def test_a_dense_tensor_missing_or_misshapen_is_found_from_the_headers_before_the_host_pool(copy, monkeypatch,
                                                                                           fault, why):
    tensors = load_file(str(copy / "model.safetensors"))
    if fault in ("missing", "both"):
        del tensors["model.layers.0.self_attn.q_proj.weight" if fault == "missing" else "model.norm.weight"]
    if fault in ("shape", "both"):
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 5)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(loader, "_build_runtime", _must_not_run)
    with pytest.raises(CheckpointError, match=why):
        _load(copy)


def test_tied_output_embeddings_need_no_tensor_of_their_own(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(str(copy / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    model = _load(copy)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("text,why", [
    ("{not json", "generation_config.json: not a readable generation_config.json"),
    ("[1]", "generation_config.json: a generation_config.json is a JSON object, not list"),
])
def test_a_bad_generation_config_is_named_before_the_host_pool(copy, monkeypatch, text, why):
    (copy / "generation_config.json").write_text(text)
    monkeypatch.setattr(loader, "_build_runtime", _must_not_run)
    with pytest.raises(CheckpointError, match=why):
        _load(copy)
    assert (copy / "generation_config.json").read_text() == text  # the user's file is left as it was


def _must_not_run(*args, **kwargs):
    raise AssertionError("the host pool was allocated before the check")


@pytest.mark.parametrize("kwargs,error,why", [
    (dict(vram_budget="9" * 400 + "GB"), BudgetError, "larger than any machine's memory"),
    (dict(host_budget=10**30), BudgetError, "more than this machine's"),
    (dict(max_context="4096"), LoadError, "max_context must be a whole number"),
    (dict(max_context=2**31), LoadError, "max_context must be in"),
    (dict(max_batch=True), LoadError, "max_batch must be a whole number"),
    (dict(cpu_threads=-1), LoadError, "cpu_threads must be in 0..4096"),
    (dict(copy_streams=0), LoadError, "copy_streams must be in 2..64"),
    (dict(copy_streams=1), LoadError, r"copy_streams must be in 2..64, got 1 \(one stream copies demanded"),
    (dict(vram_budget="0.5"), BudgetError, "'0.5' is 0.5 bytes, not a whole number of bytes"),
    (dict(vram_budget="1.9B"), BudgetError, "not a whole number of bytes"),
    (dict(vram_budget=1.5), BudgetError, "1.5 is 1.5 bytes, not a whole number of bytes"),
    (dict(vram_budget="plenty"), BudgetError, "cannot read vram_budget 'plenty'.*or 'auto'"),
    (dict(dtype="float64"), LoadError, r"dtype='float64': moerun computes in .*pass one of them.*bf16"),
    (dict(dtype=torch.int8), LoadError, r"dtype=torch.int8: moerun computes in"),
    (dict(model=123), CheckpointError, r"model must be a checkpoint directory .* not 123 \(int\)"),
    (dict(model=None), CheckpointError, "not None"),
    (dict(model=""), CheckpointError, r"names no checkpoint; pass its directory \('.' for the current one\)"),
    (dict(model="  "), CheckpointError, "names no checkpoint"),
    (dict(fast_decode="yes"), LoadError, "fast_decode must be"),
    (dict(compile_decode=1), LoadError, "compile_decode must be"),
    (dict(revision=7), LoadError, "revision must be"),
    (dict(device="tpu"), LoadError, "device"),
    (dict(device=3.5), LoadError, "not a device name"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_are_named(tiny, monkeypatch, kwargs, error, why):
    monkeypatch.setattr(loader, "_build_runtime", _must_not_run)
    kwargs = {"model": tiny, **kwargs}
    with pytest.raises(error, match=why):
        _load(kwargs.pop("model"), **kwargs)


@pytest.mark.parametrize("name", ["bfloat16", "bf16", " BF16 ", torch.bfloat16])
def test_dtype_takes_the_names_the_commands_take(tiny, name):
    from moerun.cli import add_expert_options

    parser = argparse.ArgumentParser()
    add_expert_options(parser)
    assert parser.parse_args(["--dtype", "bf16"]).dtype == torch.bfloat16
    model = _load(tiny, dtype=name, vram_budget="AUTO")  # "auto" in any case
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_config_dtype_moerun_cannot_compute_in_names_config_json_and_dtype(copy, monkeypatch):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "dtype": "float64"}))
    monkeypatch.setattr(loader, "_build_runtime", _must_not_run)
    with pytest.raises(LoadError, match=r'config.json gives "dtype": "float64": .*load it with dtype= set to one'):
        _load(copy)
    monkeypatch.undo()
    assert _load(copy, dtype="float32").model.norm.weight.dtype == torch.float32  # dtype= overrides the config's


def test_a_tensor_in_two_shards_is_refused_naming_both(copy):
    tensors = load_file(str(copy / "model.safetensors"))
    norm = {"model.norm.weight": tensors["model.norm.weight"] + 1}
    save_file(tensors, str(copy / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(norm, str(copy / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    (copy / "model.safetensors").unlink()
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight is in both model-00001-of-00002.safetensors "
                                              r"and model-00002-of-00002.safetensors.*stale shard"):
        Checkpoint(copy)


@pytest.mark.parametrize("policy,why", [
    ("{dir}", "is a directory"),
    ("{dir}/missing/p.moe", "the directory .*missing does not exist"),
    ("{dir}/p.moe", "No such file"),
    ("no_such_policy", "no policy file or bundled policy named 'no_such_policy'"),
])
def test_a_policy_path_that_is_not_a_file_says_what_it_is(tiny, tmp_path, monkeypatch, policy, why):
    monkeypatch.setattr(loader, "_build_runtime", _must_not_run)
    with pytest.raises(PolicyError, match=why):
        _load(tiny, policy=policy.format(dir=tmp_path))


def test_a_directory_named_like_a_bundled_policy_does_not_hide_it(tiny, tmp_path, monkeypatch):
    (tmp_path / "balanced").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _load(tiny, policy="balanced").moerun.policy.name == "balanced"


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU-only torch says")
def test_cuda_on_a_cpu_only_torch_says_so(tiny):
    with pytest.raises(LoadError, match="sees no CUDA device.*device='cpu'"):
        _load(tiny, device="cuda")
    with pytest.raises(LoadError, match="sees no CUDA device"):
        moerun.memory_plan(tiny, device="cuda:0")


def test_a_host_pool_larger_than_available_memory_fails_with_the_numbers(tiny, monkeypatch):
    monkeypatch.setattr(loader, "_host_available_bytes", lambda: 4096)
    monkeypatch.setattr(loader, "_build_runtime", _must_not_run)
    with pytest.raises(BudgetError, match=r"needs .* of host memory .* but only 4.00 KiB is available.*host_budget"):
        _load(tiny)
    monkeypatch.setenv("MOERUN_NO_HOST_MEMORY_CHECK", "1")  # a VM whose memory grows on use
    with pytest.raises(AssertionError, match="allocated"):  # past the check, to the allocation
        _load(tiny)
    monkeypatch.undo()
    assert loader._host_available_bytes() > 0  # /proc/meminfo on Linux


@pytest.mark.gpu
def test_an_explicit_vram_budget_above_free_memory_fails_with_the_numbers(tiny):
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(BudgetError, match=rf"free on cuda:\d .*pass at most \d+ bytes"):
        _load(tiny, device="cuda", vram_budget=free + (1 << 30))
    # Planning is not loading: memory_plan plans any budget (a plan for a larger machine), as the
    # GPU tests do with 1 TiB to read the fixed bytes off it.
    plan = moerun.memory_plan(tiny, device="cuda", vram_budget=free + (1 << 30), max_context=64)
    assert plan.budget_bytes == free + (1 << 30)
