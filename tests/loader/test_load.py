"""moerun.load builds the model without materialising experts and rejects bad input clearly."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moerun
from moerun.checkpoint import CheckpointError
from moerun.models import UnsupportedArchitectureError
from moerun.models.synthetic import build_checkpoint, synthetic_config
from moerun.runtime.memory import BudgetError
from moerun.runtime.moe_layer import OffloadedMoE

POLICY = "policy p { cache { eviction = lru } }"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_checkpoint(synthetic_config("deepseek_v3"), tmp_path_factory.mktemp("dsv3"), seed=4)


def _load(path, **kw):
    kw = {"policy": POLICY, "device": "cpu", "max_context": 64, "progress": False, **kw}
    return moerun.load(path, **kw)


def test_skeleton_holds_no_routed_expert(tiny):
    model = _load(tiny)
    blocks = [m for m in model.modules() if isinstance(m, OffloadedMoE)]
    assert [b.layer for b in blocks] == [1, 2]  # layer 0 is dense (first_k_dense_replace)
    assert all(not hasattr(b, "experts") for b in blocks)
    reference = AutoModelForCausalLM.from_pretrained(tiny)
    expert_params = sum(p.numel() for n, p in reference.named_parameters() if ".experts." in n)
    ours = sum(p.numel() for p in model.parameters())
    assert ours == sum(p.numel() for p in reference.parameters()) - expert_params
    assert all(p.device.type == "cpu" for p in model.parameters())
    bias = blocks[0].gate.e_score_correction_bias
    assert torch.equal(bias, reference.model.layers[1].mlp.gate.e_score_correction_bias)


def test_bf16_load_keeps_fp32_modules(tiny):
    model = _load(tiny, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_memory_report_fits_the_budget(tiny):
    plan = moerun.memory_plan(tiny, vram_budget=1 << 40, device="cpu", max_context=64)
    budget = plan.fixed_bytes + 5 * plan.slot_bytes
    mem = _load(tiny, vram_budget=budget).moerun.memory()
    dev = mem["device"]
    assert dev["num_slots"] == 5
    assert dev["skeleton"] + dev["kv_cache_reserve"] + dev["workspace_reserve"] + dev["arena"] <= budget
    assert mem["host"]["pool"] == 2 * 8 * dev["slot"]


def test_load_reports_its_stages_in_order(tiny):
    import time

    start = time.perf_counter()
    model = _load(tiny)
    total = time.perf_counter() - start
    stages = model.moerun.load_seconds
    assert list(stages) == ["checkpoint and plan", "skeleton", "host pool: allocate (pin)",
                            "host pool: fill from files", "arena, transfer engine, CPU executor", "arena fill",
                            "dense weights", "handle"]
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= total


def test_budget_too_small_names_the_smallest_budget_that_works(tiny):
    with pytest.raises(BudgetError, match=r"smallest budget that works is .* \((\d+) bytes\)") as err:
        _load(tiny, vram_budget="1MiB")
    smallest = int(str(err.value).split("(")[-1].split(" bytes")[0])
    model = _load(tiny, vram_budget=smallest)
    assert model.moerun.memory()["device"]["num_slots"] == 2  # top_k


def test_hub_id_loads_from_a_fake_offline_cache(tiny, tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--tiny-dsv3" / "snapshots" / "0123abc"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(tiny, target_is_directory=True)
    (tmp_path / "models--acme--tiny-dsv3" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-dsv3" / "refs" / "main").write_text("0123abc\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = _load("acme/tiny-dsv3")
    assert model.moerun.checkpoint_path == snap


def test_sharded_checkpoint_loads(tmp_path):
    path = build_checkpoint(synthetic_config("mixtral"), tmp_path, seed=2, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[5, 6, 7]])
    ref = AutoModelForCausalLM.from_pretrained(path).generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(_load(path).generate(ids, max_new_tokens=4, do_sample=False), ref)


def test_unsupported_architecture_lists_supported(tmp_path):
    cfg = AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="'llama'.*qwen2_moe, qwen3_moe, mixtral"):
        _load(tmp_path)


def test_truncated_safetensors_is_rejected_before_loading(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        _load(bad)


def test_missing_expert_tensor_is_named(tmp_path):
    path = build_checkpoint(synthetic_config("olmoe"), tmp_path, seed=0)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts"] = 9  # the files hold experts 0..7 only
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.experts.8.gate_proj.weight is missing"):
        _load(path)


def test_unknown_policy_name_is_an_error(tiny):
    from moerun.policy import PolicyError

    with pytest.raises(PolicyError, match="no_such_policy"):
        _load(tiny, policy="no_such_policy.moe")


def test_unparsable_policy_reports_its_location(tiny):
    from moerun.policy import PolicyError

    with pytest.raises(PolicyError, match=r"1:\d+"):
        _load(tiny, policy="policy p { cache { eviction = = lru } }")


def test_policy_capacity_above_the_slots_is_an_error(tiny):
    from moerun.policy import PolicyError

    plan = moerun.memory_plan(tiny, vram_budget=1 << 40, device="cpu", max_context=64)
    with pytest.raises(PolicyError, match="12.*3|3.*12"):
        _load(tiny, policy="policy p { cache { capacity = 12 } }", vram_budget=plan.fixed_bytes + 3 * plan.slot_bytes)


def test_missing_tokenizer_has_a_clear_message_and_ids_still_generate(tiny):
    model = _load(tiny)
    with pytest.raises(RuntimeError, match="no usable tokenizer.*token ids"):
        model.moerun.tokenizer
    assert model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


@pytest.mark.parametrize("bad", [dict(max_context=0), dict(dtype=torch.int8), dict(host_budget="1KB"),
                                 dict(vram_budget="lots")])
def test_bad_arguments_are_rejected(tiny, bad):
    with pytest.raises(ValueError):
        _load(tiny, **bad)


def _run_python(code: str, env_update: dict) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    # Run outside the checkout: `python -c` puts the working directory first on sys.path, and the
    # source tree's moerun/ lacks the packaged kernels and policies of the installed one.
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="what moerun does on a machine without a GPU")
def test_import_moerun_puts_triton_in_interpreter_mode_without_a_gpu():
    code = ("import moerun, triton.language.standard as s\n"
            "from triton.runtime.interpreter import InterpretedFunction\n"
            "assert isinstance(s.sigmoid, InterpretedFunction), type(s.sigmoid)\n")
    done = _run_python(code, {})
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_cpu_load_needs_no_triton_interpreter(tiny):
    # The CPU device computes its experts in the native host kernel: triton imported in compiled mode
    # first (as on a GPU machine), or the interpreter switched off, does not stop a CPU load.
    code = ("import triton.language.standard, moerun, torch\n"
            f"m = moerun.load({str(tiny)!r}, policy='balanced', device='cpu', max_context=64, progress=False)\n"
            "print(m.generate(torch.tensor([[3, 4]]), max_new_tokens=3, do_sample=False).shape)\n")
    for env in ({"TRITON_INTERPRET": "0"}, {}):
        done = _run_python(code, env)
        assert done.returncode == 0 and "torch.Size([1, 5])" in done.stdout, done.stderr[-2000:]


def test_an_architecture_tokenizer_with_an_empty_vocabulary_counts_as_none(tmp_path):
    # transformers builds qwen2_moe's tokenizer class from the config alone, with special tokens only.
    path = build_checkpoint(synthetic_config("qwen2_moe"), tmp_path, seed=0)
    model = moerun.load(path, device="cpu", max_context=32, progress=False)
    with pytest.raises(RuntimeError, match=r"no usable tokenizer \(its vocabulary is empty\)"):
        model.moerun.tokenizer
