"""Test-wide setup: Triton runs in interpreter mode when no CUDA device is present."""
import os
import sys

import torch

# Shared test helpers at the top of tests/ (expert_format_reference.py) import by name from any test.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    # Must be set before triton is first imported: CI has no GPU, kernels run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def record_prefetch_ahead():
    """``record(model) -> calls``: wraps the model's runtime lookahead entry point so that ``calls``
    collects every ``(moe layer, predicted ids on the CPU)`` it is handed (the call still goes through)."""
    def record(model) -> list:
        runtime, calls = model.moerun.runtime, []
        original = runtime.prefetch_ahead

        def prefetch_ahead(layer, predicted):
            calls.append((layer, predicted.detach().cpu().clone()))
            return original(layer, predicted)
        runtime.prefetch_ahead = prefetch_ahead
        return calls
    return record
