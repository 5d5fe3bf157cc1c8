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


# The mechanism (csrc/): see moerun/_C.pyi for their typed signatures.
ExpertArena = _C.ExpertArena
HostPool = _C.HostPool
TransferEngine = _C.TransferEngine
CpuExecutor = _C.CpuExecutor
fused_moe_host = _C.fused_moe_host  # the CPU device's fused MoE over a host arena (kernels/fused_moe.py's twin)
encode_expert = _C.encode_expert  # gate, up, down -> one slot's bytes in layout.format (csrc/expert_codec.h)
decode_expert = _C.decode_expert  # one slot -> (gate_up, down) in fp32, the format's exact decode
slot_layout = _C.slot_layout  # the one slot layout (csrc/slot_layout.h): SlotLayout of (dtype, hidden, inter, format, bias)
EXPERT_FORMATS: tuple[str, ...] = tuple(name for name, _ in _C.expert_formats())  # the one list (csrc/expert_format.h)
FORMAT_KINDS: tuple[str, ...] = tuple(_C.format_kinds())  # SlotLayout.kind indexes it; kernels branch on kinds
EXPERT_ACTIVATIONS: tuple[str, ...] = tuple(_C.expert_activations())  # the one list (csrc/expert_activation.h), in code order
slot_elems = _C.slot_elems
physical_cores = _C.physical_cores


def slot_views(layout, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up [2I, H], down [H, I])``: views into ``slot``, one slot of ``layout.slot_elems``
    elements of ``layout.dtype`` (an arena or pool row), at the layout's offsets. Float format only:
    a quantized slot's parts are bytes (:func:`slot_parts`)."""
    if layout.quantized:
        raise ValueError(f"slot_views reads float-format slots; this layout is {layout.format} (use slot_parts)")
    if slot.dtype != layout.dtype or slot.dim() != 1 or slot.numel() != layout.slot_elems:
        raise ValueError(f"slot must be 1-D, {layout.slot_elems} elements of {layout.dtype}; got "
                         f"{tuple(slot.shape)} {slot.dtype}")
    b, h, i = slot.element_size(), layout.hidden_size, layout.inter_size
    gate_up = slot[layout.gate_up_offset // b: (layout.gate_up_offset + layout.gate_up_bytes) // b]
    down = slot[layout.down_offset // b: (layout.down_offset + layout.down_bytes) // b]
    return gate_up.view(2 * i, h), down.view(h, i)


SLOT_PARTS = ("gate_up", "gate_up_scales", "gate_up_zeros", "down", "down_scales", "down_zeros", "gate_up_bias",
              "down_bias")


def slot_parts(layout, slot: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each part of one slot of any format as a 1-D uint8 view into ``slot`` (an arena or pool row of
    ``layout.slot_elems`` elements of ``layout.dtype``, or ``layout.slot_bytes`` bytes); parts the
    format lacks are left out. Writing a view writes the slot."""
    raw = slot.view(torch.uint8) if slot.dtype != torch.uint8 else slot
    if raw.dim() != 1 or raw.numel() != layout.slot_bytes:
        raise ValueError(f"slot must be 1-D, {layout.slot_bytes} bytes; got {tuple(slot.shape)} {slot.dtype}")
    parts = {}
    for name in SLOT_PARTS:
        offset, size = getattr(layout, name + "_offset"), getattr(layout, name + "_bytes")
        if size:
            parts[name] = raw[offset:offset + size]
    return parts


def build_info() -> dict:
    """How the extension was built: ``{'cuda': bool, 'torch_version': str, ...}``."""
    return dict(_C.build_info())
