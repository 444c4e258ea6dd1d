"""Test set-up of the plugin: graphsd's own (no network, the thread count), graphsd's shared
test helpers (``sd_tiny``, ``reference``) importable, and ``graphsd_train`` importable from this
folder whether or not the package is installed."""

import runpy
import sys
from pathlib import Path

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
GRAPHSD_TESTS = PLUGIN_ROOT.parents[1] / "tests"

sys.path[:0] = [str(PLUGIN_ROOT), str(GRAPHSD_TESTS)]
runpy.run_path(str(GRAPHSD_TESTS / "conftest.py"))
