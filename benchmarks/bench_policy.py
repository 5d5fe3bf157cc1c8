"""Parse + validate + compile time of the largest bundled policy (target < 5 ms).

    python benchmarks/bench_policy.py [--runs 500]

Prints the median and the 10th/90th percentiles in milliseconds, as JSON with the policy name.
The lark parser is built once per process (first call) and is excluded, as in any real run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib import resources

from moerun.policy import bundled_policies, compile_ir, parse


def largest_bundled() -> tuple[str, str]:
    texts = {n: resources.files("moerun.policies").joinpath(n + ".moe").read_text() for n in bundled_policies()}
    name = max(texts, key=lambda n: len(texts[n]))
    return name, texts[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    name, text = largest_bundled()
    compile_ir(parse(text, name))  # builds the parser once
    times_ms = []
    for _ in range(args.runs):
        start = time.perf_counter()
        compile_ir(parse(text, name))
        times_ms.append((time.perf_counter() - start) * 1e3)
    times_ms.sort()
    print(json.dumps({
        "policy": name, "bytes": len(text), "runs": args.runs,
        "median_ms": round(statistics.median(times_ms), 3),
        "p10_ms": round(times_ms[len(times_ms) // 10], 3), "p90_ms": round(times_ms[len(times_ms) * 9 // 10], 3),
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
