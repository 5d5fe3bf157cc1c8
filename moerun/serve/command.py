"""``moerun serve MODEL``: the OpenAI-compatible server (app.py) over continuous batching (batching.py).

Everything that can fail fast fails before the model loads: FastAPI and uvicorn installed (they
are the optional ``serve`` extra), the checkpoint found with a usable tokenizer, the address free.
Then the model loads with ``max_batch`` KV-cache rows (the most requests decoded at once) of
``max_context`` tokens each, activations reserved for one prefill forward of ``--prefill-chunk`` tokens
(the engine prefills one prompt at a time: by default a whole prompt, ``max_context`` tokens, where
moerun.load's default would reserve ``max_batch x max_context``; fewer gives the expert arena the rest
and prefills longer prompts in chunks), its experts in ``--expert-format`` (quantized at load) and its
compute in ``--dtype``; and uvicorn serves until SIGINT or SIGTERM: it stops accepting
connections, lets requests in flight finish for up to ``--shutdown-timeout`` seconds, then cancels
the rest (their rows are freed; a stream ends with an error event and ``data: [DONE]``, a whole reply
is a 503 error body) and stops the engine. Requests beyond the free rows and ``--max-queue`` waiting
ones are refused with a 503 and ``Retry-After``.
Then the signal ends the process as it would have (uvicorn re-raises it: SIGINT exits with status
130, SIGTERM as terminated by it). A second signal exits at once.
"""
from __future__ import annotations

import argparse
import socket
import sys

from ..cli import add_expert_options, whole_number
from ..policy.errors import PolicyError

DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 4
DEFAULT_SHUTDOWN_TIMEOUT_S = 10


class ServeError(ValueError):
    """Input ``moerun serve`` cannot work with: the message says what and what to do instead."""


ERRORS = (ServeError, PolicyError)  # what this command raises for bad input (moerun.cli prints it)


def add_parser(subparsers) -> None:
    """Register ``moerun serve``."""
    from .batching import DEFAULT_MAX_PREFILL_TOKENS, DEFAULT_MAX_QUEUE

    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id in the local HF cache")
    p.add_argument("--policy", default="balanced.moe", help=".moe file, policy text, or bundled name")
    p.add_argument("--vram-budget", default="auto", help="device bytes for the model and its experts (e.g. 10GiB)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: CUDA when available)")
    p.add_argument("--max-batch", type=whole_number(1, 4096), default=DEFAULT_MAX_BATCH,
                   help=f"requests decoded together: KV-cache rows (default {DEFAULT_MAX_BATCH}); more wait their turn")
    p.add_argument("--max-context", type=whole_number(1, 2**31 - 1), default=4096,
                   help="tokens per request, prompt and reply (default 4096); the KV reserve is max-batch x this")
    p.add_argument("--prefill-chunk", type=whole_number(1, 2**31 - 1), default=None,
                   help="tokens of one prefill forward, the activations the memory plan reserves (default: "
                        "--max-context, a whole prompt at once); a longer prompt is prefilled in chunks of this many, "
                        "and the expert arena gets the memory saved (at least --max-batch, at most --max-context)")
    add_expert_options(p)
    p.add_argument("--max-prefill-tokens", type=whole_number(1, 2**31 - 1), default=DEFAULT_MAX_PREFILL_TOKENS,
                   help="prompt tokens prefilled between two decode steps while requests are decoding "
                        f"(default {DEFAULT_MAX_PREFILL_TOKENS}; at least one prompt)")
    p.add_argument("--max-queue", type=whole_number(0, 2**31 - 1), default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a row (default {DEFAULT_MAX_QUEUE}); one more gets a 503 with "
                        "Retry-After (0: none wait)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=whole_number(0, 65535), default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients pass and /v1/models lists (default: MODEL as given)")
    p.add_argument("--shutdown-timeout", type=whole_number(0, 86400), default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help=f"seconds requests in flight may finish after SIGINT/SIGTERM (default {DEFAULT_SHUTDOWN_TIMEOUT_S})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info: one line per request)")
    p.set_defaults(func=run)


