"""What a prepared directory needs besides its shards for `vllm serve DIR`, and safe printing of file text."""

import json
import re
from pathlib import Path

from vllm_gds.shards.manifest import MANIFEST_NAME, Manifest

# One of these is the tokenizer vLLM (through transformers) loads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> str:
    """``text`` with control characters (newlines, ANSI escapes, bidi overrides) written as escapes,
    so that what a file says cannot fake or hide lines of the output."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))


def serving_file_problems(model_dir: Path) -> list[str]:
    problems = []
    config = model_dir / "config.json"
    if not config.is_file():
        problems.append(f"{config} is missing: vLLM cannot build the model; copy the model's config.json "
                        "here or prepare the directory again")
    else:
        try:
            if not isinstance(json.loads(config.read_bytes()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as e:
            problems.append(f"{config} cannot be read as a JSON object ({e}); copy the model's "
                            "config.json here or prepare the directory again")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): vLLM "
                        "cannot start; copy the model's tokenizer files here or prepare the directory again")
    return problems


def stray_manifest_problem(model_dir: Path, manifest: Manifest) -> str | None:
    """A plain Hugging Face directory with a manifest copied into it: none of the listed shards is there."""
    listed = [f.path for r in manifest.ranks for f in r.files]
    if not listed or any((model_dir / p).exists() for p in listed):
        return None
    checkpoint = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not checkpoint:
        return None
    return (f"{model_dir} holds a Hugging Face checkpoint ({', '.join(checkpoint[:3])}"
            f"{', ...' if len(checkpoint) > 3 else ''}) and a {MANIFEST_NAME} that lists none of its files: "
            f"the manifest is stray. Remove {model_dir / MANIFEST_NAME} to serve the checkpoint with "
            "--load-format gds as it is, or prepare the directory with `vllm-gds prepare`")
