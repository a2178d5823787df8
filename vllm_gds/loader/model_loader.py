"""The vLLM model loader for ``--load-format gds``.

A directory prepared by ``vllm-gds prepare`` is loaded rank by rank: each rank
checks the manifest against the running setup, builds the model, reads only its
own shard files straight into its parameters, verifies their checksums on the
device, and lets vLLM post-process them. A plain Hugging Face safetensors
directory is streamed through the same reader and sharded by vLLM's own weight
loaders.
"""

import contextlib
import dataclasses
import functools
import os
import time
from pathlib import Path

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
from vllm.utils.torch_utils import set_default_torch_dtype

from vllm_gds import _vllm_compat, run_dir
from vllm_gds.errors import GdsError
from vllm_gds.loader import failures
from vllm_gds.loader.hf_stream import safetensors_files, stream_safetensors
from vllm_gds.loader.parameters import install
from vllm_gds.io.reader import ReadOptions, ReadStats, gds_problems, prewarm, release_pinned, resolve_mode
from vllm_gds.loader.options import LoaderOptions
from vllm_gds.loader.report import LoadReport
from vllm_gds.shards.manifest import BEFORE_POST_PROCESSING, MANIFEST_NAME, is_prepared, read_manifest
from vllm_gds.shards.validate import check_compatible, check_rank_files

logger = init_logger(f"vllm.{__name__}")  # under "vllm", so vLLM's log handlers print it

LOAD_FORMAT = "gds"


def check_supported_parallelism(vllm_config: VllmConfig) -> None:
    parallel = vllm_config.parallel_config
    if parallel.data_parallel_size > 1 or parallel.enable_expert_parallel:
        raise GdsError(
            "--load-format gds does not support data-parallel or expert-parallel layouts yet "
            f"(data_parallel_size={parallel.data_parallel_size}, "
            f"enable_expert_parallel={parallel.enable_expert_parallel}); "
            "supported: tensor and pipeline parallelism"
        )


def _global_rank() -> int | None:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        tp_rank, pp_rank = _vllm_compat.parallel_ranks()
        return pp_rank * get_tensor_model_parallel_world_size() + tp_rank
    except Exception:  # vLLM's process groups do not exist yet (options parsed in process 0)
        return None


@contextlib.contextmanager
def _said_last():
    """A GdsError on its way out: logged at ERROR here, and kept for process 0 to print last
    (vllm_gds.loader.failures), since vLLM's tracebacks bury it."""
    try:
        yield
    except GdsError as err:
        rank = _global_rank()
        logger.error("vllm-gds: %s%s", "" if rank is None else f"rank {rank}: ", err)
        failures.record(str(err), rank)
        raise


class _StreamingHfLoader(DefaultModelLoader):
    """vLLM's default loader, fed by the vllm-gds read engine instead of safetensors' mmap."""

    def __init__(self, load_config: LoadConfig, read_options: ReadOptions, device: torch.device):
        super().__init__(load_config)
        self.read_options = read_options
        self.device = device
        self.stats = ReadStats(mode="")  # stream_safetensors records the mode each read took

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module):
        model_dir = Path(model_config.model)
        files = safetensors_files(model_dir)
        if not files:
            raise GdsError(
                f"{model_dir} holds neither a {MANIFEST_NAME} nor *.safetensors files: "
                "--load-format gds loads a directory prepared by `vllm-gds prepare` or a Hugging Face "
                "safetensors directory"
            )
        yield from stream_safetensors(files, self.device, self.read_options, self.stats)


