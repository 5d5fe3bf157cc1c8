"""Fused MoE routing: router logits -> (top-k weights, top-k expert ids) in one launch per layer.

One program per token holds the token's E scores in registers and does, in order:
score (softmax or sigmoid, fp32) -> optional correction bias (used for the choice only) ->
optional group limit (keep the ``topk_groups`` best of ``num_groups`` groups, a group scored by
its max or by the sum of its two best) -> top-k by repeated arg-max -> optional renormalisation
-> scaling. ``RoutingSpec.from_config`` reads the variant each architecture uses, following
transformers (see ARCHITECTURES.md): Qwen2/3-MoE and OLMoE softmax->top-k->(norm_topk_prob);
Mixtral softmax->top-k->renorm; DeepSeek-V2 softmax->(group max limit)->top-k->x scaling, no renorm;
DeepSeek-V3 sigmoid+bias->(group top-2-sum limit)->top-k, unbiased weights, (renorm+1e-20)->x scaling.

The ids come out in descending order of the choice score. This module knows nothing about
where experts live.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
    """How one architecture turns router logits into (weights, ids)."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    renorm_eps: float = 0.0  # added to the sum before dividing (DeepSeek-V3: 1e-20)
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    masked_score: float = float("-inf")  # value of experts outside the kept groups
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"need 1 <= topk_groups ({self.topk_groups}) <= num_groups ({self.num_groups})")

    @staticmethod
    def from_config(config) -> "RoutingSpec":
        """The routing of a transformers config of a supported architecture."""
        arch = config.model_type
        top_k = config.num_experts_per_tok
        if arch in ("qwen2_moe", "qwen3_moe", "olmoe"):
            return RoutingSpec(top_k=top_k, renormalize=bool(config.norm_topk_prob))
        if arch == "mixtral":
            return RoutingSpec(top_k=top_k, renormalize=True)
        if arch == "deepseek_v2":
            grouped = config.topk_method == "group_limited_greedy"
            return RoutingSpec(
                top_k=top_k,
                num_groups=config.n_group if grouped else 1,
                topk_groups=config.topk_group if grouped else 1,
                group_score="max",
                masked_score=0.0,
                scaling=float(config.routed_scaling_factor),
            )
        if arch == "deepseek_v3":
            return RoutingSpec(
                top_k=top_k,
                scoring="sigmoid",
                renormalize=bool(config.norm_topk_prob),
                renorm_eps=1e-20,
                num_groups=config.n_group,
                topk_groups=config.topk_group,
                group_score="top2_sum",
                scaling=float(config.routed_scaling_factor),
            )
        raise ValueError(
            f"no routing known for model_type {arch!r}; supported: qwen2_moe, qwen3_moe, olmoe, mixtral, "
            "deepseek_v2, deepseek_v3"
        )


@triton.jit
def _route_kernel(
    logits_ptr,  # [T, E]
    bias_ptr,  # [E] fp32 correction bias (read only when HAS_BIAS)
    weights_ptr,  # [T, K] fp32 out
    ids_ptr,  # [T, K] int32 out
    E, stride_logits, masked_score, renorm_eps, scaling,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr,
):
    token = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)  # [BE]
    valid = offs < E
    logits = tl.load(logits_ptr + token * stride_logits + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        ex = tl.exp(logits - tl.max(logits, axis=0))
        scores = ex / tl.sum(ex, axis=0)
    scores = tl.where(valid, scores, float("-inf"))  # [BE]
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if NUM_GROUPS > 1:
        group_size = E // NUM_GROUPS
        group_of = offs // group_size
        goffs = tl.arange(0, NUM_GROUPS)
        gscore = tl.zeros((NUM_GROUPS,), dtype=tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_g = (group_of == g) & valid
            vals = tl.where(in_g, choice, float("-inf"))
            best = tl.max(vals, axis=0)
            if GROUP_TOP2:
                first = tl.argmax(vals, axis=0)
                best = best + tl.max(tl.where(offs == first, float("-inf"), vals), axis=0)
            gscore = tl.where(goffs == g, best, gscore)
        keep = tl.zeros((BLOCK_E,), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            gbest = tl.argmax(gscore, axis=0)
            keep = keep | (group_of == gbest)
            gscore = tl.where(goffs == gbest, float("-inf"), gscore)
        choice = tl.where(keep & valid, choice, masked_score)
        choice = tl.where(valid, choice, float("-inf"))
    # the weight of a chosen expert: its unbiased score with a bias, else the (masked) choice score
    if HAS_BIAS:
        source = scores
    else:
        source = choice
    kofs = tl.arange(0, K_PAD)  # K rounded up to a power of two for the register vector
    top_w = tl.zeros((K_PAD,), dtype=tl.float32)
    top_i = tl.zeros((K_PAD,), dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.argmax(choice, axis=0)
        w = tl.sum(tl.where(offs == best, source, 0.0), axis=0)
        top_w = tl.where(kofs == k, w, top_w)
        top_i = tl.where(kofs == k, best.to(tl.int32), top_i)
        choice = tl.where(offs == best, float("-inf"), choice)
    if RENORM:
        top_w = top_w / (tl.sum(top_w, axis=0) + renorm_eps)
    top_w = top_w * scaling
    tl.store(weights_ptr + token * K + kofs, top_w, mask=kofs < K)
    tl.store(ids_ptr + token * K + kofs, top_i, mask=kofs < K)


def route(
    logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of router logits [T, E] -> (weights [T, K] fp32, ids [T, K] int32).

    ``correction_bias`` [E] (DeepSeek-V3's ``e_score_correction_bias``) shifts the choice only.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    tokens, num_experts = logits.shape
    if spec.top_k > num_experts:
        raise ValueError(f"top_k={spec.top_k} exceeds the {num_experts} experts")
    if num_experts % spec.num_groups:
        raise ValueError(f"{num_experts} experts do not split into num_groups={spec.num_groups} equal groups")
    if spec.num_groups & (spec.num_groups - 1):
        raise ValueError(f"num_groups must be a power of two, got {spec.num_groups}")
    if correction_bias is not None and correction_bias.shape != (num_experts,):
        raise ValueError(f"correction_bias must be [E={num_experts}], got {tuple(correction_bias.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = torch.empty((tokens, spec.top_k), dtype=torch.float32, device=logits.device)  # [T, K]
    ids = torch.empty((tokens, spec.top_k), dtype=torch.int32, device=logits.device)  # [T, K]
    if tokens:
        bias = correction_bias.float().contiguous() if correction_bias is not None else weights
        _route_kernel[(tokens,)](
            logits, bias, weights, ids,
            num_experts, logits.stride(0), spec.masked_score, spec.renorm_eps, spec.scaling,
            K=spec.top_k, K_PAD=triton.next_power_of_2(spec.top_k), BLOCK_E=triton.next_power_of_2(num_experts),
            SIGMOID=spec.scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
            RENORM=spec.renormalize, NUM_GROUPS=spec.num_groups, TOPK_GROUPS=spec.topk_groups,
            GROUP_TOP2=spec.group_score == "top2_sum",
        )
    return weights, ids
