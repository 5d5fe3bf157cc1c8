"""A checkpoint on disk: where it is (local directory or the offline Hugging Face cache) and which
tensors its safetensors files hold, with every file's header checked before anything is loaded.

This module reads headers and single tensors; it knows nothing about experts, slots or devices
beyond the one a tensor is read to.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .files import read_text, regular_file

# safetensors dtype tags -> torch dtypes (the ones MoE checkpoints use).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint cannot be found, or its files are not usable safetensors."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset_bytes: int   # from the start of the file
    nbytes: int


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def resolve_checkpoint(model: str | os.PathLike, *, revision: str = "main") -> Path:
    """The local directory of ``model``: a directory path, or a hub id found in the local HF cache.

    Never touches the network: a hub id must already be in the cache
    (``models--{org}--{name}/snapshots/<commit>/``, with ``refs/<revision>`` naming the commit).
    """
    if not isinstance(model, (str, os.PathLike)):
        raise CheckpointError(f"model must be a checkpoint directory (a str or path) or a hub id 'org/name', "
                              f"not {model!r:.60} ({type(model).__name__})")
    name = os.fspath(model)
    if not isinstance(name, str) or not name.strip():  # Path("") is the current directory: never a silent pick
        raise CheckpointError(f"model {model!r:.60} names no checkpoint; pass its directory ('.' for the current "
                              "one) or a hub id 'org/name'")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name} is a file; moerun.load expects a checkpoint directory or a hub id")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"no checkpoint directory {name!r} exists, and it is not a hub id of the form 'org/name'"
        )
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + name.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    ref = _inside(repo_dir / "refs", revision, f"revision {revision!r}")
    snapshot: Path | None = None
    if ref.is_file():
        commit = read_text(ref, limit_bytes=4096, what="hub cache ref").strip()
        snapshot = _inside(snapshots, commit, f"{ref} (which names {commit!r})")
    elif (snapshots / revision).is_dir():  # a commit hash given as the revision
        snapshot = _inside(snapshots, revision, f"revision {revision!r}")
    if snapshot is None or not snapshot.is_dir():
        raise CheckpointError(
            f"model {name!r} (revision {revision!r}) is not in the local Hugging Face cache {cache} and "
            "moerun does not download. Fetch it on a machine with network access, e.g. "
            f"`huggingface-cli download {name}` (set HF_HUB_CACHE or HF_HOME to use another cache), "
            "or pass the path of a local checkpoint directory."
        )
    return snapshot


def _inside(directory: Path, name: str, what: str) -> Path:
    """``directory / name`` when the name stays inside ``directory`` (no ``..``, no absolute path);
    CheckpointError otherwise: a file's contents must not choose what moerun reads. Checked on the
    name, not the resolved path: the hub cache's files are symlinks into its ``blobs/`` folder."""
    parts = Path(name).parts
    if not name.strip() or Path(name).is_absolute() or ".." in parts or "\0" in name:
        raise CheckpointError(f"{what} points outside {directory}; the checkpoint or cache is corrupted "
                              "or was tampered with")
    return directory / name


