"""moerun: run Mixture-of-Experts language models on a GPU too small for them.

The dense part of the model lives on the GPU, routed experts in pinned host memory, and a fixed
arena of GPU expert slots holds the experts a policy (a ``.moe`` file) chooses to keep.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    # moerun.load is imported on first use: `import moerun` stays light (no transformers import).
    if name in ("load", "memory_plan"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'moerun' has no attribute {name!r}")
