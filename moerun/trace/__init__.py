"""Routing traces: the format (format.py), seeded synthetic workloads (workloads.py), replay through
the native policy engine (replay.py), policy x capacity sweeps with plots (sweep.py), routing
statistics (stats.py) and the ``moerun trace`` commands (commands.py)."""
