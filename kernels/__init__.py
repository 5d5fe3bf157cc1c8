"""Triton kernels of moerun (installed as ``moerun.kernels``); each kernel sits beside its launch config."""
