"""``moerun run MODEL [PROMPT]``: talk to a model from the shell.

With a PROMPT, the completion of that text streams to stdout token by token; without one, an
interactive chat on stdin/stdout in the checkpoint's chat template, the whole conversation kept as
history (``/clear`` forgets it; ``/exit`` or end of input quits; Ctrl-C cuts the reply being
written short and returns to the prompt, the partial reply kept; a message the chat template rejects
is refused with the template's reason and left out of the history). Load progress and, after each
reply, its speed and the expert cache's hit rate go to stderr, so stdout holds only the text.

Generation is transformers' ``model.generate`` with a streamer: this module knows nothing of the
runtime beyond ``model.moerun.stats()``. A checkpoint without a tokenizer (or, to chat, without a
chat template, or with one that fails on a one-message conversation) fails before the model loads.
Decoding is greedy unless ``--temperature`` > 0; ``--expert-format`` and ``--dtype`` are moerun.load's.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from .cli import add_expert_options, whole_number
from .policy.errors import PolicyError

INT64_MAX = 2**63 - 1
DEFAULT_MAX_NEW_TOKENS = 512
CHAT_PROMPT = ">>> "
EXIT_COMMANDS = ("/exit", "/quit")
CLEAR_COMMAND = "/clear"


class RunError(ValueError):
    """Input ``moerun run`` cannot work with: the message says what and what to do instead."""


ERRORS = (RunError, PolicyError)  # what this command raises for bad input (moerun.cli prints it)


def add_parser(subparsers) -> None:
    """Register ``moerun run``."""
    p = subparsers.add_parser("run", help="stream a completion of PROMPT, or chat with the model without one")
    p.__class__ = _IntermixedParser
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id in the local HF cache")
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="text to complete (no chat template); without it, an interactive chat")
    p.add_argument("--policy", default="balanced.moe", help=".moe file, policy text, or bundled name")
    p.add_argument("--vram-budget", default="auto", help="device bytes for the model and its experts (e.g. 10GiB)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: CUDA when available)")
    add_expert_options(p)
    p.add_argument("--max-context", type=whole_number(1, 2**31 - 1), default=4096,
                   help="tokens per sequence (prompt, history and reply) the model is loaded for")
    p.add_argument("--max-new-tokens", type=whole_number(1, 2**31 - 1), default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest reply in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=_float_in(0.0, math.inf, low_open=False), default=None,
                   help="sample at this temperature (> 0); default and 0: greedy decoding")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=None,
                   help="sampling: keep the smallest set of tokens whose probability reaches P (0 < P <= 1)")
    p.add_argument("--top-k", type=whole_number(1, 2**31 - 1), default=None,
                   help="sampling: keep the K most likely tokens")
    p.add_argument("--seed", type=whole_number(0, INT64_MAX), default=None, help="sampling: random seed")
    p.set_defaults(func=run)


class _IntermixedParser(argparse.ArgumentParser):
    """Options may stand between MODEL and PROMPT (``moerun run MODEL --device cpu "Hi"``): plain
    argparse binds every positional at the first one it meets, and PROMPT would be left over."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back here (Python < 3.13)
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _float_in(lo: float, hi: float, *, low_open: bool):
    """An argparse ``type``: a finite number in ``lo..hi`` (``(lo..hi]`` when ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= lo if low_open else value < lo
        if not math.isfinite(value) or below or value > hi:
            bounds = f"{'>' if low_open else '>='} {lo:g}" + (f" and <= {hi:g}" if math.isfinite(hi) else "")
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {bounds}")
        return value

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


def sampling_options(args: argparse.Namespace) -> dict:
    """``generate()`` keyword arguments of the sampling flags: greedy unless ``--temperature`` > 0;
    ``--top-p``/``--top-k``/``--seed`` without it are an error (they would silently do nothing)."""
    sampling = args.temperature is not None and args.temperature > 0
    given = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k), ("--seed", args.seed))
             if value is not None]
    if given and not sampling:
        verb = "applies" if len(given) == 1 else "apply"
        raise RunError(f"{', '.join(given)} only {verb} when sampling; add --temperature T (T > 0) to sample "
                       "(without it decoding is greedy)")
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": sampling}
    if sampling:
        options["temperature"] = args.temperature
        options.update({k: v for k, v in (("top_p", args.top_p), ("top_k", args.top_k)) if v is not None})
    return options


def run(args: argparse.Namespace, *, stdin=None, stdout=None, stderr=None) -> int:
    """The command: check the flags and the tokenizer, load the model, then complete or chat."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    options = sampling_options(args)
    path, tokenizer = _checkpoint_and_tokenizer(args.model, chat=args.prompt is None)
    if args.prompt is not None:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids  # [1, T]
        if ids.shape[1] == 0:
            raise RunError("the prompt is empty (no tokens); give some text to complete, or no PROMPT to chat")
        options = _fit(options, ids.shape[1], args.max_context)
    model = _load(path, args, stderr)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    if args.prompt is not None:
        _, interrupted = reply(model, tokenizer, ids, options, stdout, stderr)
        return 130 if interrupted else 0
    chat(model, tokenizer, options, args.max_context, stdin, stdout, stderr)
    return 0


