"""Bundled policies (installed as ``moerun.policies``): ``policy="balanced.moe"`` finds them here."""
