"""Build of moerun: the Python package plus the native extension ``moerun._C``.

The extension is compiled against the torch that is already installed (build without isolation:
``pip install --no-build-isolation .``). With a CUDA-enabled torch and a CUDA toolkit the CUDA
runtime parts are compiled in (``MOERUN_WITH_CUDA``); otherwise the same API is built CPU-only.
Set ``MOERUN_CPU_ONLY=1`` to force the CPU-only build.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only on a broken install
    sys.exit(
        "moerun builds its native extension against the installed torch, but torch is not importable.\n"
        "Install torch first (e.g. `pip install torch`), then `pip install --no-build-isolation .`"
    )


def _native_extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("MOERUN_CPU_ONLY", "0") != "1"
    )
    cxx = ["-O3", "-std=c++17", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
    macros = [("MOERUN_WITH_CUDA", "1")] if with_cuda else []
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return kind(
        name="moerun._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]} if with_cuda else {"cxx": cxx},
        # The torch libraries it links against, found without importing torch first (`import moerun._C`).
        extra_link_args=["-pthread", f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"],
    )


# moerun/kernels is a link to the top-level kernels/ folder, which has no __init__.py on purpose: run from the
# repository root (`python -m ...` puts it on sys.path), a package named `kernels` there would shadow the
# Hugging Face `kernels` package that transformers imports. The folder is reachable only as moerun.kernels.
packages = find_packages(include=["moerun", "moerun.*"]) + ["moerun.kernels", "moerun.policies"]

setup(
    packages=packages,
    package_dir={"moerun.policies": "policies"},
    package_data={"moerun.policies": ["*.moe"], "moerun.policy": ["grammar.lark"], "moerun.kernels": ["*.json"], "moerun": ["_C.pyi"]},
    ext_modules=[_native_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
