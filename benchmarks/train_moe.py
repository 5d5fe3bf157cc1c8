"""Train small MoE language models on real text and record their routing: realistic traces.

Random weights route almost uniformly (the worst case for any cache), so the policies are judged on
models that learned something. For each model (transformers' own classes, with their
load-balancing aux loss: ``output_router_logits=True``, ``router_aux_loss_coef``):

1. train on the corpus of ``benchmarks/moe_corpus.py`` (bf16 autocast, AdamW, cosine schedule,
   fixed seeds; ``--steps`` fixes the length, else it is sized from ``--train-seconds`` after a
   measured warm-up and printed, so a run can be repeated with ``--steps``);
2. held-out perplexity per text kind (code, prose, mixed);
3. save a transformers checkpoint (config.json + safetensors + tokenizer.json) in bf16 under
   ``--ckpt-dir/<name>``: what ``moerun.load`` / ``python -m moerun.bench --model`` take;
4. record routing traces of the bf16 checkpoint on held-out documents of each kind (one prompt per
   document, teacher-forced: the routing of every token is what decoding it would give; one engine
   step per token, batch 1), with moerun's own adapter routing (``MoeAdapter.route``, what the
   runtime computes), and check it against the model's router;
5. lookahead recall: layer l+1's router on its norm of the residual stream after layer l (what
   ``lookahead`` prefetch does live), and an earlier-known variant (``LOOKAHEAD_VARIANTS``),
   against the true top-k of layer l+1, at budget k and 2k.

Outputs in ``--out``: ``<name>_<kind>.npz`` traces (kinds code, prose, mixed: held-out text;
``train``: training text, the learned predictor's training data), ``train_log.json`` (curves, perplexities,
recall, tokens/s) and a text log. ``--tiny`` runs everything with toy shapes in seconds (CPU test).

    python benchmarks/train_moe.py --corpus .dev/traces/corpus --out OUT --ckpt-dir /tmp/ckpt
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if importlib.util.find_spec("moerun") is None:  # not installed: moerun from this checkout (no kernels)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moerun.models import adapter_for  # noqa: E402
from moerun.runtime.memory import slot_layout  # noqa: E402
from moerun.trace.format import Trace, write_trace  # noqa: E402

KINDS = ("code", "prose", "mixed")

# name -> (model_type, config fields, aux loss coefficient, peak learning rate)
MODELS = {
    # OLMoE-like: every layer sparse, 64 experts, top-8, no renormalisation (as OLMoE-1B-7B).
    "olmoe": ("olmoe", dict(hidden_size=256, intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8, num_experts=64, num_experts_per_tok=8,
                            norm_topk_prob=False), 0.01, 2e-3),
    # Mixtral-like: 8 experts, top-2, renormalised.
    "mixtral": ("mixtral", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                num_experts_per_tok=2, sliding_window=None), 0.02, 2e-3),
}
TINY = dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


def make_config(name: str, vocab_size: int, eos_id: int, seq_len: int, tiny: bool, shape: dict | None = None):
    """The config of model ``name``; ``shape``: config fields that replace its own (and TINY's)."""
    from transformers import AutoConfig

    model_type, fields, coef, _ = MODELS[name]
    fields = dict(fields, **(TINY if tiny else {}))
    fields.update(shape or {})
    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size, max_position_embeddings=seq_len, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=False, output_router_logits=True,
        router_aux_loss_coef=coef, **fields)


def batches(tokens: np.ndarray, seq_len: int, batch: int, seed: int):
    """Endless random windows of ``seq_len + 1`` tokens from the training stream, ``[B, S+1]``."""
    rng = np.random.default_rng(seed)
    n = tokens.size - seq_len - 1
    while True:
        starts = rng.integers(0, n, size=batch)
        yield torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def pick_experts_implementation(model, tokens: np.ndarray, device: torch.device, log) -> str:
    """The first of grouped_mm, batched_mm, eager that runs a training step here (fp32 weights under
    bf16 autocast are not supported by every transformers version's fused paths)."""
    if not hasattr(model, "set_experts_implementation"):  # older transformers: its default only
        return "default"
    x = torch.from_numpy(tokens[:4 * 65].astype(np.int64)).view(4, 65).to(device)
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            model.set_experts_implementation(impl)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(input_ids=x[:, :-1], output_router_logits=True)
            (out.logits.float().mean() + out.aux_loss.float()).backward()
            model.zero_grad(set_to_none=True)
            log(f"  experts implementation: {impl}")
            return impl
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
            log(f"  experts implementation {impl} failed here: {str(exc).splitlines()[0][:160]}")
            model.zero_grad(set_to_none=True)
    raise SystemExit("no experts implementation of this transformers can train here")