def read_json_object(file: Path, what: str, limit_bytes: int = _MAX_HEADER_BYTES) -> dict:
    """A JSON object from a small checkpoint file; CheckpointError naming the file otherwise."""
    try:
        value = json.loads(read_text(file, limit_bytes=limit_bytes, what=what))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{file}: not a readable {what} ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: a {what} is a JSON object, not {type(value).__name__}")
    return value


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Tensors of one safetensors file, with the header checked against the file size."""
    try:
        size = regular_file(file, "safetensors file").stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors header")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{file}: header length {header_bytes} does not fit the file ({size} bytes); "
                    "the file is corrupted or not safetensors"
                )
            header = json.loads(f.read(header_bytes))
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise CheckpointError(f"{file}: unreadable safetensors header ({exc}); the file is corrupted") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is a JSON {type(header).__name__}, not an object; "
                              "the file is corrupted or not safetensors")
    data_start = 8 + header_bytes
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _tensor_info(file, key, entry, data_start, size)
    return tensors


def _tensor_info(file: Path, key: str, entry, data_start: int, size: int) -> TensorInfo:
    """One header entry checked: a known dtype, a shape, offsets inside the file that hold exactly
    that many bytes."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: tensor {key} {why}; the file is corrupted or not safetensors")

    if not isinstance(entry, dict):
        raise corrupt(f"has a header entry {entry!r:.60}, not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        if isinstance(dtype, str):
            raise CheckpointError(f"{file}: tensor {key} has unsupported dtype {dtype}")
        raise corrupt(f"has dtype {dtype!r:.60}")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise corrupt(f"has shape {shape!r:.60}, not a list of whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise corrupt(f"has data_offsets {offsets!r:.60}, not [begin, end]")
    begin, end = offsets
    if data_start + end > size:
        raise CheckpointError(
            f"{file}: tensor {key} ends at byte {data_start + end} but the file has {size} bytes; "
            "the file is truncated (re-download or re-save it)"
        )
    numel = 1
    for d in shape:
        numel *= d
    torch_dtype = SAFETENSORS_DTYPES[dtype]
    if numel * torch_dtype.itemsize != end - begin:
        raise corrupt(f"of shape {shape} in {dtype} needs {numel * torch_dtype.itemsize} bytes, "
                      f"its data_offsets give {end - begin}")
    return TensorInfo(file, torch_dtype, tuple(shape), data_start + begin, end - begin)


# Names (glob patterns) of the files a transformers tokenizer is read from. Their presence tells a
# tokenizer that fails to load (repair the file) from a checkpoint that has none (add the files).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "*.model", "*.tiktoken")
_MAX_FAULT_CHARS = 300  # of a library's message quoted in an error line


@dataclass(frozen=True)
class TokenizerFault:
    """Why a checkpoint has no usable tokenizer: ``why`` (a phrase naming the files and the fault),
    ``files`` (the tokenizer files it has: none when the tokenizer is missing) and ``blame`` (those
    to repair or replace)."""

    why: str
    files: tuple[str, ...]
    blame: tuple[str, ...]

    def remedy(self) -> str:
        """What the user can do about it (a phrase)."""
        if not self.files:
            return "add the model's tokenizer files to the checkpoint directory"
        return (f"repair or replace {', '.join(self.blame)}, e.g. with the tokenizer files of the model this "
                "checkpoint was made from")


def read_tokenizer(path: Path):
    """``(tokenizer, None)``, or ``(None, TokenizerFault)`` when the checkpoint at ``path`` has no
    usable tokenizer: none at all, or files that fail to load (any error of the library's).

    Without tokenizer files transformers may still build the architecture's tokenizer class with an
    empty vocabulary (special tokens only), which turns any text into no tokens: that counts as none.
    """
    from transformers import AutoTokenizer

    files = tuple(sorted({f.name for pattern in TOKENIZER_FILES for f in path.glob(pattern) if f.is_file()}))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - a malformed file surfaces as any error type (KeyError, JSON, Rust)
        if not files:
            return None, TokenizerFault("no tokenizer files found", files, files)
        return None, _fault_of_files(path, files, exc)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        why = f"{', '.join(files)} give an empty vocabulary" if files else "its vocabulary is empty"
        return None, TokenizerFault(why, files, files)
    return tokenizer, None


def _fault_of_files(path: Path, files: tuple[str, ...], exc: Exception) -> TokenizerFault:
    """The fault of tokenizer ``files`` that raised ``exc``: the first that is not valid JSON, if one
    is, else all of them with the library's message."""
    for name in files:
        if name.endswith(".json"):
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as bad:  # ValueError: JSON or UTF-8
                return TokenizerFault(f"{name} is not valid JSON: {_one_line(bad)}", files, (name,))
    return TokenizerFault(f"transformers cannot load {', '.join(files)}: {type(exc).__name__}: {_one_line(exc)}",
                          files, files)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _MAX_FAULT_CHARS else text[:_MAX_FAULT_CHARS - 1] + "…"


def checkpoint_with_tokenizer(model: str | os.PathLike, needed_for: str) -> tuple[Path, object]:
    """The checkpoint directory of ``model`` and its tokenizer, checked before a (long) load; a
    :class:`CheckpointError` saying what ``needed_for`` (e.g. "`moerun serve` needs one to read prompts")
    when the checkpoint is missing or has no usable tokenizer, with the files at fault and what to do."""
    path = resolve_checkpoint(model)
    tokenizer, fault = read_tokenizer(path)
    if fault:
        raise CheckpointError(f"{path} has no usable tokenizer ({fault.why}); {needed_for}: {fault.remedy()}")
    return path, tokenizer


class Checkpoint:
    """The safetensors tensors of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: Path):
        self.path = path
        files = self._weight_files(path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for key, info in read_safetensors_header(file).items():
                if key in self.tensors:  # which one a reader would take depends on the order: refuse both
                    raise CheckpointError(
                        f"{path}: tensor {key} is in both {self.tensors[key].file.name} and {file.name}; a "
                        "checkpoint holds each tensor once. Remove the stale shard (or re-save the checkpoint) "
                        "so that one file holds it")
                self.tensors[key] = info

    @staticmethod
    def _weight_files(path: Path) -> list[Path]:
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json_object(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names; "
                                      "the index is corrupted")
            files = sorted({_inside(path, name, f"{index} shard {name!r}") for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
            return files
        single = path / "model.safetensors"
        if single.is_file():
            return [single]
        others = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".ckpt"))
        if others:
            raise CheckpointError(
                f"{path} holds {', '.join(others[:3])} but no safetensors; moerun reads safetensors only. "
                "Convert once with transformers: AutoModelForCausalLM.from_pretrained(path)"
                ".save_pretrained(new_path) (writes safetensors)."
            )
        raise CheckpointError(
            f"{path} has no model.safetensors or model.safetensors.index.json; is it a model checkpoint?"
        )

    def read(self, keys: list[str], device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for each of ``keys``, read from the files straight to ``device``."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        for file, file_keys in sorted(by_file.items()):
            try:
                with safe_open(str(file), framework="pt", device=str(device)) as f:
                    for key in file_keys:
                        yield key, f.get_tensor(key)
            except Exception as exc:  # safetensors raises its own error types for bad files
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"{file}: cannot read tensors ({exc}); the file may be corrupted") from exc

    def files(self) -> list[Path]:
        """The safetensors files, in name order."""
        return sorted({info.file for info in self.tensors.values()})
