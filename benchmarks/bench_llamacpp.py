"""llama.cpp beside moerun: the peer users would pick, on the same built-in checkpoint, precision and VRAM.

Stages, one function each, run in order by ``main``:

  source    ``--prepare-src OUT``: download the ``llama-cpp-python`` source distribution (its
            vendor/llama.cpp is llama.cpp at a pinned commit) and write a trimmed tree with only what
            llama-bench, llama-quantize and the HF->GGUF converter need (small enough to travel with a
            GPU call that has no network).
  build     cmake (CUDA when nvcc and a GPU are present), targets llama-bench and llama-quantize;
            an existing build directory is reused.
  convert   the built-in checkpoint (``moerun.bench.models.prepare_checkpoint``) -> GGUF bf16 with the
            tree's convert_hf_to_gguf.py; the built-in checkpoints have no tokenizer, so the converter's
            vocabulary step is replaced by a placeholder SentencePiece-style vocabulary of vocab_size tokens
            (llama-bench feeds random token ids; no text is tokenized).
  quantize  llama-quantize to Q8_0 and Q4_K_M.
  place     ``-ncmoe N`` (``--n-cpu-moe``: the routed experts of layers 0..N-1 stay in host memory) chosen
            as the smallest N whose GPU footprint, counted from the GGUF's tensor sizes, fits the budget
            (``gpu_footprint`` says what is counted).
  bench     ``llama-bench -o json`` per row; prefill (pp) and decode (tg) tok/s.
  report    a table and a JSON file; with ``--moerun-json`` moerun's rows beside llama.cpp's at equal
            precision and budget, each pair marked equal-precision or not from the experts' bits per weight.

This script knows nothing of moerun's runtime: it reads moerun's bench JSON (moerun.bench.report).

    python benchmarks/bench_llamacpp.py --prepare-src .peer/llama.cpp        # here, with network
    python benchmarks/bench_llamacpp.py --llama-src .peer/llama.cpp --synthetic tiny --budget 64MiB
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20

# -- source: the trimmed llama.cpp tree -------------------------------------------------------------------

LLAMA_CPP_PYTHON_VERSION = "0.3.36"   # the sdist --prepare-src downloads by default
SOURCE_INFO = "PEER_SOURCE.json"       # written into the trimmed tree: where it came from

# Paths of the llama.cpp tree kept by --prepare-src (relative to its root). A directory entry keeps
# everything under it; KEEP_GGML_BACKENDS are the ggml/src/ggml-* backend directories kept (the others,
# several MiB each, are never configured by a CPU or CUDA build).
KEEP_FILES = ("CMakeLists.txt", "LICENSE", "convert_hf_to_gguf.py")
KEEP_DIRS = ("cmake", "include", "src", "common", "vendor", "gguf-py/gguf", "conversion",
             "ggml/include", "ggml/cmake", "tools/llama-bench", "tools/quantize")
KEEP_GGML_BACKENDS = ("ggml-cpu", "ggml-cuda")
DROP_SUFFIXES = (".md", ".png", ".jpg", ".gif", ".gguf")

# tools/CMakeLists.txt of the trimmed tree: the upstream one adds every tool, whose sources are dropped.
TOOLS_CMAKELISTS = """\
# Written by moerun's benchmarks/bench_llamacpp.py --prepare-src: only the tools the peer bench builds.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(quantize)
"""


def keep_path(rel: str) -> bool:
    """Whether ``rel`` (a file path relative to llama.cpp's root, '/'-separated) goes into the trimmed tree."""
    if rel.endswith(DROP_SUFFIXES):
        return False
    if rel in KEEP_FILES or rel == "ggml/CMakeLists.txt" or rel == "gguf-py/pyproject.toml":
        return True
    if any(rel.startswith(d + "/") for d in KEEP_DIRS):
        return True
    if rel.startswith("ggml/src/"):
        rest = rel[len("ggml/src/"):]
        if "/" not in rest:          # ggml's own sources and CMakeLists
            return True
        return rest.split("/", 1)[0] in KEEP_GGML_BACKENDS
    return False


def _sdist_commit(root: Path) -> str:
    """The llama.cpp commit of an extracted llama-cpp-python sdist (it ships the submodule's git dir)."""
    tree = root / "vendor" / "llama.cpp"
    if shutil.which("git"):
        out = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    head = root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    if head.is_file() and re.fullmatch(r"[0-9a-f]{40}", head.read_text().strip()):
        return head.read_text().strip()
    return "unknown"


def trim_tree(sdist_root: Path, out: Path, *, version: str, sdist_name: str) -> dict:
    """Copy the kept files of ``sdist_root``/vendor/llama.cpp to ``out``; returns the source info written."""
    tree = sdist_root / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").is_file():
        raise SystemExit(f"{sdist_root}: no vendor/llama.cpp/CMakeLists.txt (not a llama-cpp-python sdist?)")
    if out.exists():
        shutil.rmtree(out)
    total = 0
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree).as_posix()
        if path.is_file() and not path.is_symlink() and keep_path(rel):
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            total += path.stat().st_size
    (out / "tools" / "CMakeLists.txt").write_text(TOOLS_CMAKELISTS)
    info = {"llama_cpp_python": version, "sdist": sdist_name, "llama_cpp_commit": _sdist_commit(sdist_root),
            "trimmed_bytes": total}
    (out / SOURCE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def prepare_src(out: Path, version: str) -> dict:
    """Download the llama-cpp-python sdist with pip and write the trimmed llama.cpp tree to ``out``."""
    with tempfile.TemporaryDirectory(prefix="llamacpp-sdist-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        tarball = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        return _trim_tarball(tarball, out, version)


def _trim_tarball(tarball: Path, out: Path, version: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="llamacpp-src-") as tmp:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        root = next(p for p in Path(tmp).iterdir() if p.is_dir())
        version = version or root.name.rsplit("-", 1)[-1]
        return trim_tree(root, out, version=version, sdist_name=tarball.name)


def resolve_src(src: Path) -> tuple[Path, dict]:
    """A llama.cpp tree from ``--llama-src``: a trimmed tree, a full llama.cpp checkout, an extracted
    llama-cpp-python sdist, or its .tar.gz (trimmed into ``.peer/`` beside it first)."""
    src = src.resolve()
    if src.is_file() and src.name.endswith(".tar.gz"):
        out = src.parent / ("llama.cpp-" + src.name.removesuffix(".tar.gz").rsplit("-", 1)[-1])
        if not (out / SOURCE_INFO).is_file():
            _trim_tarball(src, out)
        src = out
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src / "vendor" / "llama.cpp", {"llama_cpp_commit": _sdist_commit(src), "sdist": str(src)}
    if not (src / "CMakeLists.txt").is_file() or not (src / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"--llama-src {src}: not a llama.cpp tree (no CMakeLists.txt + convert_hf_to_gguf.py)")
    info_path = src / SOURCE_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "llama_cpp_commit" not in info and (src / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
        info["llama_cpp_commit"] = out.stdout.strip() or "unknown"
    return src, info


# -- build ------------------------------------------------------------------------------------------------

def has_cuda_gpu() -> bool:
    """nvcc to compile and a GPU to run on (a CUDA build without a GPU only costs build time)."""
    if not shutil.which("nvcc") or not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def build(tree: Path, build_dir: Path, *, cuda: bool, cuda_arch: str, jobs: int) -> tuple[Path, Path]:
    """Configure (once) and build llama-bench and llama-quantize; returns their paths."""
    if not (build_dir / "CMakeCache.txt").is_file():
        flags = ["-DCMAKE_BUILD_TYPE=Release", f"-DGGML_CUDA={'ON' if cuda else 'OFF'}",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF"]
        if cuda:
            flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
        _run(["cmake", "-S", str(tree), "-B", str(build_dir), *flags])
    _run(["cmake", "--build", str(build_dir), "--target", "llama-bench", "llama-quantize", "-j", str(jobs)])
    return build_dir / "bin" / "llama-bench", build_dir / "bin" / "llama-quantize"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


# -- convert ----------------------------------------------------------------------------------------------

# Run in a subprocess with llama.cpp's tree first on sys.path: the converter's own main(), with the
# model class's vocabulary step replaced (the built-in checkpoints have no tokenizer). The vocabulary is
# SentencePiece-style ("llama" in GGUF): <unk>, <s>, </s>, byte tokens when there is room (llama.cpp
# looks up the newline token as <0x0A> or "\n"), then placeholder pieces up to vocab_size.
CONVERT_BOOTSTRAP = """
import sys
tree, argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, tree)
import convert_hf_to_gguf as convert
from conversion import get_model_class, ModelBase
import gguf, json, pathlib

def placeholder_vocab(self):
    n = self.hparams["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    if n >= 3 + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [gguf.TokenType.BYTE] * 256
    else:
        tokens.append("\\n")
        types.append(gguf.TokenType.NORMAL)
    tokens += [f"\\u2581t{i}" for i in range(len(tokens), n)]
    types += [gguf.TokenType.NORMAL] * (n - len(types))
    tokens, types = tokens[:n], types[:n]
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n)
    w.add_token_types(types)
    w.add_unk_token_id(0); w.add_bos_token_id(1); w.add_eos_token_id(2)
    w.add_add_bos_token(False)

arch = json.loads((pathlib.Path(argv[0]) / "config.json").read_text())["architectures"][0]
get_model_class(arch).set_vocab = placeholder_vocab
sys.argv = ["convert_hf_to_gguf.py"] + argv
convert.main()
"""


def convert(tree: Path, checkpoint: Path, out: Path, outtype: str = "bf16") -> Path:
    """The checkpoint as GGUF ``outtype`` (bf16, or q8_0 under --low-disk; reused when ``out`` exists)."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.gguf")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree / "gguf-py"), os.environ.get("PYTHONPATH")])))
    _run([sys.executable, "-c", CONVERT_BOOTSTRAP, str(tree), str(checkpoint), "--outtype", outtype,
          "--outfile", str(partial)], env=env)
    os.replace(partial, out)
    return out


# -- GGUF tensors and what each quantization can take -----------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """One GGUF tensor: name, ggml type name, shape as ggml orders it (ne0 = row length first), bytes."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# llama.cpp's -ncmoe N places tensors matching blk.<i>.ffn_(up|down|gate|gate_up)_(ch|)exps, i < N, in
# host memory (common.h LLM_FFN_EXPS_REGEX); the token embeddings always stay there (the input layer).
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(up|down|gate|gate_up)_(ch|)exps\.")
HOST_TENSORS = ("token_embd.weight",)

# The block length of each target's main type: a row (ne0) that is not a multiple falls back to another
# type in llama-quantize. Q4_K_M's main type is Q4_K (256-value super-blocks); some tensors get Q6_K.
QUANT_TYPES = {"BF16": 1, "Q8_0": 32, "Q4_K_M": 256}
# What each llama.cpp type is compared with in moerun (expert formats of moerun.bench rows).
PRECISION_PEERS = {"BF16": ("float",), "Q8_0": ("int8", "fp8", "fp8-block128"),
                   "Q4_K_M": ("int4", "int4-g32", "int4-g64", "int4-g128", "mxfp4")}


def expert_layer(name: str) -> int | None:
    m = EXPERT_TENSOR.match(name)
    return int(m.group(1)) if m else None


def read_gguf(tree: Path, path: Path) -> tuple[dict, list[Tensor]]:
    """(metadata scalars, tensors) of a GGUF file, read with the tree's gguf-py."""
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {}
    for key, f in reader.fields.items():
        if len(f.types) == 1 and len(f.data) == 1 and not key.startswith("tokenizer."):
            value = f.parts[f.data[0]]
            meta[key] = bytes(value).decode("utf-8", "replace") if value.dtype.kind == "u" and value.dtype.itemsize == 1 \
                else value.tolist()[0]
    tensors = [Tensor(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in reader.tensors]
    return meta, tensors


def shape_check(qtype: str, tensors: list[Tensor]) -> tuple[bool, str]:
    """Whether ``qtype`` can hold the routed experts: (ok, note). Not ok when no expert tensor's rows fit the
    type's blocks (every one would fall back to another type: the row would measure a different format);
    a note when some fall back (llama-quantize does so itself and the file's real bits are reported)."""
    block = QUANT_TYPES[qtype]
    experts = [t for t in tensors if expert_layer(t.name) is not None]
    misfit = sorted({t.name.split(".", 2)[2] for t in experts if t.shape[0] % block})
    if experts and len(misfit) == len({t.name.split(".", 2)[2] for t in experts}):
        return False, (f"{qtype} needs rows of a multiple of {block} values; the experts' rows are "
                       f"{sorted({t.shape[0] for t in experts})} (every expert tensor would fall back to another type)")
    if misfit:
        return True, f"{', '.join(misfit)}: rows not a multiple of {block}, llama-quantize falls back for these"
    return True, ""


def expert_bits(tensors: list[Tensor]) -> float | None:
    """Bits per weight of the routed experts as stored (scales included)."""
    experts = [t for t in tensors if expert_layer(t.name) is not None]
    n = sum(t.n_elements for t in experts)
    return 8 * sum(t.n_bytes for t in experts) / n if n else None


# -- placement: -ncmoe from tensor sizes ------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """What llama-bench allocates besides weights, from the model's shapes and the bench settings."""

    n_layers: int
    n_embd: int
    n_vocab: int
    n_kv_heads: int
    head_dim: int
    n_ctx: int                 # prompt + generated tokens (llama-bench's context for a pp + tg test)
    n_ubatch: int = 512
    margin_bytes: int = 256 * MiB

    @property
    def kv_bytes(self) -> int:
        return 2 * self.n_layers * self.n_ctx * self.n_kv_heads * self.head_dim * 2      # K and V, f16

    @property
    def compute_bytes(self) -> int:
        return 4 * self.n_ubatch * (self.n_vocab + 16 * self.n_embd)                     # logits + activations

    @property
    def reserve_bytes(self) -> int:
        return self.kv_bytes + self.compute_bytes + self.margin_bytes


def gpu_footprint(tensors: list[Tensor], n_cpu_moe: int, reserve_bytes: int) -> int:
    """GPU bytes of a run with -ngl 99 -ncmoe ``n_cpu_moe``: every tensor except the token embeddings and
    the routed experts of layers 0..n_cpu_moe-1, plus the KV cache and compute buffers (``reserve_bytes``)."""
    on_gpu = 0
    for t in tensors:
        layer = expert_layer(t.name)
        if t.name in HOST_TENSORS or (layer is not None and layer < n_cpu_moe):
            continue
        on_gpu += t.n_bytes
    return on_gpu + reserve_bytes


def choose_ncmoe(tensors: list[Tensor], n_layers: int, budget_bytes: int, reserve_bytes: int) -> int | None:
    """The smallest -ncmoe whose footprint fits ``budget_bytes``; None when even every expert in host
    memory does not fit."""
    for n in range(n_layers + 1):
        if gpu_footprint(tensors, n, reserve_bytes) <= budget_bytes:
            return n
    return None


def runtime_of(meta: dict, tensors: list[Tensor], n_ctx: int, margin_bytes: int = 256 * MiB) -> Runtime:
    arch = meta["general.architecture"]
    n_embd = int(meta[f"{arch}.embedding_length"])
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_vocab = next(t.shape[1] for t in tensors if t.name == "token_embd.weight")
    return Runtime(n_layers=int(meta[f"{arch}.block_count"]), n_embd=n_embd, n_vocab=n_vocab,
                   n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
                   head_dim=int(meta.get(f"{arch}.attention.key_length", n_embd // n_head)), n_ctx=n_ctx,
                   margin_bytes=margin_bytes)


# -- bench ------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One llama.cpp run: a precision at one placement, measured or with the reason it did not run."""

    precision: str                     # BF16, Q8_0, Q4_K_M
    placement: str                     # "budget" (-ncmoe chosen for the budget) or "gpu" (everything on the GPU)
    budget: str = "-"
    budget_bytes: int | None = None
    n_cpu_moe: int | None = None
    est_vram_bytes: int | None = None
    expert_bits: float | None = None
    prefill_tok_s: float | None = None
    prefill_std: float | None = None
    decode_tok_s: float | None = None
    decode_std: float | None = None
    status: str = "ok"
    notes: str = ""
    command: str = ""


def bench_command(bench_bin: Path, model: Path, *, prompt: int, gen: int, threads: int, n_cpu_moe: int,
                  repetitions: int) -> list[str]:
    return [str(bench_bin), "-m", str(model), "-p", str(prompt), "-n", str(gen), "-fa", "1", "-t", str(threads),
            "-ngl", "99", "-ncmoe", str(n_cpu_moe), "-r", str(repetitions), "-o", "json"]


def parse_bench(stdout: str) -> dict[str, tuple[float, float]]:
    """llama-bench -o json -> {"prefill": (avg tok/s, std), "decode": (avg, std)}."""
    out = {}
    for test in json.loads(stdout):
        kind = "prefill" if test["n_prompt"] > 0 and test["n_gen"] == 0 else "decode" if test["n_gen"] > 0 else None
        if kind:
            out[kind] = (float(test["avg_ts"]), float(test["stddev_ts"]))
    return out


def run_row(row: Row, bench_bin: Path, model: Path, args) -> None:
    cmd = bench_command(bench_bin, model, prompt=args.prompt, gen=args.gen, threads=args.threads,
                        n_cpu_moe=row.n_cpu_moe or 0, repetitions=args.repetitions)
    row.command = " ".join(cmd)
    print("+ " + row.command, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        row.status = f"failed: llama-bench exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
        return
    rates = parse_bench(done.stdout)
    row.prefill_tok_s, row.prefill_std = rates.get("prefill", (None, None))
    row.decode_tok_s, row.decode_std = rates.get("decode", (None, None))


# -- beside moerun ----------------------------------------------------------------------------------------

@dataclass
class Pair:
    """A llama.cpp row and a moerun row at the same budget (or both with every expert on the GPU)."""

    llama: Row
    moerun: dict                       # a result of moerun's bench JSON (moerun.bench.report.SystemResult.summary)
    moerun_bits: float | None
    precision: str                     # "equal (8.50 vs 8.06 bits/weight)" or "not equal: ..."


_ITEMSIZE = {"torch.bfloat16": 2, "torch.float16": 2, "torch.float32": 4}


def moerun_expert_bits(result: dict, model: dict) -> float | None:
    """Bits per expert weight of a moerun row: its slot bytes over the expert's weight count."""
    itemsize = _ITEMSIZE.get(str(model.get("dtype")))
    if not result.get("slot_bytes") or not itemsize or not model.get("expert_bytes"):
        return None
    return 8 * result["slot_bytes"] / (model["expert_bytes"] / itemsize)


def precision_label(llama: Row, moerun_format: str, moerun_bits: float | None, dtype: str) -> str:
    """Equal precision: the same class of format and bits per weight within half a bit (BF16 also needs
    moerun's dense weights in bf16)."""
    if moerun_format not in PRECISION_PEERS[llama.precision]:
        return "not equal: different formats"
    if llama.precision == "BF16" and dtype != "torch.bfloat16":
        return f"not equal: moerun computes in {dtype.replace('torch.', '')}"
    if llama.expert_bits is None or moerun_bits is None:
        return "same class (bits unknown)"
    bits = f"{llama.expert_bits:.2f} vs {moerun_bits:.2f} bits/weight"
    return f"equal ({bits})" if abs(llama.expert_bits - moerun_bits) <= 0.5 else f"not equal: {bits}"


def pair_rows(rows: list[Row], moerun: dict) -> list[Pair]:
    """Each measured llama.cpp row beside the moerun rows of the same precision class: budget rows with
    moerun rows of the same budget bytes, everything-on-GPU rows with moerun rows that hold every expert."""
    model = moerun.get("model", {})
    all_experts = model.get("moe_layers", 0) * model.get("experts", 0)
    pairs = []
    for row in rows:
        for res in moerun.get("results", []):
            if not res["system"].startswith("moerun") or res.get("status") != "ok":
                continue
            fmt = res.get("expert_format") or "float"
            fmt = "float" if fmt in ("auto", "bfloat16", "float16", "float32") else fmt
            if fmt not in PRECISION_PEERS[row.precision]:
                continue
            if row.placement == "budget":
                same = res.get("budget_bytes") == row.budget_bytes
            else:
                same = all_experts > 0 and (res.get("num_slots") or 0) >= all_experts
            if same:
                bits = moerun_expert_bits(res, model)
                pairs.append(Pair(row, res, bits, precision_label(row, fmt, bits, str(model.get("dtype")))))
    return pairs


# -- report -----------------------------------------------------------------------------------------------

def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / MiB:.1f} MiB"


def _rate(v: float | None, std: float | None = None) -> str:
    return "-" if v is None else f"{v:.1f}" if std is None else f"{v:.1f} ± {std:.1f}"


def _spread(s: dict | None) -> str:
    return "-" if not s else f"{s['median']:.1f}"


def format_table(rows: list[Row], pairs: list[Pair], prompt: int, gen: int) -> str:
    head = ["system", "precision", "expert bits", "-ncmoe", "budget", "est. VRAM", f"prefill tok/s (pp{prompt})",
            f"decode tok/s (tg{gen})", "precision pair", "notes"]
    lines = [head]
    for row in rows:
        placement = "all on GPU" if row.placement == "gpu" else row.budget
        bits = "-" if row.expert_bits is None else f"{row.expert_bits:.2f}"
        lines.append(["llama.cpp", row.precision, bits, "-" if row.n_cpu_moe is None else str(row.n_cpu_moe),
                      placement, _gib(row.est_vram_bytes), _rate(row.prefill_tok_s, row.prefill_std),
                      _rate(row.decode_tok_s, row.decode_std), "", row.notes if row.status == "ok" else row.status])
        for p in (p for p in pairs if p.llama is row):
            r = p.moerun
            peak = r.get("gpu_peak_bytes")
            lines.append([f"  {r['system']}", r.get("expert_format") or "-",
                          "-" if p.moerun_bits is None else f"{p.moerun_bits:.2f}", "", r["budget"], _gib(peak),
                          _spread(r.get("prefill_tok_s")), _spread(r.get("decode_tok_s")), p.precision,
                          f"slots {r.get('num_slots')}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
        if n == 0:
            out.append("  ".join("-" * w for w in widths) + "  -----")
    return "\n".join(out)


LEGEND = (
    "expert bits: bits per routed-expert weight as stored (scales included; llama.cpp: from the GGUF file, "
    "moerun: slot bytes). -ncmoe: routed experts of layers 0..N-1 in host memory, computed by llama.cpp's CPU "
    "backend. est. VRAM (llama.cpp): GGUF tensors on the GPU (all but token embeddings and the host experts) + "
    "f16 KV cache + logits/activation buffers + --margin-mib; moerun: its measured GPU peak. prefill/decode: "
    "llama-bench pp/tg tok/s (mean ± std over repetitions); moerun: median over its repeats (its own prompt "
    "and generation lengths: see its JSON). Q4_K_M is not int4-g128: Q4_K super-blocks of 256 (4.5 bits) with "
    "some tensors in Q6_K, vs moerun's 4.25 bits; the precision column says which pairs are equal."
)


# -- main -------------------------------------------------------------------------------------------------

def parse_budget(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(B|KiB|MiB|GiB|TiB)?\s*", text)
    if not m:
        raise SystemExit(f"--budget {text!r}: a size such as 10GiB or 64MiB")
    return int(float(m.group(1)) * {"B": 1, None: 1, "KiB": 1 << 10, "MiB": MiB, "GiB": GiB, "TiB": 1 << 40}[m.group(2)])


def gpu_total_bytes() -> int | None:
    if not has_cuda_gpu():
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True)
    return int(out.stdout.strip()) * MiB if out.returncode == 0 else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare-src", type=Path, metavar="OUT",
                   help="download the llama-cpp-python sdist (pip) and write the trimmed llama.cpp tree to OUT; then exit")
    p.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON_VERSION, metavar="VERSION",
                   help=f"sdist version for --prepare-src (default {LLAMA_CPP_PYTHON_VERSION})")
    p.add_argument("--llama-src", type=Path, metavar="DIR_OR_TARBALL",
                   help="a trimmed tree (--prepare-src), a llama.cpp checkout, or a llama-cpp-python sdist (dir or .tar.gz)")
    p.add_argument("--build-dir", type=Path, default=Path(".peer/build"), help="cmake build dir, reused (default .peer/build)")
    p.add_argument("--build-only", action="store_true", help="build llama-bench and llama-quantize, then exit")
    p.add_argument("--cpu", action="store_true", help="CPU-only build and runs even where nvcc and a GPU are present")
    p.add_argument("--cuda-arch", default="90", help="CMAKE_CUDA_ARCHITECTURES (default 90: H100)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="build jobs (default: all cores)")
    p.add_argument("--synthetic", default="tiny", help="built-in model of moerun.bench.models (default tiny)")
    p.add_argument("--checkpoint", type=Path, help="an HF checkpoint directory instead of a built-in model")
    p.add_argument("--gguf-dir", type=Path, default=Path(".peer/gguf"), help="where GGUF files go, reused (default .peer/gguf)")
    p.add_argument("--quant", nargs="+", default=list(QUANT_TYPES), choices=list(QUANT_TYPES), help="precisions (default all)")
    p.add_argument("--low-disk", action="store_true",
                   help="for a disk that cannot hold checkpoint + BF16 + Q8_0 GGUF at once (Qwen1.5-MoE on 64 GiB): "
                   "delete the BF16 GGUF after its rows, convert Q8_0 straight from the checkpoint, Q4_K_M from Q8_0")
    p.add_argument("--budget", default="10GiB", help="VRAM budget for the -ncmoe rows (default 10GiB)")
    p.add_argument("--margin-mib", type=int, default=256,
                   help="allowance on top of KV cache and compute buffers in the VRAM estimate (default 256)")
    p.add_argument("--gpu-bytes", type=int, help="GPU memory for the everything-on-GPU rows (default: nvidia-smi's total)")
    p.add_argument("--prompt", type=int, default=512, help="llama-bench -p (default 512)")
    p.add_argument("--gen", type=int, default=128, help="llama-bench -n (default 128)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="llama-bench -t (default: cores - 1)")
    p.add_argument("--repetitions", type=int, default=3, help="llama-bench -r (default 3)")
    p.add_argument("--moerun-json", type=Path, help="a python -m moerun.bench JSON to print beside llama.cpp's rows")
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="directory for the JSON (default bench_results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prepare_src:
        info = prepare_src(args.prepare_src.resolve(), args.llama_cpp_python)
        print(f"wrote {args.prepare_src}: llama-cpp-python {info['llama_cpp_python']}, llama.cpp "
              f"{info['llama_cpp_commit']}, {info['trimmed_bytes'] / MiB:.1f} MiB")
        return 0
    if not args.llama_src:
        raise SystemExit("give --llama-src DIR_OR_TARBALL (or --prepare-src OUT first)")
    tree, source = resolve_src(args.llama_src)
    cuda = has_cuda_gpu() and not args.cpu
    bench_bin, quantize_bin = build(tree, args.build_dir.resolve(), cuda=cuda, cuda_arch=args.cuda_arch, jobs=args.jobs)
    if args.build_only:
        return 0

    if args.checkpoint:
        checkpoint, name = args.checkpoint.resolve(), args.checkpoint.name
    else:
        import torch

        from moerun.bench.models import prepare_checkpoint

        checkpoint, name = prepare_checkpoint(args.synthetic, dtype=torch.bfloat16), args.synthetic
    gguf_dir = args.gguf_dir.resolve() / checkpoint.name
    bf16 = gguf_dir / "model-BF16.gguf"
    layout = gguf_dir / "model-BF16.layout.json"   # metadata + tensors, kept when --low-disk deletes the file
    if bf16.is_file() or not layout.is_file():
        meta, bf16_tensors = read_gguf(tree, convert(tree, checkpoint, bf16))
        layout.write_text(json.dumps({"meta": meta, "tensors": [asdict(t) for t in bf16_tensors]}))
    else:
        saved = json.loads(layout.read_text())
        meta, bf16_tensors = saved["meta"], [Tensor(t["name"], t["type_name"], tuple(t["shape"]), t["n_bytes"])
                                             for t in saved["tensors"]]
    runtime = runtime_of(meta, bf16_tensors, n_ctx=args.prompt + args.gen, margin_bytes=args.margin_mib * MiB)
    budget_bytes = parse_budget(args.budget)
    gpu_bytes = args.gpu_bytes or gpu_total_bytes()

    rows: list[Row] = []
    for qtype in sorted(args.quant, key=list(QUANT_TYPES).index):
        ok, note = shape_check(qtype, bf16_tensors)
        if not ok:
            rows.append(Row(qtype, "budget", args.budget, budget_bytes, status=f"skipped: {note}"))
            print(f"{qtype}: skipped: {note}", flush=True)
            continue
        model = convert(tree, checkpoint, bf16) if qtype == "BF16" else gguf_dir / f"model-{qtype}.gguf"
        if args.low_disk and qtype != "BF16" and bf16.is_file():
            bf16.unlink()   # the BF16 rows ran (BF16 comes first): make room
        if args.low_disk and qtype == "Q8_0" and not model.is_file():
            convert(tree, checkpoint, model, outtype="q8_0")
            note = "converted to Q8_0 by convert_hf_to_gguf.py (--low-disk). " + note
        elif not model.is_file():
            origin, extra = bf16, []
            if args.low_disk and qtype == "Q4_K_M":
                origin, extra = gguf_dir / "model-Q8_0.gguf", ["--allow-requantize"]
                if not origin.is_file():
                    convert(tree, checkpoint, origin, outtype="q8_0")
                note = "requantized from Q8_0 (--low-disk; speed is that of Q4_K_M). " + note
            try:
                _run([str(quantize_bin), *extra, str(origin), str(model.with_suffix(".partial.gguf")), qtype])
            except subprocess.CalledProcessError as exc:
                rows.append(Row(qtype, "budget", args.budget, budget_bytes, status=f"skipped: llama-quantize failed ({exc.returncode})"))
                continue
            os.replace(model.with_suffix(".partial.gguf"), model)
        _, tensors = read_gguf(tree, model)
        bits = expert_bits(tensors)
        n = choose_ncmoe(tensors, runtime.n_layers, budget_bytes, runtime.reserve_bytes)
        full = gpu_footprint(tensors, 0, runtime.reserve_bytes)
        placements = []
        if n is None:
            rows.append(Row(qtype, "budget", args.budget, budget_bytes, expert_bits=bits, status=(
                f"skipped: does not fit {args.budget} even with every expert in host memory "
                f"({_gib(gpu_footprint(tensors, runtime.n_layers, runtime.reserve_bytes))})")))
        else:
            placements.append(Row(qtype, "budget", args.budget, budget_bytes, n_cpu_moe=n,
                                  est_vram_bytes=gpu_footprint(tensors, n, runtime.reserve_bytes)))
        if n != 0 and cuda and (gpu_bytes is None or full <= gpu_bytes):
            placements.append(Row(qtype, "gpu", n_cpu_moe=0, est_vram_bytes=full))
        for row in placements:
            row.expert_bits, row.notes = bits, note
            if not cuda:
                row.notes = "CPU build: -ngl/-ncmoe place nothing, every tensor is in host memory. " + row.notes
            run_row(row, bench_bin, model, args)
            rows.append(row)

    moerun = json.loads(args.moerun_json.read_text()) if args.moerun_json else {}
    pairs = pair_rows(rows, moerun) if moerun else []
    print(f"\nllama.cpp {source.get('llama_cpp_commit', 'unknown')} (llama-cpp-python "
          f"{source.get('llama_cpp_python', '?')}), {'CUDA' if cuda else 'CPU'} build; {name}: "
          f"{runtime.n_layers} layers; budget {args.budget}; reserve {_gib(runtime.reserve_bytes)} "
          f"(KV {_gib(runtime.kv_bytes)} + compute {_gib(runtime.compute_bytes)} + margin)")
    print(format_table(rows, pairs, args.prompt, args.gen))
    print(textwrap.fill(LEGEND, 110))
    payload = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_llamacpp.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "llama_cpp": dict(source, build="cuda" if cuda else "cpu"), "model": {"name": name, "checkpoint": str(checkpoint)},
        "settings": {"prompt": args.prompt, "gen": args.gen, "threads": args.threads, "repetitions": args.repetitions,
                     "budget": args.budget, "budget_bytes": budget_bytes, "reserve": asdict(runtime)},
        "rows": [asdict(r) for r in rows],
        "pairs": [{"llama": f"{p.llama.precision}/{p.llama.placement}", "moerun": p.moerun["system"],
                   "moerun_format": p.moerun.get("expert_format"), "moerun_budget": p.moerun["budget"],
                   "moerun_bits": p.moerun_bits, "precision": p.precision,
                   "moerun_decode_tok_s": (p.moerun.get("decode_tok_s") or {}).get("median"),
                   "moerun_prefill_tok_s": (p.moerun.get("prefill_tok_s") or {}).get("median")} for p in pairs],
        "moerun_json": str(args.moerun_json) if args.moerun_json else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"llamacpp-{name}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
