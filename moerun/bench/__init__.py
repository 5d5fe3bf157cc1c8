"""``python -m moerun.bench``: moerun against transformers and Fiddler-style baselines, in one run.

Modules: ``models`` (built-in checkpoints), ``systems`` (the baselines and the moerun row),
``offloaded_experts`` (the hf-ondemand and fiddler experts modules), ``measure`` (timing),
``report`` (table, JSON, plot), ``cli`` (the command).
"""
