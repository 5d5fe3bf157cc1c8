"""The text the realistic-routing models train on: real files of this machine, split by kind, and a
BPE tokenizer trained on the training split.

No hub is reachable, so the corpus is what any Debian + pyenv machine holds:

- ``code``: CPython's standard library sources (``lib/python3.X/**/*.py``, site-packages excluded);
- ``prose``: English man pages (``/usr/share/man/man[1-8]``, roff markup stripped) and the changelogs
  of ``/usr/share/doc``;
- ``mixed``: package READMEs: the long descriptions in installed packages' ``METADATA`` and the
  README / ``.md`` / ``.rst`` / ``.txt`` files of ``/usr/share/doc`` (prose with code and commands).

Every document goes to the train or held-out split by a hash of its path, and each kind is cut to
a character budget in sorted-path order, so the same machine always gives the same corpus. The
output directory holds ``corpus.npz`` (uint16 token ids: ``train`` and, per kind, ``heldout_<kind>``
with ``heldout_<kind>_starts`` = document offsets), ``tokenizer.json`` and ``corpus.json`` (sizes,
sources). ``benchmarks/train_moe.py`` trains on it; run this on the CPU machine, carry the output.

    python benchmarks/moe_corpus.py --out .dev/traces/corpus
"""
from __future__ import annotations

import argparse
import email
import glob
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

KINDS = ("code", "prose", "mixed")
EOS = "<|endoftext|>"
_ROFF_ESCAPES = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\(..|\\\[[^\]]*\]|\\[&|^~0 ]|\\s[-+]?\d")


