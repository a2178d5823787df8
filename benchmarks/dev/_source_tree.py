"""The tools in benchmarks/dev/ import this first, as those in benchmarks/ import theirs: it runs
benchmarks/_source_tree.py (the one place where the source tree is set up) from here."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "benchmarks_source_tree", Path(__file__).resolve().parent.parent / "_source_tree.py")
_setup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_setup)
ROOT = _setup.ROOT
