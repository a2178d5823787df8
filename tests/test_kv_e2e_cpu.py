"""The quantized KV cache end to end in real vLLM (the CPU build): SmolLM2-135M with the backend
of vllm_gds/kvcache/backend.py over the CPU attention slot (tests/kv_cpu_backend.py) and its
Triton kernels interpreted, against the torch reference running the same model in float32.

The engine records every token's key and value and the slot bytes the store kernel wrote for them.
1. The store: the reference quantizer, configured as the backend configures its kernels
   (``_calibration_of_layer``), codes vLLM's keys and values into the same bytes.
2. The attention, in the model: one reference forward per sequence whose attention layers read
   that stored cache (decoded by the reference) for every position, the query's own included, as
   the kernels do in chunked prefill and decode alike (vLLM stores a step's keys and values before
   its attention). vLLM's log-probabilities of every prompt position and every generated step must
   equal the reference's up to float32 rounding.
The reference does not quantize its own keys here: a coordinate within float rounding of a
codebook threshold takes the neighbouring code, and that perturbation grows through every later
token and layer (measured: 0.7 in log-probability after a 43-token prompt), so "same model,
independently quantized" is no float-tolerance check. Point 1 checks the codes instead.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, TESTS

pytestmark = pytest.mark.engine

FORMAT = "tq4"
# Each engine step runs the store and the attention of 30 layers in Triton's interpreter (about
# 30 s a step here). Four tokens give every kind of step: prefill chunks beside decodes (steps
# 1-3), a decode of all four sequences (step 4), a decode of the long one alone (steps 5-6);
# six tokens only repeated the last two kinds (8 steps).
MAX_TOKENS = 4
# Longer than the engine's 32-token steps: prefilled in chunks that read earlier chunks back from
# the cache while the other sequences decode in the same batches.
LONG_PROMPT = ("Light is refracted when it passes from air into glass or water, and the rays of "
               "different colours are bent by different amounts, which is why a prism spreads "
               "white sunlight into a band of colours. Newton showed that")
ENGINE_PROMPTS = PROMPTS[:3] + [LONG_PROMPT]  # 5, 9, 6 and 43 tokens: lengths name sequences
# Largest |log-probability| difference, vLLM against the reference over the same cache. Both run
# float32 and differ in summation order only (oneDNN against torch matmuls, online against
# one-pass softmax) through 30 layers: measured about 1e-4 (printed). A wrong slot, code or norm
# moves log-probabilities by 1e-2 or more.
LOGPROB_TOL = 2e-3
# Vectors the store may legitimately code differently from the reference: one rotated coordinate
# within float rounding of a codebook threshold takes the neighbouring code (as in
# tests/test_kv_kernels.py). Measured here: none of about 15,000 (one with the key mean applied).
MAX_TIES = 1e-3


@pytest.fixture(scope="module")
def calibrated_smollm2(smollm2_model, tmp_path_factory) -> Path:
    """SmolLM2 with a KV calibration beside it (a short one: only its use is under test)."""
    from vllm_gds.kvcache.calibration import calibrate

    model = tmp_path_factory.mktemp("smollm2-calibrated")
    for f in smollm2_model.iterdir():
        (model / f.name).symlink_to(f)
    # No safetensors index here: vLLM's default loader reads every *.safetensors of the directory,
    # so this also checks that the calibration file is not taken for weights.
    calibrate(model, tokens=1024, window=1024, device="cpu")
    return model


@pytest.fixture(scope="module")
def engine_run(calibrated_smollm2, tmp_path_factory):
    """vLLM's outputs per prompt, each with its stored cache under "cache"."""
    dump = tmp_path_factory.mktemp("kv-e2e") / "cache.pt"
    spec = {"model": str(calibrated_smollm2), "format": FORMAT, "prompts": ENGINE_PROMPTS,
            "max_tokens": MAX_TOKENS, "dump": str(dump)}
    proc = subprocess.run([sys.executable, str(TESTS / "kv_engine_run.py"), json.dumps(spec)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    runs = json.loads(lines[-1][len("RESULT "):])
    for run, cache in zip(runs, torch.load(dump), strict=True):
        run["cache"] = cache
    return runs


@pytest.fixture(scope="module")
def reference(calibrated_smollm2):
    """The float32 model and one reference quantizer per layer, configured as the backend
    configures its kernels."""
    from vllm_gds.kvcache.backend import ROTATION_SEED, _calibration_of_layer
    from vllm_gds.kvcache.calibration_file import load_calibration
    from vllm_gds.kvcache.formats import get_format
    from vllm_gds.kvcache.hf_attention import load_causal_lm
    from vllm_gds.kvcache.quantizer import KVLayerQuantizer

    model = load_causal_lm(calibrated_smollm2)
    fmt, calib = get_format(FORMAT), load_calibration(calibrated_smollm2)
    quantizers = []
    for layer in range(model.config.num_hidden_layers):
        kw = _calibration_of_layer(calibrated_smollm2, layer, fmt)
        if kw.get("key_mean") is not None:
            kw.setdefault("rope_inv_freq", calib.rope_inv_freq)
            kw.setdefault("rope_attention_scaling", calib.rope_attention_scaling)
        quantizers.append(KVLayerQuantizer(fmt, model.config.head_dim, layer, ROTATION_SEED, **kw))
    return model, quantizers


def _split_slots(slots: torch.Tensor, lq):
    """Slot bytes [..., S] -> the stored key and value (formats.py: codes, then a float16 norm)."""
    from vllm_gds.kvcache.formats import NORM_BYTES
    from vllm_gds.kvcache.quantizer import Encoded

    out, start = [], 0
    for code in (lq.fmt.key, lq.fmt.value):
        end = start + code.code_bytes(lq.head_size)
        norms = slots[..., end:end + NORM_BYTES].contiguous().view(torch.float16)[..., 0]
        out.append(Encoded(slots[..., start:end], norms))
        start = end + NORM_BYTES
    return out


def _stored_cache_hook(cache, quantizers):
    """Attention over the decoded stored cache of one sequence (its own K and V unused)."""
    from vllm_gds.kvcache.hf_attention import causal_attention

    def hook(layer, query, key, value, scaling):
        lq = quantizers[layer]
        k_enc, v_enc = _split_slots(cache["slots"][layer], lq)
        positions = torch.arange(k_enc.norms.shape[0])
        k = lq.decode_keys(k_enc, positions).transpose(0, 1)[None]
        v = lq.decode_values(v_enc).transpose(0, 1)[None]
        return causal_attention(query, k, v, scaling)

    return hook


def _bf16_cache_hook(layer, query, key, value, scaling):
    from vllm_gds.kvcache.hf_attention import causal_attention

    return causal_attention(query, key.bfloat16().float(), value.bfloat16().float(), scaling)


def _log_softmax(model, hook, ids: list[int]) -> torch.Tensor:
    from vllm_gds.kvcache.hf_attention import use_kv_hook

    with torch.no_grad(), use_kv_hook(model, hook):
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1)


def _greedy(model, hook, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_log_softmax(model, hook, ids)[-1].argmax()))
    return ids[len(prompt):]