def _fit(options: dict, prompt_tokens: int, max_context: int) -> dict:
    """``options`` with max_new_tokens cut to what fits beside the prompt in ``max_context``."""
    room = max_context - prompt_tokens
    if room < 1:
        raise RunError(f"the prompt is {prompt_tokens} tokens, but the model is loaded for {max_context} per "
                       "sequence (prompt and reply); pass a larger --max-context or a shorter prompt")
    return {**options, "max_new_tokens": min(options["max_new_tokens"], room)}


def _checkpoint_and_tokenizer(model: str, *, chat: bool):
    """The checkpoint's directory and tokenizer (and, to chat, its template), checked before the (long) load."""
    from .checkpoint import CheckpointError, checkpoint_with_tokenizer

    try:
        path, tokenizer = checkpoint_with_tokenizer(model, "`moerun run` needs one to turn text into tokens")
    except CheckpointError as exc:
        raise RunError(str(exc)) from None
    if chat and not getattr(tokenizer, "chat_template", None):
        raise RunError(f"{path} has a tokenizer but no chat template, so it cannot chat; give a PROMPT to "
                       "complete text instead, or add a chat template (chat_template.jinja) to the checkpoint")
    if chat:
        try:  # a template that fails on the simplest conversation would refuse every turn
            render_chat(tokenizer, [{"role": "user", "content": "Hello"}])
        except TemplateRejection as exc:
            raise RunError(f"{path}: the chat template fails on a one-message conversation ({exc.reason}), so it "
                           "cannot chat; fix the checkpoint's chat template, or give a PROMPT to complete text "
                           "instead") from None
    return path, tokenizer


class TemplateRejection(Exception):
    """The chat template raised on a conversation; ``reason`` is its message (e.g. "roles must alternate")."""

    def __init__(self, reason: str):
        super().__init__(f"the chat template rejected the conversation: {reason}")
        self.reason = reason


def render_chat(tokenizer, messages: list[dict]):
    """Token ids [1, T] of ``messages`` in the chat template, ready for the assistant's reply; a
    :class:`TemplateRejection` when the template raises."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template rejects messages with its own exception types
        raise TemplateRejection(" ".join(str(exc).split())) from None
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids  # [1, T]


def _load(path, args: argparse.Namespace, stderr):
    """``moerun.load`` with the flags; load failures become one-line errors."""
    from .checkpoint import CheckpointError
    from .checkpoint_quantization import ExpertFormatError
    from .loader import LoadError, load
    from .models import UnsupportedArchitectureError
    from .runtime.memory import BudgetError
    from .transformers_contract import TransformersMismatch

    try:
        model = load(path, policy=args.policy, vram_budget=args.vram_budget, device=args.device, dtype=args.dtype,
                     expert_format=args.expert_format, max_context=args.max_context, progress=True)
    except (LoadError, CheckpointError, BudgetError, ExpertFormatError, UnsupportedArchitectureError,
            TransformersMismatch) as exc:
        raise RunError(str(exc)) from None
    handle = model.moerun
    memory = handle.memory()["device"]
    info = handle.model_info
    print(f"moerun: loaded in {sum(handle.load_seconds.values()):.1f} s on {handle.decoder.device}, "
          f"{memory['num_slots']} expert slots, {info['dtype']} compute, {info['expert_format']} experts", file=stderr)
    return model


class TerminalStreamer:
    """A transformers streamer that writes the reply's text to ``out`` as it is decoded, and keeps
    the reply's token ids and when the first and the last arrived."""

    def __init__(self, tokenizer, out):
        from transformers import TextStreamer

        class _Writer(TextStreamer):
            def on_finalized_text(writer, text: str, stream_end: bool = False) -> None:  # noqa: N805
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        self._text = _Writer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.tokens: list[int] = []
        self.first_at = self.last_at = None

    def put(self, value) -> None:
        """Called by generate(): the prompt first, then each step's new token."""
        if not self._text.next_tokens_are_prompt:
            self.tokens.extend(value.reshape(-1).tolist())
            self.last_at = time.perf_counter()
            self.first_at = self.first_at or self.last_at
        self._text.put(value)

    def end(self) -> None:
        """The reply is over (or cut short): the text not yet written, and a newline."""
        self._text.end()


