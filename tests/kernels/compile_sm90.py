"""Compile every kernel launch that fused_moe and route make, for sm_90 (H100), without a GPU.

Run as a script (``python compile_sm90.py``; it turns the interpreter off, so the kernels are JIT
functions); prints one JSON line per distinct launch: kernel, dtype, config, shared memory, or the
compile error, and whether it fits the H100's shared memory. The launchers run on CPU tensors with their kernels replaced by recorders, so the
arguments compiled are exactly the ones a GPU run passes (TMA descriptors included); nothing runs.

The interpreter (the other CPU tests) checks what kernels compute but not what only the compiler
sees: loop-carried types, constexpr-selected code paths, descriptor loads, shared memory per block.
"""
from __future__ import annotations

import functools
import json
import os

# Compiled kernels, not interpreted ones, even on a machine without a GPU (where importing moerun
# would otherwise turn the interpreter on); set before anything imports triton.
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from moerun.kernels import fused_moe as fm  # noqa: E402
from moerun.kernels.fused_moe_config import CONFIG_FILE, DEFAULTS_KEY, FusedMoeConfig, get_config  # noqa: E402
from moerun.models.base import ExpertActivation  # noqa: E402
from moerun.native import slot_layout  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# the H100's shared memory per block (opt-in maximum)
H100_SHARED_BYTES = 227 * 1024


class Recorder:
    """Stands in for a JIT kernel: records each launch's arguments instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record(module, launches: list) -> None:
    """Replace the module's launched kernels (JIT functions named ``*_kernel``; helpers are not)."""
    for name, obj in vars(module).copy().items():
        if isinstance(obj, triton.runtime.jit.JITFunction) and obj.fn.__name__.endswith("_kernel"):
            setattr(module, name, Recorder(obj, launches))


def compile_launch(kernel, args, kwargs) -> dict:
    params = [p for p in kernel.params if not p.is_constexpr]
    signature, constexprs = {}, {}
    for p, value in zip(params, args):
        signature[p.name] = mangle_type(value)
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(p.num,)] = kwargs[p.name] if p.name in kwargs else p.default
    # the same order as the kernel's parameters
    signature = {p.name: signature[p.name] for p in kernel.params}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options=options)
    return {"shared": compiled.metadata.shared, "fits": compiled.metadata.shared <= H100_SHARED_BYTES}


def launch_fused_moe(hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype,
                     cfg: FusedMoeConfig, format: str = "float", activation=None) -> None:
    """Both paths once, on CPU tensors (recorded, not run); an activation with biases puts them in the slots."""
    layout = slot_layout(dtype, hidden, inter, format, bias=activation is not None and activation.bias)
    arena = torch.empty(2, layout.slot_elems, dtype=dtype)  # [N, S]; never touched
    table = torch.zeros(experts, dtype=torch.int32)
    for tokens, path in ((1, "decode"), (64, "prefill")):
        x = torch.empty(tokens, hidden, dtype=dtype)
        ids = torch.zeros(tokens, top_k, dtype=torch.int32)
        w = torch.empty(tokens, top_k, dtype=torch.float32)
        fm.fused_moe(x, ids, w, table, arena, layout, activation=activation, config=cfg, path=path)


def main() -> None:
    launches: list = []
    record(fm, launches)
    # the launchers' CPU-tensor checks and TMA choices as under the interpreter, which also builds
    # descriptors on the CPU; launch options as on an H100 (programmatic dependent launch)
    fm.INTERPRETED = True
    fm._pdl = lambda device: {"PDL": True, "launch_pdl": True}
    # each tuned (H, I) as the runtime would launch it in bf16 and fp32 (get_config decides which
    # config fp32 takes), and the defaults that serve shapes missing from the table
    cases = []
    with CONFIG_FILE.open() as f:
        table = json.load(f)
    for device, shapes in table.items():
        if device == DEFAULTS_KEY:  # each quantized format's defaults, in bf16 at a shape every group divides
            for fmt, entry in shapes.items():
                cases.append((f"defaults {fmt} bfloat16", functools.partial(
                    launch_fused_moe, 2048, 1536, 64, 6, torch.bfloat16, FusedMoeConfig.from_dict(entry), fmt)))
            continue
        for key, entry in shapes.items():
            hidden, inter, *fmt = key.split(",")
            hidden, inter, fmt = int(hidden), int(inter), (fmt[0] if fmt else "float")
            for dtype, cfg in ((torch.bfloat16, FusedMoeConfig.from_dict(entry)),
                               (torch.float32, get_config(torch.device("cpu"), hidden, inter, torch.float32, fmt))):
                cases.append((f"{device} {key} {str(dtype)[6:]}",
                              functools.partial(launch_fused_moe, hidden, inter, 64, 6, dtype, cfg, fmt)))
    cases.append(("defaults float16", functools.partial(launch_fused_moe, 2048, 1408, 64, 6, torch.float16,
                                                        FusedMoeConfig())))
    # gpt-oss's experts (biases, the clamped SwiGLU) at gpt-oss-20b's shape, as the runtime launches them
    gpt_oss = ExpertActivation("swiglu_clamped", alpha=1.702, limit=7.0, bias=True)
    for fmt in ("float", "mxfp4"):
        cases.append((f"gpt-oss {fmt} bfloat16", functools.partial(
            launch_fused_moe, 2880, 2880, 32, 4, torch.bfloat16,
            get_config(torch.device("cpu"), 2880, 2880, torch.bfloat16, fmt), fmt, gpt_oss)))
    seen = set()
    for name, launch in cases:
        launches.clear()
        launch()
        for kernel, args, kwargs in launches:
            key = (kernel.fn.__name__, tuple(mangle_type(a) for a in args), tuple(sorted(kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            row = {"case": name, "kernel": kernel.fn.__name__,
                   "constexprs": {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "launch_pdl")}}
            try:
                row.update(compile_launch(kernel, args, kwargs))
            except Exception as exc:  # reported, the test fails on it
                row["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
