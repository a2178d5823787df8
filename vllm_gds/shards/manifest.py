"""The manifest of a prepared directory: what was prepared, for which layout, and where each byte is.

Reading it validates everything that can be checked without reading the shards:
a malformed or unsafe manifest is refused before any file is opened.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_gds.errors import ManifestError
from vllm_gds.shards import dtypes

MANIFEST_NAME = "vllm-gds-manifest.json"
FORMAT = "vllm-gds-shards"
FORMAT_VERSION = 1
ALIGNMENT = 4096

# Where in vLLM's loading the parameters were captured.
BEFORE_POST_PROCESSING = "before_post_processing"
AFTER_POST_PROCESSING = "after_post_processing"
CAPTURE_POINTS = (BEFORE_POST_PROCESSING, AFTER_POST_PROCESSING)

PREPARE_HINT = "prepare it with `vllm-gds prepare MODEL OUT --tensor-parallel-size N`"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file, a multiple of the alignment
    nbytes: int
    checksum: str


@dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the prepared directory
    size: int
    tensors: tuple[TensorEntry, ...]


@dataclass(frozen=True)
class RankShards:
    rank: int
    tp_rank: int
    pp_rank: int
    files: tuple[ShardFile, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.tensors)


@dataclass(frozen=True)
class Manifest:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    dtype: str
    quantization: str | None
    vllm_version: str
    platform: dict[str, Any]  # device_type, compute_capability (or None)
    capture_point: str
    checksum_algorithm: str
    alignment: int
    ranks: tuple[RankShards, ...]
    source: str = ""
    created: str = ""

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def rank(self, tp_rank: int, pp_rank: int) -> RankShards:
        for shards in self.ranks:
            if shards.tp_rank == tp_rank and shards.pp_rank == pp_rank:
                return shards
        raise ManifestError(f"manifest has no shards for tp_rank={tp_rank} pp_rank={pp_rank}")

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **body}


def global_rank(tp_rank: int, pp_rank: int, tensor_parallel_size: int) -> int:
    return pp_rank * tensor_parallel_size + tp_rank


def is_prepared(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / MANIFEST_NAME).is_file()


def write_manifest(model_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(model_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    return path


def read_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Read and validate ``model_dir``'s manifest; raise ManifestError naming the file and the fix."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{model_dir} has no {MANIFEST_NAME}: it is not a directory prepared by vllm-gds. "
            f"To serve it with --load-format gds, {PREPARE_HINT}, or point vLLM at a Hugging Face "
            "directory of *.safetensors files."
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path} is not valid JSON ({e}); the directory is damaged: prepare it again"
        ) from None
    try:
        return _parse(raw, model_dir)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}; prepare the directory again") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(
            f"{path} is malformed ({type(e).__name__}: {e}); prepare the directory again"
        ) from None


def _parse(raw: dict[str, Any], model_dir: Path) -> Manifest:
    if raw.get("format") != FORMAT:
        raise ManifestError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"format_version {raw.get('format_version')!r} is not {FORMAT_VERSION}, "
            "the version this vllm-gds reads"
        )
    tp, pp = _positive_int(raw, "tensor_parallel_size"), _positive_int(raw, "pipeline_parallel_size")
    alignment = _positive_int(raw, "alignment")
    capture_point = raw["capture_point"]
    if capture_point not in CAPTURE_POINTS:
        raise ManifestError(f"unknown capture_point {capture_point!r}")
    if not dtypes.is_known(raw["dtype"]):
        raise ManifestError(f"unknown dtype {raw['dtype']!r}")

    root = model_dir.resolve()
    ranks = tuple(_parse_rank(r, root, alignment) for r in raw["ranks"])
    seen = sorted((r.pp_rank, r.tp_rank) for r in ranks)
    expected = [(p, t) for p in range(pp) for t in range(tp)]
    if seen != expected:
        raise ManifestError(
            f"ranks {seen} do not match the layout tp={tp} x pp={pp} (expected {expected})"
        )
    for r in ranks:
        if r.rank != global_rank(r.tp_rank, r.pp_rank, tp):
            raise ManifestError(f"rank {r.rank} has tp_rank {r.tp_rank} and pp_rank {r.pp_rank}")

    platform = raw["platform"]
    if not isinstance(platform, dict) or "device_type" not in platform:
        raise ManifestError("platform must be an object with a device_type")
    return Manifest(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        dtype=raw["dtype"],
        quantization=raw.get("quantization"),
        vllm_version=str(raw["vllm_version"]),
        platform=platform,
        capture_point=capture_point,
        checksum_algorithm=str(raw["checksum_algorithm"]),
        alignment=alignment,
        ranks=ranks,
        source=str(raw.get("source", "")),
        created=str(raw.get("created", "")),
    )


def _positive_int(raw: dict[str, Any], key: str) -> int:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ManifestError(f"{key} must be a positive integer, not {value!r}")
    return value


def _parse_rank(raw: dict[str, Any], root: Path, alignment: int) -> RankShards:
    files = tuple(_parse_file(f, root, alignment) for f in raw["files"])
    return RankShards(
        rank=int(raw["rank"]), tp_rank=int(raw["tp_rank"]), pp_rank=int(raw["pp_rank"]), files=files
    )


def _parse_file(raw: dict[str, Any], root: Path, alignment: int) -> ShardFile:
    rel = raw["path"]
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise ManifestError(f"shard path {rel!r} must be relative to the prepared directory")
    if not (root / rel).resolve().is_relative_to(root):
        raise ManifestError(f"shard path {rel!r} points outside the prepared directory {root}; refused")
    size = int(raw["size"])
    tensors = []
    for t in raw["tensors"]:
        entry = TensorEntry(
            name=str(t["name"]),
            dtype=str(t["dtype"]),
            shape=tuple(int(d) for d in t["shape"]),
            offset=int(t["offset"]),
            nbytes=int(t["nbytes"]),
            checksum=str(t["checksum"]),
        )
        if not dtypes.is_known(entry.dtype):
            raise ManifestError(f"tensor {entry.name} in {rel} has unknown dtype {entry.dtype!r}")
        itemsize = dtypes.torch_dtype(entry.dtype).itemsize
        if entry.nbytes != math.prod(entry.shape) * itemsize:
            raise ManifestError(f"tensor {entry.name} in {rel}: nbytes does not match its shape")
        if entry.offset % alignment or entry.offset < 0 or entry.offset + entry.nbytes > size:
            raise ManifestError(
                f"tensor {entry.name} in {rel}: offset {entry.offset} is not aligned or outside the file"
            )
        tensors.append(entry)
    return ShardFile(path=rel, size=size, tensors=tuple(tensors))
