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
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists():
        raise CheckpointError(f"{name} is a file; moerun.load expects a checkpoint directory or a hub id")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"no checkpoint directory {name!r} exists, and it is not a hub id of the form 'org/name'"
        )
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + name.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / revision
    snapshot: Path | None = None
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
    elif (snapshots / revision).is_dir():  # a commit hash given as the revision
        snapshot = snapshots / revision
    if snapshot is None or not snapshot.is_dir():
        raise CheckpointError(
            f"model {name!r} (revision {revision!r}) is not in the local Hugging Face cache {cache} and "
            "moerun does not download. Fetch it on a machine with network access, e.g. "
            f"`huggingface-cli download {name}` (set HF_HUB_CACHE or HF_HOME to use another cache), "
            "or pass the path of a local checkpoint directory."
        )
    return snapshot


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Tensors of one safetensors file, with the header checked against the file size."""
    size = file.stat().st_size
    try:
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable safetensors header ({exc}); the file is corrupted") from exc
    data_start = 8 + header_bytes
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {key} has unsupported dtype {entry['dtype']}")
        if data_start + end > size:
            raise CheckpointError(
                f"{file}: tensor {key} ends at byte {data_start + end} but the file has {size} bytes; "
                "the file is truncated (re-download or re-save it)"
            )
        tensors[key] = TensorInfo(
            file, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin, end - begin
        )
    return tensors


class Checkpoint:
    """The safetensors tensors of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: Path):
        self.path = path
        files = self._weight_files(path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self.tensors.update(read_safetensors_header(file))

    @staticmethod
    def _weight_files(path: Path) -> list[Path]:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / name for name in weight_map.values()})
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
