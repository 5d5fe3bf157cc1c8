"""Every kernel launch we ship compiles for sm_90 (H100) and fits its shared memory, checked on a
CPU: the interpreter runs the kernels' arithmetic but never compiles them (see compile_sm90.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("compile_sm90.py")
KERNELS = {"_decode_gate_up_kernel", "_decode_down_kernel", "_expert_blocks_kernel", "_scatter_pairs_kernel",
           "_prefill_gate_up_kernel", "_prefill_down_kernel", "_sum_pairs_kernel"}


def test_every_launch_compiles_for_sm90_and_fits_shared_memory():
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [f"{r['case']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    too_big = [f"{r['case']} {r['kernel']} {r['constexprs']}: {r['shared']} B" for r in rows if not r["fits"]]
    assert not too_big, "over the H100's shared memory per block:\n" + "\n".join(too_big)
    # not vacuous: every kernel, and both weight-tile kinds of the prefill GEMMs, were compiled
    assert {r["kernel"] for r in rows} == KERNELS
    for gemm in ("_prefill_gate_up_kernel", "_prefill_down_kernel"):
        assert {r["constexprs"]["WEIGHT_DESC"] for r in rows if r["kernel"] == gemm} == {True, False}
    # the gpt-oss variant (biases, the clamped SwiGLU) of every kernel that computes experts
    for kernel in ("_decode_gate_up_kernel", "_decode_down_kernel", "_prefill_gate_up_kernel", "_prefill_down_kernel"):
        assert any(r["constexprs"]["HAS_BIAS"] for r in rows if r["kernel"] == kernel), kernel
    for kernel in ("_decode_gate_up_kernel", "_prefill_gate_up_kernel"):
        assert {r["constexprs"]["ACT"] for r in rows if r["kernel"] == kernel} == {0, 1}, kernel
    # and every expert format's kernels: each (format kind, group) of the list, on both paths
    from moerun.native import EXPERT_FORMATS, slot_layout

    want = {(slot_layout(torch.bfloat16, 2048, 1536, f).kind, slot_layout(torch.bfloat16, 2048, 1536, f).group_size)
            for f in EXPERT_FORMATS}
    for kernel in ("_decode_gate_up_kernel", "_decode_down_kernel", "_prefill_gate_up_kernel", "_prefill_down_kernel"):
        got = {(r["constexprs"]["FMT"], r["constexprs"]["GROUP"]) for r in rows if r["kernel"] == kernel}
        assert {kind for kind, _ in want} <= {kind for kind, _ in got}, kernel
        assert {w for w in want if w[0] != 0} <= got, kernel