class GdsModelLoader(BaseModelLoader):
    """``--load-format gds``; settings come from ``--model-loader-extra-config`` (see LoaderOptions)."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        with _said_last():
            self.options = LoaderOptions.from_extra_config(load_config.model_loader_extra_config)
        self.read_options = self.options.read  # ranks on the node filled in per load (_resolve_threads)

    def download_model(self, model_config: ModelConfig) -> None:
        if not os.path.isdir(model_config.model):
            raise GdsError(
                f"--load-format gds reads a local directory; {model_config.model} is not one "
                "(download the model first, then prepare it with `vllm-gds prepare`)"
            )

    @_said_last()
    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        check_supported_parallelism(vllm_config)
        self._resolve_threads(vllm_config)
        self.download_model(model_config)
        try:
            if is_prepared(model_config.model):
                return self._load_prepared(vllm_config, model_config, prefix)
            return self._load_huggingface(vllm_config, model_config, prefix)
        finally:
            release_pinned()  # no pinned memory outlives the load

    @_said_last()
    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Reload weights into an existing model (vLLM's in-place reload path)."""
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        self._resolve_threads(vllm_config)
        device = _vllm_compat.target_device(vllm_config)
        try:
            if is_prepared(model_config.model):
                self._install_prepared(model, model_config, device, time.perf_counter())
            else:
                loader = self._hf_loader(device)
                loader.load_weights(model, model_config)
        finally:
            release_pinned()

    def _resolve_threads(self, vllm_config: VllmConfig) -> None:
        # The ranks of this node share its CPUs: the reader picks threads from this rank's share.
        parallel = vllm_config.parallel_config
        ranks = parallel.world_size
        if torch.cuda.is_available():
            ranks = min(ranks, max(1, torch.cuda.device_count()))
        local = os.environ.get("LOCAL_WORLD_SIZE", "")
        if local.isdigit() and int(local) > 0:
            ranks = int(local)
        read = self.options.read
        self.read_options = dataclasses.replace(read, ranks_on_node=read.ranks_on_node or ranks)

    def _hf_loader(self, device: torch.device) -> _StreamingHfLoader:
        inner = dataclasses.replace(self.load_config, load_format="safetensors", model_loader_extra_config={})
        return _StreamingHfLoader(inner, self.read_options, device)

    def _load_prepared(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str) -> nn.Module:
        start = time.perf_counter()
        device = _vllm_compat.target_device(vllm_config)
        model_dir = Path(model_config.model)
        manifest = read_manifest(model_dir)
        if manifest.capture_point != BEFORE_POST_PROCESSING:
            raise GdsError(
                f"{model_dir / MANIFEST_NAME}: capture point {manifest.capture_point} is not supported by "
                f"this vllm-gds; prepare the directory again (the default captures {BEFORE_POST_PROCESSING})"
            )
        check_compatible(manifest, _vllm_compat.running_setup(vllm_config, model_config), model_dir)
        self._announce_read_path(device)  # policy `require` fails here, before anything is built
        # The reads' pinned memory is pinned (1-2 GiB/s) while the model is built, not after.
        tp_rank, pp_rank = _vllm_compat.parallel_ranks()
        prewarm([model_dir / f.path for f in manifest.rank(tp_rank, pp_rank).files], self.read_options, device)
        with set_default_torch_dtype(model_config.dtype), device:
            model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        self._install_prepared(model, model_config, device, start, manifest)
        process_weights_after_loading(model, model_config, device)
        return model.eval()

    def _install_prepared(self, model, model_config, device, start, manifest=None) -> None:
        model_dir = Path(model_config.model)
        manifest = manifest or read_manifest(model_dir)
        tp_rank, pp_rank = _vllm_compat.parallel_ranks()
        shards = manifest.rank(tp_rank, pp_rank)
        check_rank_files(model_dir, shards)
        # Rank 0 shows a progress bar; every rank reads its own share at the same time.
        label = f"vllm-gds loading (rank 0 of {manifest.world_size})" if shards.rank == 0 else None
        stats, verify_seconds, tensors = install(
            model, model_dir, shards, device, self.read_options, self.options.verify_checksums, label
        )
        self._report(LoadReport(
            model=str(model_dir), source="prepared", rank=shards.rank, tp_rank=tp_rank, pp_rank=pp_rank,
            mode=stats.mode, files=stats.files, tensors=tensors, nbytes=stats.nbytes,
            read_seconds=stats.seconds, checksums_verified=self.options.verify_checksums,
            verify_seconds=verify_seconds, total_seconds=time.perf_counter() - start,
            **LoadReport.engine_fields(stats.detail),
        ))

    def _load_huggingface(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str) -> nn.Module:
        start = time.perf_counter()
        device = _vllm_compat.target_device(vllm_config)
        logger.info(
            "vllm-gds: %s has no %s; streaming its safetensors files (vLLM's weight loaders shard them)",
            model_config.model, MANIFEST_NAME,
        )
        self._announce_read_path(device)
        prewarm(safetensors_files(Path(model_config.model))[:1], self.read_options, device)
        loader = self._hf_loader(device)
        model = loader.load_model(vllm_config, model_config, prefix)
        tp_rank, pp_rank = _vllm_compat.parallel_ranks()
        parallel = vllm_config.parallel_config
        self._report(LoadReport(
            model=str(model_config.model), source="huggingface",
            rank=pp_rank * parallel.tensor_parallel_size + tp_rank, tp_rank=tp_rank, pp_rank=pp_rank,
            mode=loader.stats.mode, files=loader.stats.files,
            tensors=sum(1 for _ in model.parameters()), nbytes=loader.stats.nbytes,
            read_seconds=loader.stats.seconds, checksums_verified=False, verify_seconds=0.0,
            total_seconds=time.perf_counter() - start, **LoadReport.engine_fields(loader.stats.detail),
        ))
        return model

    def _announce_read_path(self, device: torch.device) -> None:
        """Say, before reading, which path the reads take and, without GDS, why not."""
        policy = self.options.read.policy
        mode = resolve_mode(device, policy)
        if mode == "compat" and policy == "auto":
            logger.info(
                "vllm-gds: GPUDirect Storage is not used on this node (%s); reading through the "
                "compatibility path (pinned host buffers). `vllm-gds doctor PATH` says how to fix it.",
                "; ".join(gds_problems(device)) or "kvikio prefers its compat mode",
            )
        elif mode == "compat":
            logger.info("vllm-gds: GPUDirect Storage is off (policy 'off'); reading through pinned host buffers")

    def _report(self, report: LoadReport) -> None:
        logger.info(report.log_line())
        shared = run_dir.current()
        if shared is not None:  # process 0 serves it on /metrics (vllm_gds.loader.metrics)
            report.write(shared)
        if self.options.report_dir is not None:
            path = report.write(self.options.report_dir)
            logger.info("vllm-gds: load report written to %s", path)


