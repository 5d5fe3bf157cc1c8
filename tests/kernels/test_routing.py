"""Fused routing against transformers' own router modules (the definition of each architecture's routing)."""
import pytest
import torch
import transformers

from moerun.kernels.routing import RoutingSpec, route

HIDDEN = 16


def _router(arch: str, **cfg):
    """A transformers router module of ``arch`` with random weights (and bias), plus its config."""
    if arch in ("qwen2_moe", "qwen3_moe", "olmoe"):
        mod = {"qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe"}[arch]
        config_cls = {
            "qwen2_moe": transformers.Qwen2MoeConfig,
            "qwen3_moe": transformers.Qwen3MoeConfig,
            "olmoe": transformers.OlmoeConfig,
        }[arch]
        config = config_cls(hidden_size=HIDDEN, **cfg)
        module = __import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=["x"])
        router_cls = {"qwen2_moe": "Qwen2MoeTopKRouter", "qwen3_moe": "Qwen3MoeTopKRouter",
                      "olmoe": "OlmoeTopKRouter"}[arch]
        router = getattr(module, router_cls)(config)
    elif arch == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
        config = transformers.MixtralConfig(hidden_size=HIDDEN, **cfg)
        router = MixtralTopKRouter(config)
    elif arch == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
        config = transformers.DeepseekV2Config(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=4, **cfg)
        router = DeepseekV2TopkRouter(config)
    elif arch == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        config = transformers.DeepseekV3Config(hidden_size=HIDDEN, **cfg)
        router = DeepseekV3TopkRouter(config)
        router.e_score_correction_bias.copy_(torch.randn_like(router.e_score_correction_bias) * 0.1)
    else:
        raise AssertionError(arch)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight))
    return router, config


CASES = [
    ("qwen2_moe", dict(num_experts=12, num_experts_per_tok=4, norm_topk_prob=False)),
    ("qwen3_moe", dict(num_experts=16, num_experts_per_tok=3, norm_topk_prob=True)),
    ("olmoe", dict(num_experts=16, num_experts_per_tok=8, norm_topk_prob=False)),
    ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    ("deepseek_v2", dict(n_routed_experts=16, num_experts_per_tok=6, topk_method="greedy",
                         routed_scaling_factor=1.0)),
    ("deepseek_v2", dict(n_routed_experts=16, num_experts_per_tok=3, topk_method="group_limited_greedy",
                         n_group=4, topk_group=2, routed_scaling_factor=16.0)),
    ("deepseek_v3", dict(n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
                         norm_topk_prob=True, routed_scaling_factor=2.5)),
    ("deepseek_v3", dict(n_routed_experts=16, num_experts_per_tok=5, n_group=8, topk_group=3,
                         norm_topk_prob=False, routed_scaling_factor=1.0)),
]


@pytest.mark.parametrize("arch,cfg", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_route_matches_transformers_router(arch, cfg):
    router, config = _router(arch, **cfg)
    x = torch.randn(7, HIDDEN)
    with torch.no_grad():
        logits, ref_w, ref_ids = router(x)
    bias = router.e_score_correction_bias if arch == "deepseek_v3" else None
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU in CI
    w, ids = route(logits.to(device), RoutingSpec.from_config(config), None if bias is None else bias.to(device))
    w, ids = w.cpu(), ids.cpu()
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == ref_ids.shape
    # transformers' DeepSeek routers return the top-k unsorted: compare as sets ordered by id
    ref_order, order = ref_ids.argsort(-1), ids.long().argsort(-1)
    assert torch.equal(ids.long().gather(1, order), ref_ids.long().gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.float().gather(1, ref_order), rtol=1e-5, atol=1e-6)


def test_route_rejects_groups_that_do_not_divide_experts():
    with pytest.raises(ValueError, match="equal groups"):
        route(torch.randn(2, 10), RoutingSpec(top_k=2, num_groups=4, topk_groups=2))


def test_routing_spec_rejects_unknown_scoring():
    with pytest.raises(ValueError, match="scoring"):
        RoutingSpec(top_k=2, scoring="relu")
