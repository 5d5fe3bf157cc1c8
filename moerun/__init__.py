"""moerun: run Mixture-of-Experts language models on a GPU too small for them.

The dense part of the model lives on the GPU, routed experts in pinned host memory, and a fixed
arena of GPU expert slots holds the experts a policy (a ``.moe`` file) chooses to keep.
"""
import os as _os

__version__ = "0.1.0"

# Without a GPU, Triton can only interpret kernels (moerun.kernels called on host tensors, as the
# kernel tests do; the runtime itself computes a CPU device's experts natively), and Triton fixes
# compiled-or-interpreted when it is imported (its library functions are decorated then), which
# transformers does as soon as a model is built. Looking for the GPU driver's device nodes keeps
# `import moerun` free of a torch import.
if not any(_os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/kfd")):
    _os.environ.setdefault("TRITON_INTERPRET", "1")


def __getattr__(name: str):
    # moerun.load is imported on first use: `import moerun` stays light (no transformers import).
    if name in ("load", "memory_plan"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'moerun' has no attribute {name!r}")
