"""One-way imports, read from the source (ast): no module is imported, so this runs in a second.

Every import counts, at the top of a file or inside a function. Rules name folders (relative to
the repository) and module prefixes; ``vllm_gds.loader`` matches ``vllm_gds.loader`` and
``vllm_gds.loader.anything``. After the package regroup, extend or rename the rows below.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Folders whose files may import only the standard library, these top-level packages and their
# own folder's modules (relative imports).
ONLY = {
    "kernels": ("triton", "torch"),
}

# (folder, module prefixes its files never import, why)
NEVER = [
    ("vllm_gds/kvcache", ("vllm_gds.loader", "vllm_gds.io", "vllm_gds.shards", "vllm_gds.prepare"),
     "the KV side never imports the loader side"),
    ("vllm_gds/loader", ("vllm_gds.kvcache",), "the loader side never imports the KV side"),
    ("vllm_gds/io", ("vllm_gds.shards", "vllm_gds.loader", "vllm_gds.prepare", "vllm_gds.kvcache"),
     "data flows files -> shards -> io -> loader: io never reaches up"),
    ("vllm_gds/shards", ("vllm_gds.io", "vllm_gds.loader", "vllm_gds.prepare", "vllm_gds.kvcache"),
     "shards is below io and the loader"),
]

# Rules known to fail today, with the reason (strict: they must fail until fixed, then go).
KNOWN: dict[str, str] = {}


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str, bool]]:
    """(line, module, relative) for each module a file imports; ``from a import b`` gives both
    ``a`` and ``a.b`` (b may be a module). Relative imports resolve against the file's folder
    below ``root`` (so kernels/ is its own root package, ``kernels``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.append((node.lineno, module, bool(node.level)))
            out += [(node.lineno, f"{module}.{a.name}", bool(node.level)) for a in node.names]
    return out


def python_files(folder: str) -> list[Path]:
    """The .py files under a folder, not following links (vllm_gds/kernels may be a link)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT / folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    assert files, f"no Python files under {folder}: update the rules in {Path(__file__).name}"
    return sorted(files)


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("folder", sorted(ONLY))
def test_folder_imports_only_stdlib_and_allowed_packages(folder):
    own = folder.replace("/", ".")
    bad = []
    for path in python_files(folder):
        for line, module, relative in imports_of(path):
            top = module.split(".")[0]
            if relative and _matches(module, own):
                continue
            if top in sys.stdlib_module_names or top in ONLY[folder]:
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    bad = list(dict.fromkeys(b.rsplit(".", 1)[0] if b.count(".") > 2 else b for b in bad))
    assert not bad, (f"{folder}/ may import only the standard library, "
                     f"{', '.join(ONLY[folder])} and its own modules:\n" + "\n".join(bad))


@pytest.mark.parametrize("folder, forbidden, why", [
    pytest.param(*rule, marks=pytest.mark.xfail(strict=True, reason=KNOWN[rule[0]]))
    if rule[0] in KNOWN else rule for rule in NEVER
], ids=[rule[0] for rule in NEVER])
def test_folder_never_imports(folder, forbidden, why):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}"
           for path in python_files(folder)
           for line, module, _ in imports_of(path)
           if any(_matches(module, prefix) for prefix in forbidden)]
    assert not bad, f"{why}:\n" + "\n".join(bad)


def test_the_reader_of_imports_sees_what_it_should(tmp_path):
    """The rules are only as good as imports_of: relative, from-, aliased and nested imports."""
    pkg = tmp_path / "vllm_gds" / "kvcache"
    pkg.mkdir(parents=True)
    (pkg / "m.py").write_text(
        "import os.path as p\nfrom . import tables\nfrom ..io import reader\n"
        "def f():\n    from vllm_gds.loader import x\n")
    got = {(m, r) for _, m, r in imports_of(pkg / "m.py", tmp_path)}
    assert ("os.path", False) in got
    assert ("vllm_gds.kvcache.tables", True) in got
    assert ("vllm_gds.io.reader", True) in got
    assert ("vllm_gds.loader.x", False) in got
