"""The learned expert predictor: a small MLP over a token's routed experts at the last few layers
that scores every expert of the next ``horizon`` layers (the ``learned`` prefetch strategy).

Input of the prediction made at MoE layer l for one token: the multi-hot of its experts at layers
l, l-1, ..., l-history+1 (``history`` blocks of E; layers before 0 are all-zero) and the one-hot of
l. Output: one logit per expert of layers l+1 .. l+horizon (trained with a multi-label BCE on
the true top-k). The same :meth:`ExpertPredictor.predict` serves the live runtime (one step's
tokens) and trace replay (every step of a trace at once); :func:`step_top` turns token scores
into what the policy engine consumes: per step and target layer, the best ids with scores.

File: one ``.npz`` (no pickles) with ``w1 [in, hidden]``, ``b1``, ``w2 [hidden, horizon * E]``,
``b2`` and ``meta`` (JSON: format, version, num_layers, num_experts, top_k, history, horizon,
hidden, plus free-form provenance). :func:`load_predictor` checks it against the model and raises
:class:`~moerun.policy.errors.PolicyError` naming the mismatch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_write, read_npz
from .policy.errors import PolicyError
from .trace.format import TraceError

FORMAT_NAME = "moerun-expert-predictor"
FORMAT_VERSION = 1
_MAX_META = 1 << 20  # no model has more layers, experts or k; a larger meta number is corruption


@dataclass
class ExpertPredictor:
    """MLP weights and the model shape they were trained for (see the module docstring)."""

    w1: torch.Tensor          # [history * E + L, hidden]
    b1: torch.Tensor          # [hidden]
    w2: torch.Tensor          # [hidden, horizon * E]
    b2: torch.Tensor          # [horizon * E]
    num_layers: int
    num_experts: int
    top_k: int
    history: int
    horizon: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def init(cls, *, num_layers: int, num_experts: int, top_k: int, history: int = 2, horizon: int = 1,
             hidden: int = 256, seed: int = 0) -> "ExpertPredictor":
        """A randomly initialised predictor (to train)."""
        g = torch.Generator().manual_seed(seed)
        d_in, d_out = history * num_experts + num_layers, horizon * num_experts
        return cls(w1=torch.randn(d_in, hidden, generator=g) / d_in ** 0.5, b1=torch.zeros(hidden),
                   w2=torch.randn(hidden, d_out, generator=g) / hidden ** 0.5, b2=torch.zeros(d_out),
                   num_layers=num_layers, num_experts=num_experts, top_k=top_k, history=history, horizon=horizon)

    def parameters(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2]

    def features(self, hist: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """Inputs ``[T, history * E + L]`` of tokens whose experts at layers l, l-1, ... are ``hist``
        ``[T, history, K]`` (int64, -1 = no such layer) and whose current layer is ``layer`` ``[T]``."""
        T, H, K = hist.shape
        E, L = self.num_experts, self.num_layers
        x = torch.zeros(T, H * E + L + 1, dtype=torch.float32)                  # [T, H*E + L + 1]
        offs = (torch.arange(H) * E).view(1, H, 1)                               # [1, H, 1]
        cols = torch.where(hist >= 0, hist + offs, H * E + L)                    # [T, H, K] -1 -> last col
        x.scatter_(1, cols.reshape(T, H * K), 1.0)
        x[torch.arange(T), H * E + layer] = 1.0
        return x[:, :-1]

    def logits(self, hist: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, horizon, E]`` of the experts of layers l+1 .. l+horizon."""
        h = F.gelu(self.features(hist, layer) @ self.w1 + self.b1)              # [T, hidden]
        return (h @ self.w2 + self.b2).view(-1, self.horizon, self.num_experts)  # [T, D, E]

    @torch.no_grad()
    def predict(self, hist: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[T, horizon, E]`` that each expert is among the token's top-k there."""
        return torch.sigmoid(self.logits(hist, layer))

    def save(self, path: str | os.PathLike, **extra) -> Path:
        """Write the predictor (``.npz``); ``extra`` goes into the meta as provenance."""
        meta = dict(format=FORMAT_NAME, version=FORMAT_VERSION, num_layers=self.num_layers,
                    num_experts=self.num_experts, top_k=self.top_k, history=self.history, horizon=self.horizon,
                    hidden=int(self.w1.shape[1]), extra={**self.extra, **extra})
        with atomic_write(path, what="predictor") as f:  # a file object keeps numpy from appending ".npz"
            np.savez_compressed(f, meta=np.array(json.dumps(meta)),
                                **{n: t.detach().float().numpy() for n, t in zip(("w1", "b1", "w2", "b2"),
                                                                                  self.parameters())})
        return Path(path)


def load_predictor(path: str | os.PathLike, *, num_layers: int, num_experts: int, top_k: int,
                   lookahead: int = 1) -> ExpertPredictor:
    """Read a predictor file and check it fits the model (and the policy's lookahead); PolicyError
    says what is missing or does not match."""
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"prefetch predictor file {path} does not exist; train one with "
                          "`moerun trace predictor TRACE... --out FILE` and name it in the policy: "
                          'prefetch { strategy = learned  predictor = "FILE" }')
    try:
        arrays, meta = read_npz(path, "expert predictor", about="a predictor is an .npz archive that "
                                "`moerun trace predictor TRACE... --out FILE` writes")
    except (OSError, ValueError) as exc:
        raise PolicyError(str(exc)) from None
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise PolicyError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this moerun "
                          f"reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
    for key in ("num_layers", "num_experts", "top_k", "history", "horizon"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_META:
            raise PolicyError(f"{path}: meta {key} must be a whole number in 1..{_MAX_META}, got {value!r}")
    for key in ("w1", "b1", "w2", "b2"):
        if key not in arrays or arrays[key].dtype.kind != "f":
            found = arrays[key].dtype if key in arrays else "nothing"
            raise PolicyError(f"{path}: {key} must be a float array, found {found}; the file is not a predictor")
    got = (meta["num_layers"], meta["num_experts"], meta["top_k"])
    if got != (num_layers, num_experts, top_k):
        raise PolicyError(f"predictor {path} was trained for {got[0]} MoE layers x {got[1]} experts, top-{got[2]}, "
                          f"but the model has {num_layers} x {num_experts}, top-{top_k}; train one on this "
                          "model's traces")
    if lookahead > meta["horizon"]:
        raise PolicyError(f"the policy prefetches {lookahead} layers ahead but predictor {path} predicts "
                          f"{meta['horizon']}; lower prefetch.lookahead or train with --horizon {lookahead}")
    t = {k: torch.from_numpy(arrays[k]).float() for k in ("w1", "b1", "w2", "b2")}
    H, E, L = meta["history"], num_experts, num_layers
    w1, b1, w2, b2 = (tuple(t[k].shape) for k in ("w1", "b1", "w2", "b2"))
    hidden = w1[1] if len(w1) == 2 else -1
    if (len(w1) != 2 or w1[0] != H * E + L or b1 != (hidden,) or w2 != (hidden, meta["horizon"] * E)
            or b2 != (meta["horizon"] * E,)):
        raise PolicyError(f"{path}: weight shapes {w1}, {b1}, {w2}, {b2} do not match its meta (history {H}, "
                          f"horizon {meta['horizon']}, {E} experts, {L} layers)")
    return ExpertPredictor(**t, num_layers=L, num_experts=E, top_k=top_k, history=H, horizon=meta["horizon"],
                           extra=dict(meta.get("extra", {})))


def layer_history(ids: torch.Tensor, history: int) -> torch.Tensor:
    """For routed ids ``[N, L, K]``: ``[N, L, history, K]`` = each token's experts at layers l, l-1,
    ..., l-history+1 (-1 before layer 0): the predictor's input at every (token, layer)."""
    N, L, K = ids.shape
    pad = torch.full((N, history - 1, K), -1, dtype=ids.dtype)
    padded = torch.cat([pad, ids], 1)                                           # [N, H-1+L, K]
    return torch.stack([padded[:, history - 1 - j:history - 1 - j + L] for j in range(history)], 2)


def step_top(probs: torch.Tensor, step_of: torch.Tensor, num_steps: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step: the ``width`` best experts by summed token probability (the expected number of the
    step's tokens that route to each) and those sums as scores.

    ``probs`` ``[T, ..., E]`` token scores, ``step_of`` ``[T]`` each token's step. Returns ids
    ``[S, ..., width]`` int32 (-1 where fewer experts have any probability) and scores float32.
    """
    summed = torch.zeros((num_steps,) + tuple(probs.shape[1:]), dtype=torch.float32)
    summed.index_add_(0, step_of, probs.float())                                # [S, ..., E]
    scores, ids = summed.topk(min(width, probs.shape[-1]), dim=-1)              # [S, ..., P]
    ids = torch.where(scores > 0, ids, torch.full_like(ids, -1))
    return ids.int(), scores


def predict_trace(predictor: ExpertPredictor, expert_ids: np.ndarray, step_starts: np.ndarray,
                  chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """The predictor's output at every step and layer of a trace, as replay feeds the engine:
    ids and scores ``[S, L, horizon, P]`` with P = K x the most tokens of one step (at most E);
    a step of T tokens gets K x T ids (at most E), the rest -1, as the runtime gives the engine."""
    ids = torch.from_numpy(np.ascontiguousarray(expert_ids)).long()             # [N, L, K]
    N, L, K = ids.shape
    starts = torch.from_numpy(np.asarray(step_starts)).long()
    S = starts.numel() - 1
    step_of = torch.repeat_interleave(torch.arange(S), starts.diff())           # [N]
    width = min(predictor.num_experts, K * int(starts.diff().max().item() if S else 1))
    hist = layer_history(ids, predictor.history)                                # [N, L, H, K]
    layer = torch.arange(L).expand(N, L)                                        # [N, L]
    probs = torch.empty(N, L, predictor.horizon, predictor.num_experts)         # [N, L, D, E]
    flat_hist, flat_layer, flat_probs = hist.reshape(N * L, -1, K), layer.reshape(-1), probs.view(N * L, -1)
    for s in range(0, N * L, chunk):
        flat_probs[s:s + chunk] = predictor.predict(flat_hist[s:s + chunk], flat_layer[s:s + chunk]).view(
            -1, predictor.horizon * predictor.num_experts)
    top_ids, top_scores = step_top(probs, step_of, S, width)                    # [S, L, D, P]
    per_step = (starts.diff() * K).clamp(max=predictor.num_experts)             # [S]
    beyond = torch.arange(top_ids.shape[-1]) >= per_step.view(S, 1, 1, 1)      # [S, 1, 1, P]
    top_ids = torch.where(beyond, torch.full_like(top_ids, -1), top_ids)
    return top_ids.numpy(), top_scores.numpy()


def train_predictor(traces, *, history: int = 2, horizon: int = 1, hidden: int = 256, epochs: int = 8,
                    batch: int = 1024, lr: float = 2e-3, seed: int = 0, log=print) -> ExpertPredictor:
    """Fit a predictor (Adam, BCE on the true top-k of layers l+1..l+horizon) on the routing of
    ``traces`` (one model; every token at every layer with a next layer is an example)."""
    first = traces[0]
    L, E, K = first.num_layers, first.num_experts, first.top_k
    for t in traces:
        t.check_model(num_layers=L, num_experts=E, top_k=K)
    if not 1 <= history <= L or not 1 <= horizon < L:
        raise TraceError(f"a predictor for {L} MoE layers looks back 1..{L} layers and ahead 1..{L - 1}, "
                         f"not history {history}, horizon {horizon}" + (" (it needs >= 2 layers)" if L < 2 else ""))
    torch.manual_seed(seed)
    hists, layers, targets = [], [], []
    for t in traces:
        ids = torch.from_numpy(t.expert_ids).long()                             # [N, L, K]
        N = ids.shape[0]
        hist = layer_history(ids, history)                                      # [N, L, H, K]
        target = torch.full((N, L, horizon, K), -1, dtype=torch.long)           # [N, L, D, K]
        for d in range(1, horizon + 1):
            target[:, :L - d, d - 1] = ids[:, d:]
        keep = slice(0, L - 1)  # the last layer predicts nothing
        hists.append(hist[:, keep].reshape(-1, history, K))
        layers.append(torch.arange(L - 1).repeat(N))
        targets.append(target[:, keep].reshape(-1, horizon, K))
    hist, layer, target = torch.cat(hists), torch.cat(layers), torch.cat(targets)
    multi = torch.zeros(target.shape[0], horizon, E + 1)                        # [M, D, E+1] col E: padding
    multi.scatter_(2, torch.where(target >= 0, target, E), 1.0)
    valid = (target >= 0).any(-1).float()                                       # [M, D] target layer exists
    multi = multi[..., :E]
    model = ExpertPredictor.init(num_layers=L, num_experts=E, top_k=K, history=history, horizon=horizon,
                                 hidden=hidden, seed=seed)
    params = model.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    M = hist.shape[0]
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(M, generator=g)
        total = 0.0
        for s in range(0, M, batch):
            idx = order[s:s + batch]
            loss = F.binary_cross_entropy_with_logits(model.logits(hist[idx], layer[idx]), multi[idx],
                                                      reduction="none").mean(-1)  # [b, D]
            loss = (loss * valid[idx]).sum() / valid[idx].sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        log(f"  epoch {epoch + 1}/{epochs}: loss {total / M:.4f} ({M} examples)")
    for p in params:
        p.requires_grad_(False)
    model.extra = dict(examples=M, epochs=epochs, lr=lr, seed=seed, hidden=hidden,
                       trained_on=[t.extra.get("workload", t.model) for t in traces])
    return model


def accuracy(predictor: ExpertPredictor, trace) -> dict:
    """Next-layer accuracy on ``trace``, per token and layer pair (d = 1):

    - ``top1``: the best-scored expert is among the true top-k (precision of one guess);
    - ``top1_primary`` / ``top2_primary``: the true highest-gate expert is the best guess / among
      the best two (the definitions of the expert-prediction study this follows, whose Mixtral MLP
      reports 55.6 % / 73.2 %);
    - ``recall_at_k``: share of the true top-k found in the k best guesses (budget = k).
    """
    ids = torch.from_numpy(trace.expert_ids).long()                             # [N, L, K]
    N, L, K = ids.shape
    if L < 2:
        raise TraceError("accuracy needs a trace of at least 2 MoE layers")
    hist = layer_history(ids, predictor.history)[:, :L - 1].reshape(-1, predictor.history, K)
    layer = torch.arange(L - 1).repeat(N)
    probs = torch.cat([predictor.predict(hist[s:s + 65536], layer[s:s + 65536])[:, 0]
                       for s in range(0, hist.shape[0], 65536)])                # [M, E]
    true = ids[:, 1:].reshape(-1, K)                                            # [M, K] ranked by gate
    guess = probs.topk(max(K, 2), -1).indices                                   # [M, max(K, 2)]
    return dict(
        top1=float((guess[:, :1] == true).any(-1).float().mean()),
        top1_primary=float((guess[:, 0] == true[:, 0]).float().mean()),
        top2_primary=float((guess[:, :2] == true[:, :1]).any(-1).float().mean()),
        recall_at_k=float((guess[:, :K, None] == true[:, None, :]).any(-1).float().mean()),
        examples=int(true.shape[0]),
    )
