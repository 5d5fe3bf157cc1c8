"""``python -m moerun`` runs the ``moerun`` console script."""
import sys

from moerun.cli import main

sys.exit(main())
