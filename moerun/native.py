"""The one place Python imports the native extension ``moerun._C``.

Everything else in moerun imports native classes from here, so a missing or stale build fails
in one spot with a message that says how to rebuild.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libc10/libtorch, which moerun._C links against)

try:
    from moerun import _C  # noqa: F401  (re-exported)
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "moerun's native extension moerun._C is not built or does not match the installed torch "
        f"({exc}). Reinstall with `pip install --no-build-isolation .` (or `-e .` for development) "
        "after installing torch."
    ) from exc


def build_info() -> dict:
    """How the extension was built: ``{'cuda': bool, 'torch_version': str, ...}``."""
    return dict(_C.build_info())