def require_dependencies() -> None:
    """FastAPI and uvicorn are importable, else a ServeError saying how to install them."""
    missing = []
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ServeError(f"`moerun serve` needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         'not installed; install the serve extra: pip install "moerun[serve]"')


def run(args: argparse.Namespace) -> int:
    """The command: check, load, serve until a signal (module docstring)."""
    prefill_chunk(args)
    require_dependencies()
    path, tokenizer = checkpoint_and_tokenizer(args.model)
    _check_address(args.host, args.port)
    model = load_model(path, args)
    import uvicorn

    from .app import create_app
    from .batching import BatchingEngine

    engine = BatchingEngine(model, max_prefill_tokens=args.max_prefill_tokens,
                            max_queue=args.max_queue)
    name = args.served_model_name or args.model
    app = create_app(engine, tokenizer, model_name=name, runtime_stats=model.moerun.stats)
    print(f"moerun: serving {name!r} on http://{args.host}:{args.port}/v1 ({engine.max_batch} rows of "
          f"{engine.max_context} tokens, decode path: {engine.stats()['decode_path']}); Ctrl-C stops", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    uvicorn.Server(config).run()  # returns after SIGINT/SIGTERM and the shutdown
    return 0


def prefill_chunk(args: argparse.Namespace) -> int:
    """Tokens of the largest prefill forward the engine runs, which the memory plan reserves activations for:
    ``--prefill-chunk``, by default one whole prompt (the engine prefills one prompt at a time); a ServeError
    for a value load() or the engine cannot use."""
    most = max(args.max_context, args.max_batch)  # a decode step of every row is a forward of max_batch tokens
    if args.prefill_chunk is None:
        return most
    if not args.max_batch <= args.prefill_chunk <= most:
        raise ServeError(f"--prefill-chunk must be in {args.max_batch}..{most} tokens (at least --max-batch: a decode "
                         f"step of every row is one forward; at most --max-context: one prompt), got "
                         f"{args.prefill_chunk}")
    return args.prefill_chunk


def checkpoint_and_tokenizer(model: str):
    """The checkpoint's directory and tokenizer, checked before the (long) load."""
    from ..checkpoint import CheckpointError, checkpoint_with_tokenizer

    try:
        return checkpoint_with_tokenizer(model, "`moerun serve` needs one to read prompts and write replies")
    except CheckpointError as exc:
        raise ServeError(str(exc)) from None


def _check_address(host: str, port: int) -> None:
    """The address can be listened on (before minutes of loading, not after)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"--host {host!r} is not an address this machine can listen on ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server using it? "
                             "Pick another --port") from None


def load_model(path, args: argparse.Namespace):
    """``moerun.load`` with the flags; load failures become one-line errors."""
    from ..checkpoint import CheckpointError
    from ..checkpoint_quantization import ExpertFormatError
    from ..loader import LoadError, load
    from ..models import UnsupportedArchitectureError
    from ..runtime.memory import BudgetError
    from ..transformers_contract import TransformersMismatch

    try:
        model = load(path, policy=args.policy, vram_budget=args.vram_budget, device=args.device, dtype=args.dtype,
                     expert_format=args.expert_format, max_context=args.max_context, max_batch=args.max_batch,
                     prefill_chunk=prefill_chunk(args), progress=True)
    except (LoadError, CheckpointError, ExpertFormatError, BudgetError, UnsupportedArchitectureError,
            TransformersMismatch) as exc:
        raise ServeError(str(exc)) from None
    handle = model.moerun
    memory = handle.memory()
    print(f"moerun: loaded in {sum(handle.load_seconds.values()):.1f} s on {handle.decoder.device}, "
          f"{memory['device']['num_slots']} expert slots ({memory['experts']['format']}), prompts prefilled "
          f"{handle.plan.prefill_chunk} tokens a forward", file=sys.stderr)
    return model
