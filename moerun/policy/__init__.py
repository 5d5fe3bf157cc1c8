"""The ``.moe`` policy language: parse, validate, compile and format policies.

``compile_policy("balanced")`` gives the :class:`~moerun.policy.ir.CompiledPolicy` the engine
runs. None of this imports torch.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..files import read_text
from .compiler import compile_ir
from .ir import CompiledPolicy
from .errors import Diagnostic, PolicyError
from .formatter import format_policy
from .syntax import PolicyFile
from .parser import parse
from .validator import validate

POLICY_SUFFIX = ".moe"
MAX_POLICY_BYTES = 1 << 20  # a policy is a few hundred bytes; the limit keeps /dev/zero from filling memory

__all__ = [
    "CompiledPolicy", "Diagnostic", "PolicyError", "PolicyFile", "bundled_policies", "compile_policy",
    "format_policy", "load_source", "parse", "validate",
]


def bundled_policies() -> list[str]:
    """Names of the policies shipped in ``moerun.policies`` (without ``.moe``)."""
    folder = resources.files("moerun.policies")
    return sorted(p.name[: -len(POLICY_SUFFIX)] for p in folder.iterdir() if p.name.endswith(POLICY_SUFFIX))


def load_source(spec: str | Path) -> tuple[str, str]:
    """``(text, filename)`` for policy text, a path to a ``.moe`` file, or a bundled name.

    A bundled name may omit ``.moe`` (``"balanced"``). Raises PolicyError naming the bundled
    policies when ``spec`` is none of these.
    """
    if isinstance(spec, Path):
        return _read(spec)
    if not isinstance(spec, str):
        raise PolicyError(f"a policy is text, a path or a bundled name, not {type(spec).__name__}")
    if "{" in spec:
        return spec, "<string>"
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():  # a FIFO or device too: _read says what it is
        return _read(path)
    name = spec if spec.endswith(POLICY_SUFFIX) else spec + POLICY_SUFFIX
    if "/" not in name and "\\" not in name:
        bundled = resources.files("moerun.policies").joinpath(name)
        if bundled.is_file():
            return bundled.read_text(encoding="utf-8"), name
    if path.is_dir() or "/" in spec or "\\" in spec:  # a path (no bundled name has a separator)
        if not path.parent.is_dir():
            raise PolicyError(f"policy file {spec}: the directory {path.parent} does not exist")
        return _read(path)  # a directory, a missing file: _read says which
    raise PolicyError(f"no policy file or bundled policy named '{spec}'; bundled policies: "
                      f"{', '.join(bundled_policies())}")


def _read(path: Path) -> tuple[str, str]:
    try:
        return read_text(path, limit_bytes=MAX_POLICY_BYTES, what="policy file"), str(path)
    except (OSError, ValueError) as err:
        raise PolicyError(str(err)) from None


def compile_policy(spec: str | Path | PolicyFile, *, name: str | None = None, num_layers: int | None = None,
                   num_experts: int | None = None) -> CompiledPolicy:
    """Parse, validate and compile a policy.

    ``spec``: policy text, a path, a bundled name (``"balanced"`` or ``"balanced.moe"``), or an
    already parsed :class:`PolicyFile`. ``name`` picks a policy in a multi-policy file (needed there: a
    file of several without a name is a PolicyError naming them). ``num_layers``/``num_experts`` enable
    the model-shape checks.
    """
    if isinstance(spec, PolicyFile):
        policy_file = spec
    else:
        text, filename = load_source(spec)
        policy_file = parse(text, filename)
    return compile_ir(policy_file, name, num_layers=num_layers, num_experts=num_experts)
