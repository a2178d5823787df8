"""Bad prepared directories: each fails with a message naming the file and the fix, before serving.

These run the loader's own checks in-process on real prepared files; two of the same
failures go through a full engine in test_engine_gds.py.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from torch import nn

from vllm_gds.errors import ChecksumError, LayoutMismatchError, ManifestError, ShardReadError
from vllm_gds.loader.parameters import install, plan_install
from vllm_gds.io.reader import ReadOptions
from vllm_gds.shards import dtypes
from vllm_gds.shards.manifest import MANIFEST_NAME, read_manifest
from vllm_gds.shards.validate import RunningSetup, check_compatible, check_rank_files

CPU = torch.device("cpu")


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _setup_of(manifest, **changes) -> RunningSetup:
    setup = RunningSetup(
        tensor_parallel_size=manifest.tensor_parallel_size,
        pipeline_parallel_size=manifest.pipeline_parallel_size,
        dtype=manifest.dtype, quantization=manifest.quantization,
        vllm_version=manifest.vllm_version, platform=dict(manifest.platform),
    )
    return dataclasses.replace(setup, **changes)


def _module_for(shards) -> nn.Module:
    """A module whose parameters have the rank's names, shapes and dtypes (what vLLM would build)."""
    root = nn.Module()
    for shard in shards.files:
        for entry in shard.tensors:
            *path, leaf = entry.name.split(".")
            module = root
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            data = torch.full(entry.shape, 7, dtype=dtypes.torch_dtype(entry.dtype))
            module.register_parameter(leaf, nn.Parameter(data, requires_grad=False))
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tensor_parallel_size": 4}, "the shards are for --tensor-parallel-size 1, this run uses 4"),
        ({"pipeline_parallel_size": 2}, "the shards are for --pipeline-parallel-size 1, this run uses 2"),
        ({"dtype": "bfloat16"}, "the shards hold dtype float32, this run uses --dtype bfloat16"),
        ({"quantization": "fp8"}, "the shards are quantized as none, this run uses quantization fp8"),
        ({"vllm_version": "0.33.1"}, "the shards were made by vLLM 0.32.0, this is vLLM 0.33.1"),
        ({"platform": {"device_type": "cuda", "compute_capability": "9.0"}},
         "the shards were made on platform cpu, this run is on cuda"),
    ],
)
def test_mismatched_setup_names_both_sides_and_the_fix(prepared_tiny, change, message):
    manifest = read_manifest(prepared_tiny)
    with pytest.raises(LayoutMismatchError) as err:
        check_compatible(manifest, _setup_of(manifest, **change), prepared_tiny)
    assert message in str(err.value)
    assert MANIFEST_NAME in str(err.value) and "vllm-gds prepare" in str(err.value)


def test_same_minor_version_is_accepted(prepared_tiny):
    manifest = read_manifest(prepared_tiny)
    patch = manifest.vllm_version.rsplit(".", 1)[0] + ".9"
    check_compatible(manifest, _setup_of(manifest, vllm_version=patch), prepared_tiny)


def test_truncated_shard_names_the_file(prepared_tiny, tmp_path):
    model = _copy(prepared_tiny, tmp_path)
    shards = read_manifest(model).ranks[0]
    path = model / shards.files[0].path
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(ShardReadError, match=f"{path}.*truncated"):
        check_rank_files(model, shards)


def test_malformed_header_names_the_file(prepared_tiny, tmp_path):
    model = _copy(prepared_tiny, tmp_path)
    shards = read_manifest(model).ranks[0]
    path = model / shards.files[0].path
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    with pytest.raises(ManifestError, match=f"{path} has a malformed safetensors header"):
        check_rank_files(model, shards)


def test_missing_rank_files_name_the_file(prepared_tiny_tp2, tmp_path):
    model = _copy(prepared_tiny_tp2, tmp_path)
    manifest = read_manifest(model)
    rank1 = manifest.rank(tp_rank=1, pp_rank=0)
    (model / rank1.files[0].path).unlink()
    check_rank_files(model, manifest.rank(tp_rank=0, pp_rank=0))  # rank 0 is intact
    with pytest.raises(ShardReadError, match=f"{rank1.files[0].path} of rank 1 is missing"):
        check_rank_files(model, rank1)


