"""Run the benchmarks from a source tree, the package installed or not: every script in
benchmarks/ imports this module first (those in benchmarks/dev/ through dev/_source_tree.py).

- The repository root goes first on sys.path, so `vllm_gds` is this tree's package.
- benchmarks/ goes on sys.path, so the tools in dev/ can import kv_bench, load_bench, kv_quality.
- `vllm_gds.kernels` is this tree's top-level kernels/ (an install maps it there through
  pyproject's package-dir; a source tree has no vllm_gds/kernels, so this maps it the same way).
  No symlink, no install: `PYTHONPATH=` is not needed either, e.g. on the GPU machine
      python3 benchmarks/kv_bench.py --out $OUT
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
KERNELS = ROOT / "kernels"

for _path in (str(BENCHMARKS), str(ROOT)):  # ROOT ends up first
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Finds `vllm_gds.kernels` in kernels/; its modules then resolve through its __path__."""

    vllm_gds_source_tree = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "vllm_gds.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)])


# A tree that has vllm_gds/kernels (the old symlink) imports it the ordinary way. The finder goes
# first: an editable install of another checkout would otherwise map its own kernels/ here.
if not (ROOT / "vllm_gds" / "kernels").exists() and not any(
        getattr(f, "vllm_gds_source_tree", False) for f in sys.meta_path):
    sys.meta_path.insert(0, _KernelsFinder())
