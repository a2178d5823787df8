"""The internal load format that `vllm-gds prepare` runs vLLM with.

Each rank builds the model and loads the source checkpoint with vLLM's default
loader, so vLLM's own weight loaders shard, fuse and cast every tensor. Then,
before post-processing (which the CPU platform does destructively), the rank
writes its parameters as aligned shard files and a small JSON record, and stops
the engine: serving is not the point of this run.
"""

import dataclasses
import json
from pathlib import Path

from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.utils.torch_utils import set_default_torch_dtype

from vllm_gds import _vllm_compat
from vllm_gds.prepare.capture import record_name
from vllm_gds.shards.writer import DEFAULT_MAX_FILE_BYTES, write_rank

class CaptureComplete(RuntimeError):
    """Raised by every rank once its shards are written; ends the capture engine on purpose."""


class CaptureModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        self.capture_dir = Path(extra.pop("capture_dir"))
        self.max_file_bytes = int(extra.pop("max_file_bytes", DEFAULT_MAX_FILE_BYTES))
        self.default_loader = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        )

    def download_model(self, model_config: ModelConfig) -> None:
        self.default_loader.download_model(model_config)

    def load_weights(self, model, model_config: ModelConfig) -> None:
        self.default_loader.load_weights(model, model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""):
        device = _vllm_compat.target_device(vllm_config)
        with set_default_torch_dtype(model_config.dtype), device:
            model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        self.default_loader.load_weights(model, model_config)
        tp_rank, pp_rank = _vllm_compat.parallel_ranks()
        shards = write_rank(
            self.capture_dir,
            list(model.named_parameters()),
            tp_rank=tp_rank,
            pp_rank=pp_rank,
            tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
            max_file_bytes=self.max_file_bytes,
        )
        record = {
            "rank": dataclasses.asdict(shards),
            "setup": dataclasses.asdict(_vllm_compat.running_setup(vllm_config, model_config)),
            "tie_word_embeddings": bool(
                getattr(model_config.hf_text_config, "tie_word_embeddings", False)
            ),
        }
        (self.capture_dir / record_name(shards.rank)).write_text(json.dumps(record))
        raise CaptureComplete(
            f"vllm-gds prepare: rank {shards.rank} captured its parameters; "
            "the capture engine stops here on purpose"
        )
