"""The manifest of a prepared directory: what was prepared, for which layout, and where each byte is.

Reading it validates everything that can be checked without reading the shards:
a malformed or unsafe manifest is refused before any file is opened.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_gds.errors import ManifestError, NotPreparedError, UnreadableError
from vllm_gds.shards import dtypes
from vllm_gds.checksum import ALGORITHM

MANIFEST_NAME = "vllm-gds-manifest.json"
FORMAT = "vllm-gds-shards"
FORMAT_VERSION = 1
ALIGNMENT = 4096

# Where in vLLM's loading the parameters were captured.
BEFORE_POST_PROCESSING = "before_post_processing"
AFTER_POST_PROCESSING = "after_post_processing"
CAPTURE_POINTS = (BEFORE_POST_PROCESSING, AFTER_POST_PROCESSING)

PREPARE_HINT = "prepare it with `vllm-gds prepare MODEL OUT --tensor-parallel-size N`"
# A real manifest is a few hundred bytes per tensor; 64 MiB holds millions of tensors.
MAX_MANIFEST_BYTES = 64 << 20
_CHECKSUM = re.compile(r"[0-9a-f]{16}")
_TOP_KEYS = {
    "format", "format_version", "tensor_parallel_size", "pipeline_parallel_size", "dtype", "quantization",
    "vllm_version", "platform", "capture_point", "checksum_algorithm", "alignment", "ranks", "source",
    "created",
}
_RANK_KEYS = {"rank", "tp_rank", "pp_rank", "files"}
_FILE_KEYS = {"path", "size", "tensors"}
_TENSOR_KEYS = {"name", "dtype", "shape", "offset", "nbytes", "checksum"}


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
    if not os.path.lexists(path):
        raise NotPreparedError(
            f"{model_dir} has no {MANIFEST_NAME}: it is not a directory prepared by vllm-gds. "
            f"To serve it with --load-format gds, {PREPARE_HINT}, or point vLLM at a Hugging Face "
            "directory of *.safetensors files."
        )
    raw = _load_json(path)
    try:
        return _parse(raw, model_dir)
    except UnreadableError:
        raise
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}; prepare the directory again") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(
            f"{path} is malformed ({type(e).__name__}: {e}); prepare the directory again"
        ) from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json_loads(text: bytes | str) -> Any:
    """json.loads without NaN/Infinity; ValueError for those and for nesting too deep to parse."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _load_json(path: Path) -> Any:
    from vllm_gds.shards.files import open_regular

    with open_regular(path) as f:
        text = f.read(MAX_MANIFEST_BYTES + 1)
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, far more than any prepared model "
            "needs; the directory is damaged: prepare it again"
        )
    try:
        return strict_json_loads(text)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError(
            f"{path} is not valid JSON ({e}); the directory is damaged: prepare it again"
        ) from None