def _stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` (not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


def roff_to_text(src: str) -> str:
    """Man-page roff to plain text: comments and layout requests dropped, macro arguments kept."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].partition(" ")
            if name in ("TH", "so", "ds", "de", "nr", "if", "ie", "el", "ig", "ft", "ps", "in", "ta", "ne",
                        "na", "hy", "nh", "ad", "ll", "ti", "sp", "br", "PD", "fi", "nf", "ce", "EE", "EX",
                        "RS", "RE", "P", "PP", "LP", "TP", "IP", "HP", "\\}"):
                rest = rest if name in ("IP", "TP") else ""
            line = rest.replace('"', "")
        line = _ROFF_ESCAPES.sub("", line).replace("\\-", "-").replace("\\e", "\\")
        if line.strip():
            out.append(line)
    return "\n".join(out)


def _read(path: str) -> str:
    raw = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
    return raw.decode("utf-8", errors="replace")


def _metadata_description(path: str) -> str:
    msg = email.message_from_string(_read(path))
    body = msg.get_payload()
    return body if isinstance(body, str) else ""


def sources(python_lib: str) -> dict[str, list[tuple[str, callable]]]:
    """Per kind: sorted (path, reader) pairs of every candidate document."""
    code = sorted(p for p in glob.glob(f"{python_lib}/**/*.py", recursive=True) if "site-packages" not in p)
    man = sorted(glob.glob("/usr/share/man/man[1-8]/*.gz"))
    changelogs = sorted(p for p in glob.glob("/usr/share/doc/**/changelog*", recursive=True))
    readmes = sorted(p for p in glob.glob("/usr/share/doc/**/*", recursive=True)
                     if Path(p).is_file() and re.search(r"(^README|\.md$|\.rst$|\.txt$)", Path(p).name, re.I))
    roots = sorted({sys.base_prefix, sys.prefix, "/usr/lib/python3", "/usr/local/lib"})
    metadata = sorted({p for r in roots for p in glob.glob(f"{r}/**/site-packages/*.dist-info/METADATA",
                                                             recursive=True)})
    return {
        "code": [(p, _read) for p in code],
        "prose": [(p, lambda q: roff_to_text(_read(q))) for p in man] + [(p, _read) for p in changelogs],
        "mixed": [(p, _metadata_description) for p in metadata] + [(p, _read) for p in readmes],
    }


def collect(kind: str, docs, budget_chars: int, heldout: float, min_chars: int = 200,
            max_chars: int = 50_000) -> tuple[list[str], list[str]]:
    """Train and held-out texts of one kind: documents in a hash order, deduplicated, cut to the budget."""
    seen, train, held, total = set(), [], [], 0
    for path, reader in sorted(docs, key=lambda d: _stable_fraction("order:" + d[0])):
        try:
            text = reader(path)
        except (OSError, EOFError, UnicodeError, gzip.BadGzipFile):
            continue
        text = text.replace(EOS, "")[:max_chars]
        digest = hashlib.sha256(text.encode()).digest()
        if len(text) < min_chars or digest in seen:
            continue
        seen.add(digest)
        (held if _stable_fraction("split:" + path) < heldout else train).append(text)
        total += len(text)
        if total >= budget_chars:
            break
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over ``texts`` with ``EOS`` as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the documents, each followed by EOS, and each document's start offset."""
    eos = tok.token_to_id(EOS)
    ids = [e.ids + [eos] for e in tok.encode_batch(texts)]
    starts = np.cumsum([0] + [len(x) for x in ids[:-1]]).astype(np.int64)
    flat = np.fromiter((t for x in ids for t in x), dtype=np.uint16, count=sum(len(x) for x in ids))
    return flat, starts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--python-lib", default=f"{sys.base_prefix}/lib/python{sys.version_info.major}."
                                            f"{sys.version_info.minor}")
    ap.add_argument("--chars", type=str, default="code=18e6,prose=18e6,mixed=8e6",
                    help="character budget per kind (train + held-out)")
    ap.add_argument("--heldout", type=float, default=0.05, help="fraction of documents held out")
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args(argv)
    if args.vocab > 65535:
        raise SystemExit(f"--vocab {args.vocab}: token ids are stored as uint16; use at most 65535")
    budgets = {k: int(float(v)) for k, v in (kv.split("=") for kv in args.chars.split(","))}
    if set(budgets) != set(KINDS):
        raise SystemExit(f"--chars must give a budget for each of {KINDS}, got {sorted(budgets)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    srcs = sources(args.python_lib)
    splits = {k: collect(k, srcs[k], budgets[k], args.heldout) for k in KINDS}
    train_texts = [t for k in KINDS for t in splits[k][0]]
    tok = train_tokenizer(train_texts, args.vocab)
    tok.save(str(out / "tokenizer.json"))
    arrays, info = {}, dict(vocab_size=tok.get_vocab_size(), eos_id=tok.token_to_id(EOS), kinds={},
                            python_lib=args.python_lib, budgets=budgets, heldout=args.heldout)
    train_parts = []
    for k in KINDS:
        tr, tr_starts = encode_docs(tok, splits[k][0])
        ho, ho_starts = encode_docs(tok, splits[k][1])
        train_parts.append((tr, tr_starts))
        arrays[f"heldout_{k}"], arrays[f"heldout_{k}_starts"] = ho, ho_starts
        info["kinds"][k] = dict(train_docs=len(splits[k][0]), heldout_docs=len(splits[k][1]),
                                train_chars=sum(map(len, splits[k][0])), train_tokens=int(tr.size),
                                heldout_tokens=int(ho.size), sources=len(srcs[k]))
    # Documents of all kinds interleaved in a fixed order, so every training batch mixes kinds.
    docs = [(k, i) for k, (_, st) in enumerate(train_parts) for i in range(st.size)]
    docs.sort(key=lambda d: _stable_fraction(f"mix:{d[0]}:{d[1]}"))
    pieces = []
    for k, i in docs:
        flat, st = train_parts[k]
        end = st[i + 1] if i + 1 < st.size else flat.size
        pieces.append(flat[st[i]:end])
    arrays["train"] = np.concatenate(pieces)
    info["train_tokens"] = int(arrays["train"].size)
    np.savez_compressed(out / "corpus.npz", **arrays)
    (out / "corpus.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
