"""Editing a prepared directory's manifest in place, for the tests that damage it."""

import json

from vllm_gds.shards.manifest import MANIFEST_NAME


def edit_manifest(model_dir, edit) -> None:
    """Load the manifest's JSON, let `edit` change it in place, write it back."""
    path = model_dir / MANIFEST_NAME
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
