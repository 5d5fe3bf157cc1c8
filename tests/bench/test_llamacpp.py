"""benchmarks/bench_llamacpp.py's pure logic: the trimmed tree, -ncmoe from tensor sizes, the pairing with moerun.

Nothing here builds or runs llama.cpp.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_llamacpp", ROOT / "benchmarks" / "bench_llamacpp.py")
peer = importlib.util.module_from_spec(_spec)
sys.modules["bench_llamacpp"] = peer   # dataclasses resolve their module by name
_spec.loader.exec_module(peer)

GiB, MiB = peer.GiB, peer.MiB


def qwen15_tensors(bytes_per_weight: float = 2.0) -> list:
    """Qwen1.5-MoE-A2.7B's GGUF tensors (shapes as ggml orders them) at ``bytes_per_weight``."""
    H, I, E, L, S, V = 2048, 1408, 60, 24, 5632, 151936

    def t(name, *shape, bpw=bytes_per_weight):
        n = 1
        for d in shape:
            n *= d
        return peer.Tensor(name, "BF16", shape, int(n * bpw))

    out = [t("token_embd.weight", H, V), t("output.weight", H, V), t("output_norm.weight", H, bpw=4)]
    for i in range(L):
        out += [t(f"blk.{i}.attn_q.weight", H, H), t(f"blk.{i}.attn_k.weight", H, H), t(f"blk.{i}.attn_v.weight", H, H),
                t(f"blk.{i}.attn_output.weight", H, H), t(f"blk.{i}.ffn_gate_inp.weight", H, E, bpw=4),
                t(f"blk.{i}.ffn_gate_exps.weight", H, I, E), t(f"blk.{i}.ffn_up_exps.weight", H, I, E),
                t(f"blk.{i}.ffn_down_exps.weight", I, H, E), t(f"blk.{i}.ffn_gate_shexp.weight", H, S),
                t(f"blk.{i}.ffn_up_shexp.weight", H, S), t(f"blk.{i}.ffn_down_shexp.weight", S, H)]
    return out


QWEN15_RUNTIME = peer.Runtime(n_layers=24, n_embd=2048, n_vocab=151936, n_kv_heads=16, head_dim=128, n_ctx=640)


# -- the trimmed tree ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", [
    "CMakeLists.txt", "convert_hf_to_gguf.py", "cmake/build-info.cmake", "src/llama.cpp", "src/models/qwen2moe.cpp",
    "include/llama.h", "common/arg.cpp", "ggml/CMakeLists.txt", "ggml/src/ggml.c", "ggml/src/CMakeLists.txt",
    "ggml/src/ggml-cpu/ggml-cpu.c", "ggml/src/ggml-cuda/mmq.cu", "ggml/include/ggml.h", "tools/llama-bench/llama-bench.cpp",
    "tools/quantize/quantize.cpp", "gguf-py/gguf/gguf_reader.py", "conversion/qwen.py", "vendor/nlohmann/json.hpp",
])
def test_trimmed_tree_keeps_what_the_build_and_converter_need(rel):
    assert peer.keep_path(rel)


@pytest.mark.parametrize("rel", [
    "models/ggml-vocab-llama-spm.gguf", "docs/build.md", "tests/test-backend-ops.cpp", "examples/simple/simple.cpp",
    "ggml/src/ggml-vulkan/ggml-vulkan.cpp", "ggml/src/ggml-metal/ggml-metal.m", "ggml/src/ggml-sycl/ggml-sycl.cpp",
    "tools/server/server.cpp", "tools/ui/index.html", "tools/CMakeLists.txt", ".github/workflows/build.yml",
    "README.md", "src/README.md", "media/llama1-logo.png", "gguf-py/tests/test_quants.py",
])
def test_trimmed_tree_drops_the_rest(rel):
    assert not peer.keep_path(rel)


