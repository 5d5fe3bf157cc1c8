"""``python -m moerun.bench``: see ``moerun.bench.cli``."""
import sys

from moerun.bench.cli import main

sys.exit(main())