def test_flipped_byte_fails_the_checksum_naming_file_and_tensor(prepared_tiny, tmp_path):
    model = _copy(prepared_tiny, tmp_path)
    shards = read_manifest(model).ranks[0]
    shard = shards.files[0]
    victim = max(shard.tensors, key=lambda e: e.nbytes)
    with open(model / shard.path, "r+b") as f:
        f.seek(victim.offset + victim.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    check_rank_files(model, shards)  # sizes and headers cannot see it
    with pytest.raises(ChecksumError, match=f"tensor {victim.name} at byte {victim.offset} of {model / shard.path}"):
        install(_module_for(shards), model, shards, CPU, ReadOptions(), verify=True)


def test_intact_shards_install_every_byte(prepared_tiny):
    shards = read_manifest(prepared_tiny).ranks[0]
    module = _module_for(shards)
    stats, _, count = install(module, prepared_tiny, shards, CPU, ReadOptions(), verify=True)
    assert count == sum(len(f.tensors) for f in shards.files)
    assert stats.nbytes == shards.nbytes
    from safetensors.torch import load_file

    original = load_file(prepared_tiny / shards.files[0].path)
    params = dict(module.named_parameters())
    for name, tensor in original.items():
        if name in params:
            assert torch.equal(params[name], tensor)


def test_model_with_other_parameters_is_refused_before_reading(prepared_tiny):
    shards = read_manifest(prepared_tiny).ranks[0]
    module = _module_for(shards)
    module.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(ManifestError, match="the model has parameters the shards lack: extra.bias, extra.weight"):
        plan_install(module, prepared_tiny, shards)
    assert all((p == 7).all() for n, p in module.named_parameters() if not n.startswith("extra"))


def test_shape_mismatch_is_refused(prepared_tiny):
    shards = read_manifest(prepared_tiny).ranks[0]
    module = _module_for(shards)
    name = shards.files[0].tensors[0].name
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path))
    setattr(owner, leaf, nn.Parameter(torch.zeros(3, 3), requires_grad=False))
    with pytest.raises(ManifestError, match=f"tensor {name} is float32.*expects float32\\[3, 3\\]"):
        plan_install(module, prepared_tiny, shards)


def _manifest_made_by(version: str):
    from vllm_gds.shards.manifest import ALIGNMENT, BEFORE_POST_PROCESSING, Manifest

    return Manifest(tensor_parallel_size=2, pipeline_parallel_size=1, dtype="bfloat16",
                    quantization=None, vllm_version=version,
                    platform={"device_type": "cuda", "compute_capability": "9.0"},
                    capture_point=BEFORE_POST_PROCESSING, checksum_algorithm="wsum32",
                    alignment=ALIGNMENT, ranks=())


@pytest.mark.parametrize("made, serving", [("0.33.0", "0.34.0"), ("0.34.1", "0.33.2")])
def test_shards_are_not_carried_between_033_and_034(tmp_path, made, serving):
    """0.34 changed the weight loaders and model classes the shards were captured from, so a
    manifest cannot prove the parameters the same: refused, naming both versions and the one
    command that prepares the model again under the running vLLM."""
    manifest = _manifest_made_by(made)
    running = RunningSetup(tensor_parallel_size=2, pipeline_parallel_size=1, dtype="bfloat16",
                           quantization=None, vllm_version=serving, platform=dict(manifest.platform))
    with pytest.raises(LayoutMismatchError) as err:
        check_compatible(manifest, running, tmp_path)
    message = str(err.value)
    assert f"the shards were made by vLLM {made}, this is vLLM {serving}" in message
    assert "changed the weight loaders" in message
    assert ("prepare again with `vllm-gds prepare SOURCE OUT --tensor-parallel-size 2 "
            f"--pipeline-parallel-size 1 --dtype bfloat16` under vLLM {serving}") in message
    # Within one minor version (0.34.0 and 0.34.3, say) the same shards load.
    check_compatible(manifest, dataclasses.replace(running, vllm_version=made[:-1] + "3"), tmp_path)