def train(model, tokens: np.ndarray, *, seq_len: int, batch: int, peak_lr: float, steps: int | None,
          train_seconds: float, seed: int, device: torch.device, log) -> dict:
    """Train in place; returns the curve (step, lm loss, aux loss, lr), steps, tokens/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    gen = batches(tokens, seq_len, batch, seed)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    coef = model.config.router_aux_loss_coef
    warmup, probe = 50, 20
    total = steps if steps is not None else 10**9
    curve, step, t_start, t_probe = [], 0, time.perf_counter(), None
    model.train()
    while step < total:
        if step == probe and steps is None:  # size the run from the measured rate
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.perf_counter()
        if step == 2 * probe and steps is None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t_probe) / probe
            total = max(2 * probe + 1, int((train_seconds - (time.perf_counter() - t_start)) / per_step) + 2 * probe)
            log(f"  {per_step * 1e3:.1f} ms/step -> {total} steps in ~{train_seconds:.0f} s "
                f"(repeat with --steps {total})")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, peak_lr, warmup)
        x = next(gen).to(device, non_blocking=True)  # [B, S+1]
        with amp:
            out = model(input_ids=x[:, :-1], output_router_logits=True)
        logits = out.logits.float()  # [B, S, V]
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = out.aux_loss.float()
        loss = lm + coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == total - 1:
            curve.append(dict(step=step, lm_loss=lm.item(), aux_loss=aux.item(), lr=opt.param_groups[0]["lr"]))
            log(f"  step {step:5d}/{total}  lm {curve[-1]['lm_loss']:.4f}  aux {curve[-1]['aux_loss']:.4f}")
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t_start
    return dict(curve=curve, steps=step, seconds=seconds, tokens_per_s=step * batch * seq_len / seconds,
                batch=batch, seq_len=seq_len, peak_lr=peak_lr)


def train_model(name: str, corpus: dict, info: dict, *, seq_len: int, batch: int, steps: int | None,
                train_seconds: float, seed: int, tiny: bool, device: torch.device, log,
                shape: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Model ``name`` trained from seed ``seed`` on ``corpus["train"]``, cast to bf16 (what moerun runs),
    and what its training was: ``{params, experts_implementation, train}`` (``train``: :func:`train`'s)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(name, info["vocab_size"], info["eos_id"], seq_len, tiny, shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {n_params / 1e6:.1f} M parameters, {config.num_hidden_layers} layers")
    impl = pick_experts_implementation(model, corpus["train"], device, log)
    tr = train(model, corpus["train"], seq_len=seq_len, batch=batch, peak_lr=MODELS[name][3],
               steps=steps, train_seconds=train_seconds, seed=seed, device=device, log=log)
    log(f"  trained {tr['steps']} steps in {tr['seconds']:.1f} s: {tr['tokens_per_s']:.0f} tokens/s")
    return model.to(torch.bfloat16), dict(params=n_params, experts_implementation=impl, train=tr)


def save_checkpoint(model, path: Path, tokenizer_file: Path) -> None:
    """``model`` as a transformers checkpoint at ``path`` (replaced) with ``tokenizer_file``: what
    ``moerun.load`` takes."""
    shutil.rmtree(path, ignore_errors=True)
    model.config.output_router_logits = False
    model.save_pretrained(path)
    shutil.copy(tokenizer_file, path / "tokenizer.json")


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, device: torch.device, max_tokens: int,
               windows_per_forward: int = 16) -> float:
    """exp(mean next-token cross entropy) over non-overlapping windows of the held-out stream,
    ``windows_per_forward`` windows per forward."""
    model.eval()
    n = min(tokens.size - 1, max_tokens) // seq_len * seq_len
    if n == 0:
        raise ValueError(f"held-out split has {tokens.size} tokens, fewer than one window of {seq_len + 1}")
    x = torch.from_numpy(tokens[:n + 1].astype(np.int64)).to(device)
    total, count = 0.0, 0
    for s in range(0, n, windows_per_forward * seq_len):
        e = min(n, s + windows_per_forward * seq_len)
        inp, tgt = x[s:e].view(-1, seq_len), x[s + 1:e + 1].view(-1, seq_len)  # [b, S]
        logits = model(input_ids=inp).logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
        count += tgt.numel()
    return math.exp(total / count)


# Lookahead variants: what predicts layer l+1's experts at layer l, router l+1 applied to
# - "after_layer": norm_{l+1}(the residual stream after layer l): what the runtime's lookahead
#   computes (moerun/runtime/moe_layer.py), once layer l is done; the prefetch then has the next
#   layer's attention to hide behind;
# - "moe_input": layer l's MoE input (the runtime's lookahead before: known at layer l's router, so
#   the prefetch could also overlap layer l's experts, but blind to their output).
LOOKAHEAD_VARIANTS = ("after_layer", "moe_input")
RUNTIME_VARIANT = "after_layer"


@torch.no_grad()
def record(model, adapter, docs: list[np.ndarray], device: torch.device, name: str, kind: str) -> tuple[Trace, dict]:
    """The routing of ``docs`` (one forward each) as a trace, plus lookahead recall and router agreement."""
    layers = adapter.moe_layers()
    gates = [model.get_submodule(adapter.block_path(l)).gate for l in layers]
    decoder = [model.get_submodule(adapter.block_path(l).rpartition(".")[0]) for l in layers]
    norms = [d.post_attention_layernorm for d in decoder]
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    model_ids: dict[int, torch.Tensor] = {}
    hooks = []
    for i, gate in enumerate(gates):
        def hook(mod, args, out, i=i):
            inputs[i] = args[0].reshape(-1, args[0].shape[-1])  # [T, H] the MoE input
            model_ids[i] = out[2] if isinstance(out, tuple) and len(out) == 3 else None

        def layer_hook(mod, args, out, i=i):
            h = out[0] if isinstance(out, tuple) else out
            outputs[i] = h.reshape(-1, h.shape[-1])  # [T, H] residual stream after the layer
        hooks.append(gate.register_forward_hook(hook))
        hooks.append(decoder[i].register_forward_hook(layer_hook))
    K, L = adapter.top_k, len(layers)
    ids_all, w_all, prompt_starts = [], [], []
    hit_k = {v: np.zeros(max(L - 1, 1)) for v in LOOKAHEAD_VARIANTS}
    hit_2k = {v: np.zeros(max(L - 1, 1)) for v in LOOKAHEAD_VARIANTS}
    agree, pairs, n_tok = 0, 0, 0
    try:
        model.eval()
        for doc in docs:
            model(input_ids=torch.from_numpy(doc.astype(np.int64))[None].to(device))
            routed = [adapter.route(g, inputs[i]) for i, g in enumerate(gates)]  # [(ids [T,K], w [T,K])]
            for i in range(L):
                if model_ids[i] is not None:
                    agree += int((torch.sort(model_ids[i], -1)[0] == torch.sort(routed[i][0], -1)[0]).all(-1).sum())
                    pairs += routed[i][0].shape[0]
            for i in range(L - 1):
                true = routed[i + 1][0]  # [T, K]
                logits = {  # [T, E] each: layer i+1's router scores as each variant sees them at layer i
                    "after_layer": F.linear(norms[i + 1](outputs[i]), gates[i + 1].weight),
                    "moe_input": F.linear(inputs[i], gates[i + 1].weight),
                }
                for v, lg in logits.items():
                    top2k = lg.float().topk(min(2 * K, lg.shape[-1]), -1).indices  # [T, 2K] ranked
                    hit_k[v][i] += float((top2k[:, :K, None] == true[:, None, :]).any(-1).sum())
                    hit_2k[v][i] += float((top2k[:, :, None] == true[:, None, :]).any(-1).sum())
            prompt_starts.append(n_tok)
            n_tok += doc.size
            ids_all.append(torch.stack([r[0] for r in routed], 1).int().cpu())    # [T, L, K]
            w_all.append(torch.stack([r[1] for r in routed], 1).float().cpu())    # [T, L, K]
    finally:
        for h in hooks:
            h.remove()
    trace = Trace(expert_ids=torch.cat(ids_all).numpy(), gate_weights=torch.cat(w_all).numpy(),
                  step_starts=np.arange(n_tok + 1, dtype=np.int64), prompt_starts=np.array(prompt_starts, np.int64),
                  num_experts=adapter.num_experts, model=f"moerun-{name}-trained", arch=adapter.model_type,
                  expert_bytes=slot_layout(adapter, torch.bfloat16).slot_bytes,  # the bf16 checkpoint's slots
                  extra=dict(workload=f"heldout-{kind}" if kind != "train" else "train-text", source="benchmarks/train_moe.py", dtype="bfloat16",
                             batch=1, teacher_forced=True))
    norm = n_tok * K
    pairs_l = max(L - 1, 1)
    # Top-level recall keys: the runtime's lookahead; every variant under "variants".
    rt = RUNTIME_VARIANT
    recall = dict(kind=kind, tokens=n_tok, recall_at_k=(hit_k[rt] / norm).tolist(),
                  recall_at_2k=(hit_2k[rt] / norm).tolist(),
                  mean_recall_at_k=float(hit_k[rt].sum() / (norm * pairs_l)),
                  mean_recall_at_2k=float(hit_2k[rt].sum() / (norm * pairs_l)),
                  variants={v: dict(recall_at_k=(hit_k[v] / norm).tolist(), recall_at_2k=(hit_2k[v] / norm).tolist(),
                                    mean_recall_at_k=float(hit_k[v].sum() / (norm * pairs_l)),
                                    mean_recall_at_2k=float(hit_2k[v].sum() / (norm * pairs_l)))
                            for v in LOOKAHEAD_VARIANTS},
                  router_agreement=agree / pairs if pairs else None)
    return trace, recall


@torch.no_grad()
def live_lookahead(path: Path, docs: list[np.ndarray], device: torch.device) -> dict:
    """Lookahead recall as the runtime sees it: the checkpoint at ``path`` loaded by ``moerun.load``
    with ``lookahead`` prefetch, fed ``docs`` one token per forward (teacher-forced decoding, so
    every engine step is one token and the engine's routing-prediction accuracy is recall at budget
    k), against the offline recall of the same documents. Needs the built extension."""
    import moerun
    from transformers import AutoModelForCausalLM, DynamicCache

    policy = "policy live { cache { eviction = lru } prefetch { strategy = lookahead budget = 8 } }"
    model = moerun.load(path, policy=policy, device=device, max_context=max(d.size for d in docs) + 1,
                        fast_decode=False, progress=False)
    for doc in docs:
        ids = torch.from_numpy(doc.astype(np.int64))[None].to(device)  # [1, S]
        cache = DynamicCache(config=model.config)
        for t in range(ids.shape[1]):
            model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    live = model.moerun.stats()["engine"]["routing_prediction_accuracy"]
    del model
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    _, offline = record(ref, adapter_for(ref.config), docs, device, "live", "prose")
    return dict(tokens=int(sum(d.size for d in docs)), live_recall_at_k=live, offline_recall_at_k=offline["mean_recall_at_k"])


def trace_docs(corpus, kind: str, max_doc: int, max_tokens: int, eos_id: int, min_doc: int = 16) -> list[np.ndarray]:
    """Documents to trace, each cut to ``max_doc`` tokens, until ``max_tokens`` in all: held-out
    documents of ``kind``, or for ``kind == "train"`` the start of the training stream (documents
    end at EOS), whose routing trains the learned predictor."""
    if kind == "train":
        toks = corpus["train"][:64 * max_tokens]
        ends = np.flatnonzero(toks == eos_id) + 1
        starts = np.append(0, ends[:-1])
    else:
        toks, starts = corpus[f"heldout_{kind}"], corpus[f"heldout_{kind}_starts"]
        ends = np.append(starts[1:], toks.size)
    docs, total = [], 0
    for s, e in zip(starts, ends):
        doc = toks[s:min(e, s + max_doc, s + max_tokens - total)]
        if doc.size >= min_doc:
            docs.append(doc)
            total += doc.size
        if total >= max_tokens:
            break
    return docs


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Training LM loss (and aux loss) per step of every model in ``train_log.json``, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    models = json.loads(Path(log_path).read_text())["models"]
    fig, (ax, ax_aux) = plt.subplots(1, 2, figsize=(10, 4))
    for name, m in models.items():
        steps = [c["step"] for c in m["train"]["curve"]]
        ppl = ", ".join(f"{k} {v:.1f}" for k, v in m["perplexity"].items())
        ax.plot(steps, [c["lm_loss"] for c in m["train"]["curve"]], label=f"{name} (held-out ppl: {ppl})")
        ax_aux.plot(steps, [c["aux_loss"] / m["config"].get("num_experts_per_tok", 1) for c in m["train"]["curve"]],
                    label=name)
    ax.set(xlabel="step", ylabel="LM loss (nats/token)", title="training loss")
    ax_aux.set(xlabel="step", ylabel="aux loss / k (1.0 = perfectly balanced)", title="load-balancing loss")
    for a in (ax, ax_aux):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", help="directory written by benchmarks/moe_corpus.py")
    ap.add_argument("--out", help="traces, train_log.json")
    ap.add_argument("--ckpt-dir", help="where the trained checkpoints are written")
    ap.add_argument("--plot", nargs=2, metavar=("LOG", "PNG"), help="only plot a train_log.json's curves")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: sized from --train-seconds)")
    ap.add_argument("--train-seconds", type=float, default=210.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--trace-tokens", type=str, default="olmoe=12288,mixtral=16384",
                    help="held-out tokens traced per kind, per model")
    ap.add_argument("--predictor-trace-tokens", type=int, default=32768,
                    help="training-text tokens traced per model (the learned predictor's training data)")
    ap.add_argument("--max-doc", type=int, default=512, help="tokens of one held-out document (one prompt)")
    ap.add_argument("--ppl-tokens", type=int, default=200_000, help="held-out tokens per kind for perplexity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--live-check", type=int, default=0, metavar="N",
                    help="also load each checkpoint with moerun (lookahead prefetch) and measure the live recall "
                         "over N held-out prose tokens, one per forward (needs the built extension)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.plot:
        plot_curves(Path(args.plot[0]), Path(args.plot[1]))
        return 0
    if not (args.corpus and args.out and args.ckpt_dir):
        ap.error("--corpus, --out and --ckpt-dir are required (unless --plot)")
    device = torch.device(args.device)
    out, ckpt_dir, corpus_dir = Path(args.out), Path(args.ckpt_dir), Path(args.corpus)
    for f in ("corpus.npz", "corpus.json", "tokenizer.json"):
        if not (corpus_dir / f).is_file():
            raise SystemExit(f"{corpus_dir / f} is missing: build the corpus with benchmarks/moe_corpus.py --out {corpus_dir}")
    out.mkdir(parents=True, exist_ok=True)
    trace_tokens = {k: int(v) for k, v in (kv.split("=") for kv in args.trace_tokens.split(","))}
    info = json.loads((corpus_dir / "corpus.json").read_text())
    with np.load(corpus_dir / "corpus.npz") as z:
        corpus = {k: z[k] for k in z.files}
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        log(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    results = dict(corpus=info, models={}, device=str(device), date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:])
    for name in args.models:
        model, trained = train_model(name, corpus, info, seq_len=args.seq_len, batch=args.batch, steps=args.steps,
                                     train_seconds=args.train_seconds, seed=args.seed, tiny=args.tiny, device=device,
                                     log=log)  # bf16: what moerun runs, so traces and checkpoint are bf16
        tr = trained["train"]
        ppl = {k: perplexity(model, corpus[f"heldout_{k}"], args.seq_len, device, args.ppl_tokens) for k in KINDS}
        log(f"  held-out perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
        path = ckpt_dir / name
        save_checkpoint(model, path, corpus_dir / "tokenizer.json")
        adapter = adapter_for(model.config)
        recall = {}
        for kind in KINDS + ("train",):
            n = args.predictor_trace_tokens if kind == "train" else trace_tokens[name]
            docs = trace_docs(corpus, kind, args.max_doc, n, info["eos_id"])
            trace, recall[kind] = record(model, adapter, docs, device, name, kind)
            trace.extra.update(seed=args.seed, steps=tr["steps"])
            write_trace(out / f"{name}_{kind}.npz", trace)
            variants = "; ".join(f"{v} {r['mean_recall_at_k']:.3f} @2k {r['mean_recall_at_2k']:.3f}"
                                 for v, r in recall[kind]["variants"].items())
            log(f"  {kind}: {trace.num_tokens} tokens in {len(docs)} prompts; lookahead recall@k {variants}; "
                f"router agreement {recall[kind]['router_agreement']}")
        live = None
        if args.live_check:
            live = live_lookahead(path, trace_docs(corpus, "prose", 256, args.live_check, info["eos_id"]), device)
            log(f"  live lookahead recall@k over {live['tokens']} prose tokens: {live['live_recall_at_k']:.3f} "
                f"(offline on the same tokens {live['offline_recall_at_k']:.3f})")
        results["models"][name] = dict(**trained, config=model.config.to_diff_dict(), perplexity=ppl, lookahead=recall,
                                       live_lookahead=live, checkpoint=str(path))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (out / "train_log.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "train_log.txt").write_text("\n".join(log_lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
