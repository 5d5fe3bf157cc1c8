"""``python -m moerun.bench``: moerun against transformers and Fiddler-style baselines, in one run.

Modules: ``models`` (built-in checkpoints and their sizes), ``budget`` (budget forms),
``systems`` (loading each compared system), ``offloaded_experts`` (the hf-ondemand and fiddler
experts modules), ``moe_layers`` (finding transformers' fused experts), ``counters`` (expert
traffic in common terms), ``measure`` (timing), ``profiling`` (``--profile``), ``report`` (table,
JSON, plot), ``cli`` (the command).
"""
