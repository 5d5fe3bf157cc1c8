"""moerun: run Mixture-of-Experts language models on a GPU too small for them.

The dense part of the model lives on the GPU, routed experts in pinned host memory, and a fixed
arena of GPU expert slots holds the experts a policy (a ``.moe`` file) chooses to keep.
"""
__version__ = "0.1.0"
