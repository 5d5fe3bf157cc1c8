"""Choosing each sequence's next token from its logits, every sequence with its own sampling settings.

One decode step gives logits ``[n, V]`` for ``n`` sequences that arrived at different times with
different settings; :func:`sample` picks a token for each in one pass of batched device ops:

- greedy (``temperature == 0``): the argmax, as ``generate(do_sample=False)`` takes it (fp32 logits,
  the first of equal maxima);
- sampled: logits / temperature, then top-k, then top-p (the smallest set of most likely tokens whose
  probability reaches p, the most likely always kept), then one draw by inverting the cumulative
  distribution at a uniform number from the sequence's own generator. A seeded request therefore draws
  the same tokens whatever else shares its steps.

Log-probabilities (the chosen token's, and the ``top_logprobs`` most likely alternatives) are those of
the model's own distribution (``log_softmax`` of the raw logits, before temperature, top-k and top-p),
computed only for the sequences that ask for them.

This module knows nothing about requests, rows or text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per token


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 keep
    every token; ``seed`` None draws from fresh entropy; ``logprobs`` None computes none, ``k`` >= 0 the
    chosen token's and the ``k`` most likely alternatives."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """The sequence's own random stream (None for greedy decoding)."""
        if self.greedy:
            return None
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives ``[(token id, logprob)]``."""

    logprob: float
    top: tuple[tuple[int, float], ...]


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each of ``n`` sequences from ``logits`` ``[n, V]``, and its log-probabilities
    where ``params[i].logprobs`` asks for them; ``generators[i]``: sequence i's random stream (unused
    when greedy). One host read for the tokens, one more when log-probabilities are asked for."""
    logits = logits.float()  # [n, V]
    n = logits.shape[0]
    tokens = logits.argmax(dim=-1)  # [n] greedy choice; sampled rows overwrite theirs below
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        chosen = _draw(logits[index], [params[i] for i in sampled], [generators[i] for i in sampled])
        tokens = tokens.index_copy(0, index, chosen)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    out_logprobs: list[TokenLogprob | None] = [None] * n
    if wanted:
        index = torch.tensor(wanted, device=logits.device)
        logp = torch.log_softmax(logits[index], dim=-1)  # [w, V]
        chosen_logp = logp.gather(1, tokens[index, None])[:, 0]  # [w]
        k = max(params[i].logprobs for i in wanted)
        top_logp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())  # [w, k]
        chosen_host, top_logp, top_ids = chosen_logp.tolist(), top_logp.tolist(), top_ids.tolist()
        for j, i in enumerate(wanted):
            kept = params[i].logprobs
            out_logprobs[i] = TokenLogprob(chosen_host[j], tuple(zip(top_ids[j][:kept], top_logp[j][:kept])))
    return tokens.tolist(), out_logprobs


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits`` ``[s, V]`` under each row's temperature, top-k and top-p."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)  # [s]
    logits = logits / temperature[:, None]
    order = None  # token ids by falling logit, when top-k or top-p need ranks
    if any(p.top_k for p in params) or any(p.top_p < 1 for p in params):
        logits, order = logits.sort(dim=-1, descending=True)  # [s, V]
        ranks = torch.arange(logits.shape[-1], device=device)  # [V]
        top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params], device=device)  # [s]
        logits = logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=device)  # [s]
        before = probs.cumsum(dim=-1) - probs  # [s, V] probability of the more likely tokens
        logits = logits.masked_fill((before >= top_p[:, None]) & (ranks[None, :] > 0), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [s, V]
    cumulative = probs.cumsum(dim=-1)
    # The uniform draws come from each sequence's own CPU generator: reproducible per seed.
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(device)  # [s]
    u = (u * cumulative[:, -1].double()).to(cumulative.dtype)
    choice = torch.searchsorted(cumulative, u[:, None], right=True).clamp_(max=logits.shape[-1] - 1)  # [s, 1]
    # A draw landing on a zero-probability token (rounding at a boundary) moves to the last kept one.
    choice = torch.minimum(choice, (probs > 0).sum(dim=-1, keepdim=True) - 1) if order is not None else choice
    return (order.gather(1, choice) if order is not None else choice)[:, 0]
