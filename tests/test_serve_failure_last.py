"""A bad shard stops `vllm serve`, and the message that names the file and the fix is what the
output ends with, not some 120 lines above vLLM's tracebacks (a real server, the CPU build)."""

import shutil

import pytest

from api_server import run_to_exit
from vllm_gds.shards.manifest import read_manifest

pytestmark = pytest.mark.engine


def test_truncated_shard_is_the_last_thing_the_server_prints(prepared_tiny, tmp_path):
    model = tmp_path / prepared_tiny.name
    shutil.copytree(prepared_tiny, model)
    shard = read_manifest(model).ranks[0].files[0]
    path = model / shard.path
    with open(path, "r+b") as f:
        f.truncate(shard.size - 1000)
    message = (f"shard file {path} is {shard.size - 1000} bytes, the manifest says {shard.size}: it is "
               "truncated or was modified; copy it again or prepare it again")

    returncode, output = run_to_exit(model, tmp_path / "serve.log")

    assert returncode != 0
    lines = output.rstrip().splitlines()
    # vLLM's own last word is still there, above ours.
    (vllm_last,) = [i for i, line in enumerate(lines) if "Engine core initialization failed" in line]
    ends = "\n".join(lines[-3:])
    assert f"vllm-gds: rank 0 could not load the model: {message}" in ends, "\n".join(lines[-40:])
    assert max(i for i, line in enumerate(lines) if message in line) > vllm_last
    # In the worker, the loader's own logger said it at ERROR level before raising.
    assert any("ERROR" in line and f"vllm-gds: rank 0: {message}" in line for line in lines[:vllm_last])
