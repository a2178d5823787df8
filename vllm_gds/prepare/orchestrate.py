"""`vllm-gds prepare`: shard a model once per layout, as vLLM's own weight loaders shard it.

The work happens in a temporary directory beside OUT, renamed to OUT only when
complete, so an interrupted prepare never leaves a directory that looks prepared.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from vllm_gds import checksum
from vllm_gds.errors import GdsError, UnreadableError, os_error_message
from vllm_gds.loader.hf_stream import safetensors_files
from vllm_gds.prepare.capture import record_name
from vllm_gds.interrupt import Interrupted, remove_stale_partials, remove_tree, signals_raise, stop_process_group
from vllm_gds.shards.manifest import (
    ALIGNMENT, BEFORE_POST_PROCESSING, Manifest, RankShards, ShardFile, TensorEntry, write_manifest,
)
from vllm_gds.shards.writer import DEFAULT_MAX_FILE_BYTES

# Copied beside the shards so that `vllm serve OUT --load-format gds` needs nothing else.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)
QUANTIZATIONS = ("fp8",)
DTYPE_BYTES = {"auto": None, "bfloat16": 2, "float16": 2, "float32": 4, "half": 2, "float": 4}


@dataclass(frozen=True)
class PrepareRequest:
    source: Path
    out: Path
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"
    quantization: str | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    log: Path | None = None
    kv_calibration: bool = True  # also write the KV cache calibration file (vllm-gds calibrate)


def _check_request(req: PrepareRequest) -> None:
    if not (req.source / "config.json").is_file():
        raise GdsError(f"{req.source} has no config.json: give a local Hugging Face model directory")
    if not safetensors_files(req.source):
        raise GdsError(f"{req.source} has no *.safetensors files: prepare reads safetensors checkpoints")
    if req.out.exists():
        raise GdsError(f"{req.out} already exists: remove it or choose another output directory")
    if req.tensor_parallel_size < 1 or req.pipeline_parallel_size < 1:
        raise GdsError("--tensor-parallel-size and --pipeline-parallel-size must be at least 1")
    if req.quantization not in (None, *QUANTIZATIONS):
        raise GdsError(f"--quantization {req.quantization} is not supported; choose one of {QUANTIZATIONS}")
    if req.dtype not in DTYPE_BYTES:
        raise GdsError(f"--dtype {req.dtype} is not one of {', '.join(DTYPE_BYTES)}")


def estimate_bytes(req: PrepareRequest) -> int:
    """An upper estimate of OUT's size: the source's bytes, rescaled for dtype and fp8, plus replicas."""
    files = safetensors_files(req.source)
    source_bytes = sum(p.stat().st_size for p in files)
    target = DTYPE_BYTES[req.dtype]
    scale = (target / _element_bytes(files[0])) if target else 1.0
    if req.quantization == "fp8":
        source_bytes *= 2  # the intermediate fp8 checkpoint, then the shards
    # Embeddings, norms and some heads are replicated on every rank: allow 25% on top.
    return int(source_bytes * scale * 1.25) + (64 << 20)


def _element_bytes(path: Path) -> int:
    """The element size of the largest tensor of a safetensors file: the checkpoint's dtype."""
    from vllm_gds.shards import dtypes
    from vllm_gds.shards.safetensors_layout import tensor_placements

    largest = max(tensor_placements(path), key=lambda p: p.nbytes)
    return dtypes.torch_dtype(largest.dtype).itemsize


def _check_disk(req: PrepareRequest, needed: int) -> None:
    free = shutil.disk_usage(req.out.parent).free
    if free < needed:
        raise GdsError(
            f"{req.out.parent} has {free / 1e9:.1f} GB free; preparing needs about {needed / 1e9:.1f} GB: "
            "free some space or prepare elsewhere"
        )


def _dir_bytes(path: Path) -> int:
    total = 0
    for entry in path.glob("*.safetensors"):
        try:
            total += entry.stat().st_blocks * 512
        except OSError:
            pass
    return total


def _run_capture(req: PrepareRequest, model: Path, capture_dir: Path, expected_bytes: int, log: Path) -> None:
    cmd = [
        sys.executable, "-m", "vllm_gds.prepare.capture", "--model", str(model),
        "--capture-dir", str(capture_dir),
        "--tensor-parallel-size", str(req.tensor_parallel_size),
        "--pipeline-parallel-size", str(req.pipeline_parallel_size),
        "--dtype", req.dtype, "--max-file-bytes", str(req.max_file_bytes),
    ]
    # The capture never serves: on vLLM's CPU build, skip its NUMA thread binding, which refuses
    # several ranks on a machine with one NUMA node. GPU platforms do not read this variable.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", **os.environ}
    with open(log, "w") as log_file:
        # Its own session: a Ctrl-C to the terminal reaches only this process, which stops the
        # child's whole group (vLLM's engine processes included) on every way out.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            with tqdm(total=expected_bytes, unit="B", unit_scale=True, desc="capturing shards", mininterval=2) as bar:
                while proc.poll() is None:
                    bar.update(max(0, min(_dir_bytes(capture_dir), expected_bytes) - bar.n))
                    time.sleep(0.5)
                bar.update(max(0, expected_bytes - bar.n) if proc.returncode == 0 else 0)
        except Interrupted as e:
            e.what = f"while vLLM captured the shards (child PID {proc.pid}, stopped)"
            raise
        finally:
            stop_process_group(proc)
    if proc.returncode != 0:
        tail = "".join(open(log, errors="replace").readlines()[-40:])
        raise GdsError(f"vLLM could not capture the model (full log: {log}):\n{tail}")


