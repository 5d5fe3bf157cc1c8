"""Each adapter routes exactly as transformers does and names the keys its checkpoints hold."""
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moerun.models import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, adapter_for
from moerun.models.synthetic import build_checkpoint, synthetic_config


@pytest.fixture(scope="module", params=SUPPORTED_ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    arch = request.param
    path = build_checkpoint(synthetic_config(arch), tmp_path_factory.mktemp(arch), seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    return arch, path, model


def test_routing_matches_transformers(checkpoint):
    arch, _, model = checkpoint
    adapter = adapter_for(model.config)
    x = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in adapter.moe_layers():
        router = getattr(model.get_submodule(adapter.block_path(layer)), adapter.router_attr)
        _, hf_weights, hf_ids = router(x)
        ids, weights = adapter.route(router, x)
        # transformers' top-k may be unsorted (sorted=False): compare as (expert -> weight) sets.
        order, hf_order = ids.argsort(dim=-1), hf_ids.argsort(dim=-1)
        assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
        assert weights.dtype == torch.float32
        torch.testing.assert_close(
            weights.gather(1, order), hf_weights.float().gather(1, hf_order), rtol=0, atol=0
        )


def test_shared_output_matches_block(checkpoint):
    arch, _, model = checkpoint
    adapter = adapter_for(model.config)
    x = torch.randn(5, model.config.hidden_size)
    layer = adapter.moe_layers()[0]
    block = model.get_submodule(adapter.block_path(layer))
    ids, weights = adapter.route(getattr(block, adapter.router_attr), x)
    routed = block.experts(x, ids, weights.to(x.dtype))
    shared = adapter.shared_output(block, x)
    expected = block(x.unsqueeze(0))
    if isinstance(expected, tuple):  # gpt-oss: (hidden, router scores)
        expected, scores = expected
        torch.testing.assert_close(scores.float(), weights, rtol=0, atol=0)
        hidden, scores_out = adapter.block_output(expected, weights)
        assert hidden is expected and scores_out is weights
    torch.testing.assert_close(routed + (0 if shared is None else shared), expected.squeeze(0))


def test_checkpoint_keys_partition(checkpoint):
    arch, path, model = checkpoint
    adapter = adapter_for(model.config)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        expert_keys = {k for k in keys if adapter.is_routed_expert_key(k)}
        named = set()
        for layer in adapter.moe_layers():
            if adapter.stacked_experts:  # one tensor per projection holds the layer's experts
                prefix = adapter.stacked_expert_prefix(layer)
                named |= {k for k in keys if k.startswith(prefix)}
                E, H, I = adapter.num_experts, adapter.hidden_size, adapter.expert_inter_size
                assert f.get_slice(prefix + "gate_up_proj").get_shape() == [E, H, 2 * I]
                assert f.get_slice(prefix + "down_proj").get_shape() == [E, I, H]
                continue
            for expert in range(adapter.num_experts):
                k = adapter.expert_keys(layer, expert)
                assert f.get_slice(k.gate).get_shape() == [adapter.expert_inter_size, adapter.hidden_size]
                assert f.get_slice(k.down).get_shape() == [adapter.hidden_size, adapter.expert_inter_size]
                named |= {k.gate, k.up, k.down}
    assert named == expert_keys
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for key in keys - expert_keys:
        assert adapter.module_key(key) in params, key


def test_unsupported_architecture_lists_supported():
    from transformers import AutoConfig
    with pytest.raises(UnsupportedArchitectureError, match="qwen2_moe.*deepseek_v3"):
        adapter_for(AutoConfig.for_model("llama"))
