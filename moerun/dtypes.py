"""The compute dtypes a model runs in, and the names ``moerun.load(dtype=...)`` and the commands'
``--dtype`` take for them: the one table of those names. Knows nothing about checkpoints or devices."""
from __future__ import annotations

import torch

from .checkpoint_quantization import FLOAT_ALIASES

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# "bfloat16", "float16", "float32" and the expert formats' short names for the same ("bf16", "fp16", "fp32").
DTYPE_NAMES: dict[str, torch.dtype] = {**{str(d).removeprefix("torch."): d for d in FLOAT_ALIASES.values()},
                                       **FLOAT_ALIASES}
