"""benchmarks/ as a user finds it: a few tools at the top, the source tree set up in one place."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# The user's tools (issue 15: load speed, KV speed, KV quality and at most two more).
TOOLS = {"load_bench.py", "kv_bench.py", "kv_quality.py"}


def test_top_level_holds_only_the_user_tools():
    top = {p.name for p in BENCHMARKS.glob("*.py")} - {"_source_tree.py"}
    assert TOOLS <= top and len(top) <= len(TOOLS) + 2, (
        f"benchmarks/ holds {sorted(top)}: sweeps, SASS tools and probes go to benchmarks/dev/ "
        "(one line each in its README.md)")
    listed = (BENCHMARKS / "dev" / "README.md").read_text()
    missing = [p.name for p in (BENCHMARKS / "dev").glob("*.py")
               if not p.name.startswith("_") and f"`{p.name}`" not in listed]
    assert not missing, f"benchmarks/dev/README.md has no line for {missing}"


def _edits_sys_path(tree: ast.AST) -> list[int]:
    """Lines of module-level statements that change sys.path (sys.path.insert/append/...)."""
    lines = []
    for node in tree.body:
        for sub in ast.walk(node):
            if (isinstance(sub, ast.Attribute) and sub.attr in {"insert", "append", "extend"}
                    and isinstance(sub.value, ast.Attribute) and sub.value.attr == "path"
                    and isinstance(sub.value.value, ast.Name) and sub.value.value.id == "sys"):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    lines.append(sub.lineno)
    return lines


def test_only_source_tree_sets_the_path():
    for path in sorted(BENCHMARKS.rglob("*.py")):
        if path.name == "_source_tree.py":
            continue
        lines = _edits_sys_path(ast.parse(path.read_text(), str(path)))
        assert not lines, (f"{path.relative_to(ROOT)}:{lines} changes sys.path; import "
                           "_source_tree instead (benchmarks/_source_tree.py sets it in one place)")


def test_source_tree_finds_this_trees_kernels():
    """From any directory, with or without an install of another checkout, a script that imports
    _source_tree gets this tree's vllm_gds and kernels/ as vllm_gds.kernels."""
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); import _source_tree, vllm_gds; "
            "print(vllm_gds.__file__); print(importlib.util.find_spec('vllm_gds.kernels').origin)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for where in (BENCHMARKS, BENCHMARKS / "dev"):
        out = subprocess.run([sys.executable, "-c", code, str(where)], cwd="/", env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        assert Path(out[0]).resolve() == ROOT / "vllm_gds" / "__init__.py"
        assert Path(out[1]).resolve() == ROOT / "kernels" / "__init__.py"