def _logprob_gap(run, ref: torch.Tensor) -> float:
    """Largest |vLLM - reference| over every log-probability vLLM reported."""
    p = len(run["prompt_ids"])
    # Prompt entry i is the distribution that predicted token i (computed at position i - 1);
    # generated step j, the one at position p - 1 + j.
    rows = [(i - 1, lp) for i, lp in enumerate(run["prompt_logprobs"]) if lp is not None]
    rows += [(p - 1 + j, lp) for j, lp in enumerate(run["logprobs"])]
    return max(abs(v - float(ref[pos, int(t)])) for pos, lp in rows for t, v in lp.items())


def _codes(enc, code, d: int) -> torch.Tensor:
    """Code indices [..., d] of packed vectors (formats.py: [0, extra) at bits+1, then bits)."""
    from vllm_gds.kvcache.packing import packed_bytes, unpack

    split = packed_bytes(code.extra, code.bits + 1)
    parts = [unpack(enc.codes[..., :split], code.bits + 1, code.extra)] if code.extra else []
    return torch.cat(parts + [unpack(enc.codes[..., split:], code.bits, d - code.extra)], -1)


def _store_differences(got, want, code, d: int) -> tuple[int, int]:
    """(vectors that differ only as a threshold tie can make them: one code off by one and a
    norm within 1%, vectors that differ otherwise)."""
    diff = (_codes(got, code, d) - _codes(want, code, d)).abs()
    norm_err = ((got.norms.float() - want.norms.float()).abs()
                / want.norms.float().abs().clamp_min(1e-6))
    differ = (diff > 0).any(-1) | (norm_err > 0)
    tie = ((diff > 0).sum(-1) <= 1) & (diff.amax(-1) <= 1) & (norm_err <= 1e-2)
    return int((differ & tie).sum()), int((differ & ~tie).sum())


def test_store_writes_the_reference_codes(engine_run, reference):
    _, quantizers = reference
    ties = wrong = vectors = 0
    for run in engine_run:
        cache = run["cache"]
        positions = torch.arange(cache["key"].shape[1])
        for layer, lq in enumerate(quantizers):
            got_k, got_v = _split_slots(cache["slots"][layer], lq)
            for got, want, code in (
                (got_k, lq.encode_keys(cache["key"][layer], positions), lq.fmt.key),
                (got_v, lq.encode_values(cache["value"][layer]), lq.fmt.value),
            ):
                t, w = _store_differences(got, want, code, lq.head_size)
                ties, wrong, vectors = ties + t, wrong + w, vectors + got.norms.numel()
    summary = (f"store: of {vectors} key and value vectors, {wrong} differ from the reference's "
               f"coding and {ties} by one threshold tie")
    print(summary)
    assert wrong == 0 and ties <= MAX_TIES * vectors, summary


def test_logprobs_match_the_reference_over_the_same_cache(engine_run, reference):
    model, quantizers = reference
    gaps, agree, report = [], 0, []
    for run in engine_run:
        ids = run["prompt_ids"] + run["tokens"][:-1]
        gap = _logprob_gap(run, _log_softmax(model, _stored_cache_hook(run["cache"], quantizers),
                                             ids))
        bf16 = _greedy(model, _bf16_cache_hook, run["prompt_ids"], MAX_TOKENS)
        same = sum(a == b for a, b in zip(run["tokens"], bf16))
        gaps.append(gap)
        agree += same
        report.append(f"  {len(run['prompt_ids'])}-token prompt: max |dlogprob| {gap:.1e}; "
                      f"greedy tokens as with a bf16 cache: {same}/{MAX_TOKENS}")
    summary = (f"{FORMAT} in vLLM (CPU) against the reference over the same cache: max |dlogprob| "
               f"{max(gaps):.1e} (tolerance {LOGPROB_TOL}); greedy agreement with a bf16 cache "
               f"{agree}/{MAX_TOKENS * len(engine_run)}\n" + "\n".join(report))
    print(summary)
    assert max(gaps) < LOGPROB_TOL, summary