def _known_keys(raw: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ManifestError(f"{what} must be a JSON object, not {type(raw).__name__}")
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise ManifestError(f"{what} has unknown field(s) {', '.join(map(repr, unknown))}")
    missing = sorted(keys - set(raw) - {"source", "created", "quantization"})
    if missing:
        raise ManifestError(f"{what} lacks field(s) {', '.join(map(repr, missing))}")
    return raw


def _int(raw: dict[str, Any], key: str, what: str, minimum: int = 0) -> int:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ManifestError(f"{what}: {key} must be an integer >= {minimum}, not {value!r}")
    return value


def _str(raw: dict[str, Any], key: str, what: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise ManifestError(f"{what}: {key} must be a string, not {value!r}")
    return value


def _parse(raw: dict[str, Any], model_dir: Path) -> Manifest:
    raw = _known_keys(raw, _TOP_KEYS, "the manifest")
    if raw.get("format") != FORMAT:
        raise ManifestError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"format_version {raw.get('format_version')!r} is not {FORMAT_VERSION}, "
            "the version this vllm-gds reads"
        )
    tp, pp = _positive_int(raw, "tensor_parallel_size"), _positive_int(raw, "pipeline_parallel_size")
    alignment = _positive_int(raw, "alignment")
    if alignment != ALIGNMENT:
        raise ManifestError(f"alignment {alignment} is not {ALIGNMENT}, the only one vllm-gds writes")
    if raw["checksum_algorithm"] != ALGORITHM:
        raise ManifestError(
            f"checksum_algorithm {raw['checksum_algorithm']!r} is not {ALGORITHM!r}, "
            "the one this vllm-gds checks"
        )
    if raw.get("quantization") is not None and not isinstance(raw["quantization"], str):
        raise ManifestError(f"quantization must be a string or null, not {raw['quantization']!r}")
    for key in ("vllm_version", "source", "created", "dtype", "capture_point"):
        if key in raw:
            _str(raw, key, "the manifest")
    if not isinstance(raw["ranks"], list):
        raise ManifestError("ranks must be a list")
    capture_point = raw["capture_point"]
    if capture_point not in CAPTURE_POINTS:
        raise ManifestError(f"unknown capture_point {capture_point!r}")
    if not dtypes.is_known(raw["dtype"]):
        raise ManifestError(f"unknown dtype {raw['dtype']!r}")

    root = model_dir.resolve()
    ranks = tuple(_parse_rank(r, root, alignment) for r in raw["ranks"])
    paths = [f.path for r in ranks for f in r.files]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise ManifestError(f"shard file(s) {duplicates} are listed more than once")
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


def _parse_rank(raw: Any, root: Path, alignment: int) -> RankShards:
    raw = _known_keys(raw, _RANK_KEYS, "a rank entry")
    what = f"rank {raw.get('rank')!r}"
    rank = RankShards(
        rank=_int(raw, "rank", what), tp_rank=_int(raw, "tp_rank", what), pp_rank=_int(raw, "pp_rank", what),
        files=(),
    )
    if not isinstance(raw["files"], list):
        raise ManifestError(f"{what}: files must be a list")
    files = tuple(_parse_file(f, root, alignment) for f in raw["files"])
    names = [t.name for f in files for t in f.tensors]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(f"{what}: tensor(s) {duplicates[:5]} are listed more than once")
    return RankShards(rank=rank.rank, tp_rank=rank.tp_rank, pp_rank=rank.pp_rank, files=files)


def _parse_file(raw: Any, root: Path, alignment: int) -> ShardFile:
    raw = _known_keys(raw, _FILE_KEYS, "a shard file entry")
    rel = raw["path"]
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\0" in rel:
        raise ManifestError(f"shard path {rel!r} must be relative to the prepared directory")
    try:
        inside = (root / rel).resolve().is_relative_to(root)
    except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError on Python 3.11-3.12
        raise UnreadableError(
            f"shard path {rel!r} in {root / MANIFEST_NAME} cannot be resolved ({e}): a symbolic link "
            "points (through others) at itself; replace it with the real file"
        ) from None
    if not inside:
        raise ManifestError(f"shard path {rel!r} points outside the prepared directory {root}; refused")
    what = f"shard file {rel!r}"
    size = _int(raw, "size", what)
    if not isinstance(raw["tensors"], list):
        raise ManifestError(f"{what}: tensors must be a list")
    tensors = []
    for t in raw["tensors"]:
        t = _known_keys(t, _TENSOR_KEYS, f"a tensor entry of {rel}")
        name = _str(t, "name", f"a tensor entry of {rel}")
        where = f"tensor {name!r} in {rel}"
        shape = t["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ManifestError(f"{where}: shape must be a list of non-negative integers, not {shape!r}")
        entry = TensorEntry(
            name=name,
            dtype=_str(t, "dtype", where),
            shape=tuple(shape),
            offset=_int(t, "offset", where),
            nbytes=_int(t, "nbytes", where),
            checksum=_str(t, "checksum", where),
        )
        if not _CHECKSUM.fullmatch(entry.checksum):
            raise ManifestError(f"{where}: checksum {entry.checksum!r} is not 16 lower-case hex digits")
        if not dtypes.is_known(entry.dtype):
            raise ManifestError(f"tensor {entry.name} in {rel} has unknown dtype {entry.dtype!r}")
        itemsize = dtypes.torch_dtype(entry.dtype).itemsize
        if entry.nbytes != math.prod(entry.shape) * itemsize:
            raise ManifestError(f"tensor {entry.name} in {rel}: nbytes does not match its shape")
        if entry.offset % alignment or entry.offset + entry.nbytes > size:
            raise ManifestError(
                f"tensor {entry.name} in {rel}: offset {entry.offset} is not aligned or outside the file"
            )
        tensors.append(entry)
    names = [e.name for e in tensors]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(f"{what}: tensor(s) {duplicates[:5]} are listed more than once")
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in tensors)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ManifestError(f"tensors {first!r} and {second!r} in {rel} overlap")
    return ShardFile(path=rel, size=size, tensors=tuple(tensors))