def reply(model, tokenizer, ids, options: dict, out, err) -> tuple[list[int], bool]:
    """Stream the model's continuation of ``ids`` [1, T] to ``out`` and its speed and hit rate to
    ``err``; returns the new token ids and whether Ctrl-C cut the reply short."""
    import torch

    streamer = TerminalStreamer(tokenizer, out)
    before = model.moerun.stats()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start, interrupted = time.perf_counter(), False
    try:
        model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, pad_token_id=pad, **options)
    except KeyboardInterrupt:
        interrupted = True
        streamer.end()  # the text of the tokens that came; the model settles the cut step on its next call
    print(_reply_line(streamer, start, before, model.moerun.stats(), interrupted), file=err)
    return streamer.tokens, interrupted


def _reply_line(streamer: TerminalStreamer, start: float, before: dict, after: dict, interrupted: bool) -> str:
    """``[12 tokens, 30.2 tok/s, first token 0.41 s, expert cache hit rate 87.5%]`` of one reply."""
    n = len(streamer.tokens)
    parts = [f"{n} token{'s' if n != 1 else ''}"]
    if n:
        elapsed = streamer.last_at - start
        parts.append(f"{n / elapsed:.1f} tok/s" if elapsed > 0 else "- tok/s")
        parts.append(f"first token {streamer.first_at - start:.2f} s")
    hits = after["hits"] - before["hits"]
    accesses = hits + after["misses"] - before["misses"]
    if accesses:
        parts.append(f"expert cache hit rate {100 * hits / accesses:.1f}%")
    if interrupted:
        parts.append("interrupted")
    return "[" + ", ".join(parts) + "]"


def chat(model, tokenizer, options: dict, max_context: int, stdin, out, err) -> None:
    """Turns until end of input or ``/exit``: each user line, with the conversation so far, through
    the chat template; the reply (cut at ``max_context`` tokens of conversation) streams and joins
    the history."""
    print(f"moerun: chatting; {EXIT_COMMANDS[0]} or Ctrl-D quits, {CLEAR_COMMAND} forgets the conversation, "
          "Ctrl-C stops a reply", file=err)
    history: list[dict] = []
    while True:
        try:
            line = _read_line(stdin, out)
        except KeyboardInterrupt:
            print(f"\n(type {EXIT_COMMANDS[0]} or press Ctrl-D to quit)", file=err)
            continue
        if line is None or line.strip() in EXIT_COMMANDS:
            return
        text = line.strip()
        if not text:
            continue
        if text == CLEAR_COMMAND:
            history.clear()
            print("(conversation cleared)", file=err)
            continue
        turn = history + [{"role": "user", "content": text}]
        try:  # a refused turn leaves the history as it was: the conversation goes on without it
            ids = render_chat(tokenizer, turn)  # [1, T]
            fitted = _fit(options, ids.shape[1], max_context)
        except (TemplateRejection, RunError) as exc:
            print(f"error: {exc}; the message was not sent ({CLEAR_COMMAND} starts over)", file=err)
            continue
        tokens, _ = reply(model, tokenizer, ids, fitted, out, err)
        history = turn + [{"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)}]


def _read_line(stdin, out) -> str | None:
    """One line of input after the prompt; None at end of input. A terminal gets line editing."""
    if stdin is sys.stdin and stdin.isatty() and out is sys.stdout:
        try:
            return input(CHAT_PROMPT)
        except EOFError:
            print(file=out)
            return None
    out.write(CHAT_PROMPT)
    out.flush()
    line = stdin.readline()
    return line if line else None