def _assemble_manifest(req: PrepareRequest, capture_dir: Path) -> tuple[Manifest, dict]:
    world = req.tensor_parallel_size * req.pipeline_parallel_size
    records = [json.loads((capture_dir / record_name(r)).read_text()) for r in range(world)]
    ranks = []
    for record in records:
        raw = record["rank"]
        files = tuple(
            ShardFile(path=f["path"], size=f["size"],
                      tensors=tuple(TensorEntry(**{**t, "shape": tuple(t["shape"])}) for t in f["tensors"]))
            for f in raw["files"]
        )
        ranks.append(RankShards(rank=raw["rank"], tp_rank=raw["tp_rank"], pp_rank=raw["pp_rank"], files=files))
    setup = records[0]["setup"]
    manifest = Manifest(
        tensor_parallel_size=setup["tensor_parallel_size"],
        pipeline_parallel_size=setup["pipeline_parallel_size"],
        dtype=setup["dtype"],
        quantization=setup["quantization"],
        vllm_version=setup["vllm_version"],
        platform=setup["platform"],
        capture_point=BEFORE_POST_PROCESSING,
        checksum_algorithm=checksum.ALGORITHM,
        alignment=ALIGNMENT,
        ranks=tuple(sorted(ranks, key=lambda r: r.rank)),
        source=str(req.source),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return manifest, records[0]


def _write_side_files(model: Path, out: Path, tie_word_embeddings: bool) -> None:
    config = json.loads((model / "config.json").read_text())
    # The capture may have untied the embeddings (a checkpoint with its own lm_head): keep what it saw.
    config["tie_word_embeddings"] = tie_word_embeddings
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    for name in SIDE_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, out / name)


def _calibrate_kv_cache(source: Path, out: Path) -> None:
    """The quantized KV cache's calibration file beside the shards; optional, so a failure warns."""
    from vllm_gds.kvcache.calibration import calibrate

    print("calibrating the quantized KV cache (vllm-gds calibrate; skip with --no-kv-calibration)", flush=True)
    try:
        calibrate(source, out_dir=out)
    except Exception as e:  # the weights are prepared either way; say what is missing and how to add it
        print(f"warning: no KV cache calibration was written ({type(e).__name__}: {e}); the quantized "
              f"KV cache would run uncalibrated: run `vllm-gds calibrate {source} --out-dir OUT` later",
              file=sys.stderr, flush=True)


def prepare(req: PrepareRequest) -> Path:
    req = PrepareRequest(**{**req.__dict__, "source": req.source.resolve(), "out": req.out.resolve()})
    _check_request(req)
    expected = estimate_bytes(req)
    _make_dir(req.out.parent, parents=True, exist_ok=True)
    for stale in remove_stale_partials(req.out.parent, req.out.name):
        print(f"removed {stale}, left by an earlier prepare that did not finish", file=sys.stderr)
    _check_disk(req, expected)
    tmp = req.out.parent / f".{req.out.name}.partial-{os.getpid()}"
    with signals_raise():
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            _make_dir(tmp)
            return _prepare_into(req, tmp, expected)
        except Interrupted as e:
            e.what = f"prepare {req.source} -> {req.out} {e.what or ''}".rstrip() + f"; removed {tmp}"
            raise
        finally:
            if tmp.exists():
                remove_tree(tmp)


def _make_dir(path: Path, **kwargs) -> None:
    try:
        path.mkdir(**kwargs)
    except OSError as e:
        raise UnreadableError(os_error_message(path, e, "write")) from None


def _prepare_into(req: PrepareRequest, tmp: Path, expected: int) -> Path:
    model = req.source
    if req.quantization == "fp8":
        from vllm_gds.prepare.fp8 import quantize_checkpoint

        model = quantize_checkpoint(req.source, tmp / ".fp8-source")
    log = req.log or (tmp.parent / f".{req.out.name}.prepare.log")
    _run_capture(req, model, tmp, expected, log)
    manifest, record = _assemble_manifest(req, tmp)
    _write_side_files(model, tmp, record["tie_word_embeddings"])
    if req.kv_calibration:
        _calibrate_kv_cache(req.source, tmp)
    shutil.rmtree(tmp / ".fp8-source", ignore_errors=True)
    for record in tmp.glob("capture-rank-*.json"):
        record.unlink()
    write_manifest(tmp, manifest)  # last: a directory with a manifest is complete
    tmp.rename(req.out)
    if req.log is None:
        log.unlink(missing_ok=True)
    return req.out