def test_trim_tree_writes_the_two_tools_and_the_source(tmp_path):
    tree = tmp_path / "sdist" / "vendor" / "llama.cpp"
    for rel in ("CMakeLists.txt", "convert_hf_to_gguf.py", "tools/CMakeLists.txt", "tools/llama-bench/x.cpp",
                "tools/server/server.cpp", "docs/a.md", "ggml/src/ggml-opencl/k.cl", "ggml/src/ggml.c"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    out = tmp_path / "trimmed"
    info = peer.trim_tree(tmp_path / "sdist", out, version="0.0.0", sdist_name="s.tar.gz")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["CMakeLists.txt", peer.SOURCE_INFO, "convert_hf_to_gguf.py", "ggml/src/ggml.c",
                     "tools/CMakeLists.txt", "tools/llama-bench/x.cpp"]
    assert "add_subdirectory(llama-bench)" in (out / "tools" / "CMakeLists.txt").read_text()
    assert "server" not in (out / "tools" / "CMakeLists.txt").read_text()
    assert json.loads((out / peer.SOURCE_INFO).read_text())["llama_cpp_python"] == info["llama_cpp_python"] == "0.0.0"


# -- placement ----------------------------------------------------------------------------------------------

def test_expert_layer_matches_llama_cpp_n_cpu_moe_pattern():
    assert peer.expert_layer("blk.17.ffn_down_exps.weight") == 17
    assert peer.expert_layer("blk.3.ffn_gate_up_exps.weight") == 3
    assert peer.expert_layer("blk.3.ffn_up_chexps.weight") == 3
    for name in ("blk.3.ffn_down_shexp.weight", "blk.3.ffn_gate_inp.weight", "blk.3.attn_q.weight", "output.weight"):
        assert peer.expert_layer(name) is None


def test_footprint_counts_everything_but_token_embeddings_and_host_experts():
    tensors = [peer.Tensor("token_embd.weight", "BF16", (4, 8), 1000), peer.Tensor("output.weight", "BF16", (4, 8), 100),
               peer.Tensor("blk.0.ffn_up_exps.weight", "BF16", (4, 4, 2), 10), peer.Tensor("blk.1.ffn_up_exps.weight", "BF16", (4, 4, 2), 20),
               peer.Tensor("blk.0.attn_q.weight", "BF16", (4, 4), 1)]
    assert peer.gpu_footprint(tensors, 0, 5) == 100 + 10 + 20 + 1 + 5
    assert peer.gpu_footprint(tensors, 1, 5) == 100 + 20 + 1 + 5
    assert peer.gpu_footprint(tensors, 2, 5) == 100 + 1 + 5
    assert peer.choose_ncmoe(tensors, 2, 126, 5) == 1
    assert peer.choose_ncmoe(tensors, 2, 136, 5) == 0
    assert peer.choose_ncmoe(tensors, 2, 105, 5) is None


def test_qwen15_bf16_at_10gib_keeps_the_experts_of_18_layers_on_the_cpu():
    """The split the H100 comparison with llama.cpp ran with (-ncmoe 18 at about 10 GiB)."""
    tensors = qwen15_tensors()
    reserve = QWEN15_RUNTIME.reserve_bytes
    assert 0.5 * GiB < reserve < 1 * GiB
    n = peer.choose_ncmoe(tensors, 24, 10 * GiB, reserve)
    assert n == 18
    assert peer.gpu_footprint(tensors, n, reserve) <= 10 * GiB < peer.gpu_footprint(tensors, n - 1, reserve)
    # Everything on the GPU: about 27 GiB of weights without the token embeddings.
    assert 26 * GiB < peer.gpu_footprint(tensors, 0, 0) < 28 * GiB


def test_fewer_bits_put_more_layers_on_the_gpu():
    reserve = QWEN15_RUNTIME.reserve_bytes
    bf16 = peer.choose_ncmoe(qwen15_tensors(2.0), 24, 10 * GiB, reserve)
    q8 = peer.choose_ncmoe(qwen15_tensors(34 / 32), 24, 10 * GiB, reserve)
    q4 = peer.choose_ncmoe(qwen15_tensors(4.5 / 8), 24, 10 * GiB, reserve)
    assert bf16 > q8 > q4 == 0


def test_shape_check_skips_a_type_no_expert_row_fits_and_notes_partial_fallbacks():
    tiny = [peer.Tensor("blk.0.ffn_up_exps.weight", "BF16", (64, 32, 8), 0),
            peer.Tensor("blk.0.ffn_down_exps.weight", "BF16", (32, 64, 8), 0)]
    assert peer.shape_check("Q8_0", tiny) == (True, "")
    ok, why = peer.shape_check("Q4_K_M", tiny)
    assert not ok and "256" in why
    ok, note = peer.shape_check("Q4_K_M", qwen15_tensors())       # down_proj rows are 1408 = 5.5 x 256
    assert ok and "ffn_down_exps" in note and "ffn_up_exps" not in note


def test_expert_bits_include_scales():
    q8 = [peer.Tensor("blk.0.ffn_up_exps.weight", "Q8_0", (64, 32, 8), 64 * 32 * 8 * 34 // 32),
          peer.Tensor("blk.0.attn_q.weight", "F32", (64, 64), 64 * 64 * 4)]
    assert peer.expert_bits(q8) == pytest.approx(8.5)


# -- beside moerun ------------------------------------------------------------------------------------------

def _moerun_json(dtype="torch.bfloat16"):
    H, I = 2048, 1408
    expert_bytes = 3 * H * I * 2
    def res(system, fmt, budget_bytes, slots, slot_bits, decode):
        return {"system": system, "budget": "10GiB" if budget_bytes == 10 * GiB else "40GiB", "budget_bytes": budget_bytes,
                "status": "ok", "expert_format": fmt, "slot_bytes": int(3 * H * I * slot_bits / 8), "num_slots": slots,
                "decode_tok_s": {"median": decode, "low": decode, "high": decode}, "prefill_tok_s": None}
    return {"model": {"dtype": dtype, "expert_bytes": expert_bytes, "moe_layers": 24, "experts": 60},
            "results": [res("moerun:per_layer", "float", 10 * GiB, 300, 16, 40.0),
                        res("moerun:per_layer", "int8", 10 * GiB, 700, 8.03, 90.0),
                        res("moerun:per_layer", "int4-g128", 10 * GiB, 1440, 4.25, 300.0),
                        res("moerun:per_layer", "float", 40 * GiB, 1440, 16, 230.0),
                        res("hf-auto", "float", 10 * GiB, None, 16, 5.0),
                        dict(res("moerun:fiddler", "float", 10 * GiB, 300, 16, 1.0), status="failed: x")]}


def test_pairs_match_precision_class_and_budget():
    rows = [peer.Row("BF16", "budget", "10GiB", 10 * GiB, n_cpu_moe=18, expert_bits=16.0),
            peer.Row("BF16", "gpu", expert_bits=16.0),
            peer.Row("Q8_0", "budget", "10GiB", 10 * GiB, n_cpu_moe=9, expert_bits=8.5),
            peer.Row("Q4_K_M", "budget", "10GiB", 10 * GiB, n_cpu_moe=0, expert_bits=4.9)]
    pairs = peer.pair_rows(rows, _moerun_json())
    got = {(p.llama.precision, p.llama.placement, p.moerun["expert_format"], p.moerun["budget"]): p.precision for p in pairs}
    assert set(got) == {("BF16", "budget", "float", "10GiB"), ("BF16", "gpu", "float", "40GiB"),
                        ("Q8_0", "budget", "int8", "10GiB"), ("Q4_K_M", "budget", "int4-g128", "10GiB")}
    assert got[("BF16", "budget", "float", "10GiB")].startswith("equal")
    assert got[("Q8_0", "budget", "int8", "10GiB")].startswith("equal")
    assert got[("Q4_K_M", "budget", "int4-g128", "10GiB")] == "not equal: 4.90 vs 4.25 bits/weight"


def test_bf16_is_not_equal_to_a_float32_moerun_run():
    rows = [peer.Row("BF16", "budget", "10GiB", 10 * GiB, expert_bits=16.0)]
    (pair,) = [p for p in peer.pair_rows(rows, _moerun_json("torch.float32"))]
    assert pair.precision.startswith("not equal") and "float32" in pair.precision


def test_parse_bench_reads_prefill_and_decode():
    out = json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 1000.5, "stddev_ts": 3.0},
                      {"n_prompt": 0, "n_gen": 128, "avg_ts": 46.3, "stddev_ts": 0.2}])
    assert peer.parse_bench(out) == {"prefill": (1000.5, 3.0), "decode": (46.3, 0.2)}


def test_bench_command_places_experts_with_ncmoe():
    cmd = peer.bench_command(Path("llama-bench"), Path("m.gguf"), prompt=512, gen=128, threads=15, n_cpu_moe=18,
                             repetitions=3)
    assert cmd[cmd.index("-ncmoe") + 1] == "18" and cmd[cmd.index("-ngl") + 1] == "99" and cmd[-2:] == ["-o", "json"]


def test_help_runs_without_llama_cpp():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_llamacpp.py"), "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--prepare-src" in done.stdout