def _refuse_prepared_directories() -> None:
    """Make vLLM's default loader say what to do with a prepared directory.

    Without this, `vllm serve PREPARED` (no --load-format gds) would fail on the
    shards' padding tensors or on names it cannot map, far from the cause.
    """
    original = DefaultModelLoader._prepare_weights
    if getattr(original, "_vllm_gds_guard", False):
        return

    @functools.wraps(original)
    def guarded(self, *args, **kwargs):
        path = kwargs.get("model_name_or_path", args[0] if args else None)
        if path is not None and is_prepared(path):
            with _said_last():
                raise GdsError(
                    f"{path} was prepared by vllm-gds (it has {MANIFEST_NAME}); its shards can only be "
                    "loaded by the vllm-gds loader: add --load-format gds"
                )
        return original(self, *args, **kwargs)

    guarded._vllm_gds_guard = True
    DefaultModelLoader._prepare_weights = guarded


def register_loaders() -> None:
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    from vllm_gds.prepare.capture_loader import CaptureModelLoader
    from vllm_gds.prepare.capture import CAPTURE_FORMAT

    if LOAD_FORMAT not in _LOAD_FORMAT_TO_MODEL_LOADER:
        register_model_loader(LOAD_FORMAT)(GdsModelLoader)
    if CAPTURE_FORMAT not in _LOAD_FORMAT_TO_MODEL_LOADER:
        register_model_loader(CAPTURE_FORMAT)(CaptureModelLoader)
    _refuse_prepared_directories()
