"""Where one generation's time goes: a torch.profiler run written next to the bench's JSON.

Used by ``--profile``: after a system's timed repeats, one more generation runs under the
profiler (not counted in the table). The text file lists operators and ``record_function``
ranges by self time on the host and, with a GPU, on the device; the ``.json`` trace opens in
Perfetto / chrome://tracing for the per-layer picture (sync, planning, copies, CPU experts,
kernels, attention). This module knows nothing about the systems it profiles.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def profile_generation(model, input_ids: torch.Tensor, new_tokens: int, device: torch.device,
                       path_stem: Path, row_limit: int = 40) -> list[Path]:
    """Profiles one greedy generation of ``new_tokens`` after ``input_ids`` [B, S] on ``device``.

    Writes ``<path_stem>.txt`` (operator table) and ``<path_stem>.json`` (trace); returns both paths.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    input_ids = input_ids.to(device)
    with profile(activities=activities, record_shapes=False) as prof, torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    table_path = path_stem.with_suffix(".txt")
    trace_path = path_stem.with_suffix(".json")
    events = prof.key_averages()
    sections = [("host (self CPU time)", "self_cpu_time_total")]
    if device.type == "cuda":
        sections.insert(0, ("device (self CUDA time)", "self_cuda_time_total"))
    with table_path.open("w") as out:
        out.write(f"one generation: batch {input_ids.shape[0]}, prompt {input_ids.shape[1]}, {new_tokens} new tokens\n")
        for title, key in sections:
            out.write(f"\n== {title}\n{events.table(sort_by=key, row_limit=row_limit)}\n")
    prof.export_chrome_trace(str(trace_path))
    return [table_path, trace_path]
