"""KV cache speed (issue 5): decode attention over the quantized cache against BF16, FP8 and vLLM's
TurboQuant, the store kernel's bandwidth, and KV bytes per token. One run, same inputs, one GPU.

The GPU machine has no vLLM and cannot download. vLLM's plain Triton kernels are extracted here
from the 0.33 wheel into an ignored folder and carried along; small stubs (written at run time, in
a temporary directory) stand in for the rest of the vllm package they import:

    python benchmarks/kv_bench.py --extract /tmp/vllm033/vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl
    # on the GPU machine, with .carry carried:
    PYTHONPATH=. python3 benchmarks/kv_bench.py --out $OUT

Baselines: torch SDPA on a contiguous BF16 cache (the best of its cuDNN, flash and efficient
backends), vLLM's Triton unified attention on a paged BF16 and FP8 cache (the TRITON_ATTN backend's
kernel and launch parameters), vLLM's TurboQuant decode (turboquant_4bit_nc, turboquant_k3v4_nc).
Ours: the formats of vllm_gds.kvcache.formats, calibrated (so with the raw-key fallback on, the
served configuration when the calibration file exists). Times are triton.testing.do_bench
medians of one attention layer's decode. "BF16" in the ratios is the faster of SDPA and vLLM's
Triton kernel.

Why one file of ~900 lines: it is the one script the GPU machine runs (with .carry only), and the
dev sweeps import it whole as `kv_bench` for its inputs, timers and checks (kv_store_sweep,
kv_split_sweep, kv_decode_sweep, kv_diag). Its sections, in order: vLLM's stubs, inputs,
correctness against the reference, timings (baselines, ours, CUDA graphs, the store), main, the
table and the plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

from _source_tree import ROOT  # this tree's vllm_gds importable (benchmarks/_source_tree.py)
CARRY = ROOT / ".carry" / "vllm_kernels"
VLLM_FILES = [
    "vllm/v1/attention/ops/triton_unified_attention.py",
    "vllm/v1/attention/ops/triton_attention_helpers.py",
    "vllm/v1/attention/ops/triton_decode_attention.py",
    "vllm/v1/attention/ops/triton_turboquant_decode.py",
    "vllm/v1/attention/ops/triton_turboquant_store.py",
    "vllm/model_executor/layers/quantization/turboquant/config.py",
    "vllm/model_executor/layers/quantization/turboquant/centroids.py",
]

# What the carried files import from the rest of vllm.
STUBS = {
    "vllm/envs.py": "VLLM_BATCH_INVARIANT = False\n",
    "vllm/logger.py": "import logging\n\ndef init_logger(name):\n    return logging.getLogger(name)\n",
    "vllm/triton_utils/__init__.py": "import triton\nimport triton.language as tl\n",
    "vllm/platforms/__init__.py": '''import torch


class _CudaPlatform:
    def fp8_dtype(self):
        return torch.float8_e4m3fn

    def is_cuda(self):
        return True

    def is_cuda_alike(self):
        return True

    def is_rocm(self):
        return False

    def is_xpu(self):
        return False

    def get_device_capability(self, device_id=0):
        return torch.cuda.get_device_capability(device_id)

    def is_device_capability_family(self, capability, device_id=0):
        major, _ = torch.cuda.get_device_capability(device_id)
        return major == capability // 10

    def is_device_capability(self, capability, device_id=0):
        major, minor = torch.cuda.get_device_capability(device_id)
        return (major, minor) == tuple(capability)


current_platform = _CudaPlatform()
''',
    "vllm/v1/kv_cache_interface.py": '''from enum import IntEnum


class KVQuantMode(IntEnum):
    NONE = 0
    FP8_PER_TENSOR = 1
    INT8_PER_TOKEN_HEAD = 2
    FP8_PER_TOKEN_HEAD = 3
    INT4_PER_TOKEN_HEAD = 4
    NVFP4 = 5
''',
}

SHAPES = {  # name: (query heads, KV heads, head size)
    "Llama-3-8B": (32, 8, 128),
    "Llama-3-70B TP8": (8, 1, 128),
    "SmolLM2-135M": (9, 3, 64),
}
BATCHES = [(32, 4096), (64, 8192), (8, 32768), (1, 32768), (8, 131072)]
PAGE = 16
OURS = ("tq4", "tq3")
TURBOQUANT = ("turboquant_4bit_nc", "turboquant_k3v4_nc")


def extract(wheel: Path, dest: Path = CARRY) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in VLLM_FILES:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
    print(f"extracted {len(VLLM_FILES)} files into {dest}")


def install_vllm_stubs(carry: Path = CARRY) -> bool:
    """A throwaway vllm package: the carried kernel files plus stubs. False if nothing carried."""
    if not all((carry / f).is_file() for f in VLLM_FILES):
        return False
    root = Path(tempfile.mkdtemp(prefix="vllm_stub_"))
    for name in VLLM_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(carry / name, root / name)
    for name, text in STUBS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for d in [root / "vllm", *(p for p in (root / "vllm").rglob("*") if p.is_dir())]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
    sys.path.insert(0, str(root))
    return True


# ----------------------------------------------------------------------------------------------
# Inputs


def paged_layout(torch, batch, ctx, device):
    blocks_per_seq = ctx // PAGE
    num_blocks = batch * blocks_per_seq
    block_table = torch.randperm(num_blocks, device=device, dtype=torch.int64).to(torch.int32)
    return num_blocks, block_table.view(batch, blocks_per_seq).contiguous()


def ragged_pages(torch, seq_lens, device, page=PAGE):
    """Sequences of these lengths on pages drawn from a shuffled pool (3 spare pages): (pool
    pages, block table [seqs, most pages] int32, slot mapping [tokens], positions [tokens])."""
    blocks = [math.ceil(s / page) for s in seq_lens]
    perm = torch.randperm(sum(blocks) + 3, device=device).to(torch.int32)
    bt = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=device)
    slot_map, positions = [], []
    at = 0
    for i, (s, nblk) in enumerate(zip(seq_lens, blocks)):
        bt[i, :nblk] = perm[at : at + nblk]
        at += nblk
        pos = torch.arange(s, device=device)
        slot_map.append(bt[i, pos // page].long() * page + pos % page)
        positions.append(pos)
    return perm.numel(), bt, torch.cat(slot_map), torch.cat(positions)


def calibration(torch, hk, d, mean=True):
    """A calibration like a served model's: pre-RoPE key mean (Llama-3 RoPE frequencies), key
    scale, value mean, key weights. mean=False: the same without the key mean."""
    g = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, d, 2).float() / d)
    return dict(key_mean=torch.randn(hk, d, generator=g) if mean else None,
                key_scale=torch.rand(hk, d, generator=g) + 0.5,
                value_mean=torch.randn(hk, d, generator=g) * 0.1,
                key_weight=torch.rand(hk, d, generator=g),
                rope_inv_freq=inv_freq if mean else None)


def served_calibration(torch, name, hk, d, mean=True):
    """calibration() as a format serves it: the key mean on the format's share of RoPE pairs."""
    from vllm_gds.kvcache.calibration_file import top_pairs
    from vllm_gds.kvcache.formats import get_format

    cal = calibration(torch, hk, d, mean)
    if mean:
        cal["key_mean"] = top_pairs(cal["key_mean"], cal["key_scale"],
                                    get_format(name).key_mean_pairs, d // 2)
    return cal


def our_tables(torch, name, hk, d, device, mean=True):
    from vllm_gds.kvcache.formats import get_format
    from vllm_gds.kvcache.tables import LayerTables

    return LayerTables(get_format(name), d, 0, 0, device, torch.bfloat16, hk,
                       **served_calibration(torch, name, hk, d, mean))


def fill_ours(torch, tables, num_blocks, hk, d, device, chunk=1 << 16):
    from vllm_gds.kernels import tq_store

    cache = torch.empty(num_blocks, PAGE, hk, tables.layout.slot_bytes, dtype=torch.uint8,
                        device=device)
    total = num_blocks * PAGE
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        k = torch.randn(n, hk, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(n, hk, d, device=device, dtype=torch.bfloat16)
        slots = torch.arange(start, start + n, device=device, dtype=torch.int64)
        tq_store(k, v, cache, slots, tables, positions=slots)  # positions: any, for timing
    return cache


# ----------------------------------------------------------------------------------------------
# Correctness at full size against the torch reference


def reference_quantizer(torch, name, hk, d):
    from vllm_gds.kvcache.formats import get_format
    from vllm_gds.kvcache.quantizer import KVLayerQuantizer

    return KVLayerQuantizer(get_format(name), d, 0, 0, **served_calibration(torch, name, hk, d))


def slot_bytes_ref(torch, lq, k, v, positions):
    def nb(n):
        return n.contiguous().view(torch.int16).unsqueeze(-1).view(torch.uint8)

    ek, ev = lq.encode_keys(k, positions), lq.encode_values(v)
    return torch.cat([ek.codes, nb(ek.norms), ev.codes, nb(ev.norms)], -1)


def decode_slots(torch, lq, layout, slots, positions):
    from vllm_gds.kvcache.quantizer import Encoded

    kn, vn = layout.key.norm_offset, layout.value.norm_offset

    def norm(off):
        return slots[..., off : off + 2].contiguous().view(torch.float16).squeeze(-1)

    k = lq.decode_keys(Encoded(slots[..., :kn].contiguous(), norm(kn)), positions)
    v = lq.decode_values(Encoded(slots[..., kn + 2 : vn].contiguous(), norm(vn)))
    return k, v


def check_correctness(torch, name, hq, hk, d, device, log):
    """Store: bytes vs the reference encoder; attention (decode and chunked prefill): outputs vs
    exact attention over the reference's decoding of the same cache."""
    from vllm_gds.kernels import AttentionTuning, tq_attention, tq_store

    torch.manual_seed(1)
    tables = our_tables(torch, name, hk, d, device)
    lq = reference_quantizer(torch, name, hk, d)
    lay = tables.layout
    seq_lens = [4096, 1000, 37, 2500]
    T = sum(seq_lens)
    positions = torch.cat([torch.arange(s, device=device) for s in seq_lens])
    # Keys around RoPE_p(key mean), a tenth far off (the raw fallback takes some).
    k = torch.randn(T, hk, d, device=device) * (1 + 3 * (torch.rand(T, 1, 1, device=device) < 0.1))
    k = k + lq.key_mean_at(positions.cpu()).to(device)
    v = torch.randn(T, hk, d, device=device)
    k, v = k.bfloat16(), v.bfloat16()
    num_blocks, bt, slot_map, _ = ragged_pages(torch, seq_lens, device)
    cache = torch.full((num_blocks, PAGE, hk, lay.slot_bytes), 0xAB, dtype=torch.uint8, device=device)
    tq_store(k, v, cache, slot_map, tables, positions=positions)
    got = cache.view(-1, hk, lay.slot_bytes)[slot_map]
    ref = slot_bytes_ref(torch, lq, k.float(), v.float(), positions)
    byte_mismatch = (got != ref).float().mean().item()
    kd, vd = decode_slots(torch, lq, lay, got, positions)
    kr, vr = decode_slots(torch, lq, lay, ref, positions)
    vec_err = ((kd - kr).norm() / kr.norm()).item()

    results = {"store_byte_mismatch": byte_mismatch, "store_decoded_rel_diff": vec_err}
    scale = d ** -0.5
    starts = [0] + list(torch.tensor(seq_lens).cumsum(0).tolist())
    for mode, q_lens, fast in (("decode", [1, 1, 1, 1], True), ("prefill", [300, 1, 37, 64], True),
                               ("decode_plain", [1, 1, 1, 1], False)):
        qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32,
                           device=device)
        q = torch.randn(sum(q_lens), hq, d, device=device, dtype=torch.bfloat16)
        out = torch.full_like(q, float("nan"))
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        tq_attention(q, cache, bt, sl, qsl, tables, scale, out, max_query_len=max(q_lens),
                     tuning=None if fast else AttentionTuning(fast=False, hopper=False))
        refs = []
        for i, (s, ql) in enumerate(zip(seq_lens, q_lens)):
            kk = kd[starts[i] : starts[i] + s].double().repeat_interleave(hq // hk, 1)
            vv = vd[starts[i] : starts[i] + s].double().repeat_interleave(hq // hk, 1)
            qq = q[qsl[i] : qsl[i + 1]].double()
            sc = torch.einsum("qhd,khd->hqk", qq, kk) * scale
            qpos = s - ql + torch.arange(ql, device=device)
            mask = torch.arange(s, device=device)[None, :] <= qpos[:, None]
            sc = sc.masked_fill(~mask[None], float("-inf"))
            refs.append(torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv))
        ref_out = torch.cat(refs)
        err = ((out.double() - ref_out).norm() / ref_out.norm()).item()
        results[f"{mode}_rel_err"] = err
        results[f"{mode}_nan"] = bool(out.isnan().any())
    log(f"correctness {name} ({hq}q/{hk}kv/d{d}): " + ", ".join(
        f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
    return results


# ----------------------------------------------------------------------------------------------
# Timed decode


def warm_up(torch, device, seconds=2.0):
    """Keep the GPU busy for a while before the first timing, so that the first shape measured
    does not pay for the clocks ramping up (it measured up to 1.3x slow without this)."""
    import time

    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize(device)


def bench(fn, triton):
    fn()
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")


def time_sdpa(torch, triton, b, ctx, hq, hk, d, device):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(b, hq, 1, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(b, hk, ctx, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(b, hk, ctx, d, device=device, dtype=torch.bfloat16)
    best = (float("inf"), None)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                t = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), triton)
            best = min(best, (t, backend.name))
        except Exception:  # a backend that does not take this shape
            continue
    return best


def time_vllm_triton(torch, triton, b, ctx, hq, hk, d, device, fp8: bool):
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    num_blocks, bt = paged_layout(torch, b, ctx, device)
    k = torch.randn(num_blocks, PAGE, hk, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(num_blocks, PAGE, hk, d, device=device, dtype=torch.bfloat16)
    if fp8:
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    qsl = torch.arange(b + 1, device=device, dtype=torch.int32)
    seq_lens = torch.full((b,), ctx, device=device, dtype=torch.int32)
    # The TRITON_ATTN backend's launch parameters (triton_attn.py).
    seq_threshold_3d = 128 // hk
    segments = 16
    rows = min(seq_threshold_3d, b)
    hd_pad = triton.next_power_of_2(d)
    segm_out = torch.empty(rows, hq, segments, hd_pad, device=device, dtype=torch.float32)
    segm_max = torch.empty(rows, hq, segments, device=device, dtype=torch.float32)
    segm_sum = torch.empty(rows, hq, segments, device=device, dtype=torch.float32)
    descale = torch.ones(1, device=device, dtype=torch.float32).expand(b, hk)

    def run():
        unified_attention(
            q=q, k=k, v=v, out=out, cu_seqlens_q=qsl, max_seqlen_q=1, seqused_k=seq_lens,
            max_seqlen_k=ctx, softmax_scale=d ** -0.5, causal=True, window_size=(-1, -1),
            block_table=bt, softcap=0, q_descale=None, k_descale=descale, v_descale=descale,
            seq_threshold_3D=seq_threshold_3d, num_par_softmax_segments=segments,
            softmax_segm_output=segm_out, softmax_segm_max=segm_max,
            softmax_segm_expsum=segm_sum,
            kv_quant_mode=KVQuantMode.FP8_PER_TENSOR if fp8 else KVQuantMode.NONE,
        )

    return bench(run, triton)


def turboquant_slot_bytes(preset, d):
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig

    return TurboQuantConfig.from_cache_dtype(preset, d).slot_size_aligned


def time_turboquant(torch, triton, preset, b, ctx, hq, hk, d, device):
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.attention.ops.triton_turboquant_decode import triton_turboquant_decode_attention
    from vllm.v1.attention.ops.triton_turboquant_store import triton_turboquant_store

    cfg = TurboQuantConfig.from_cache_dtype(preset, d)
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    pi = (h / math.sqrt(d)).to(device)
    centroids = get_centroids(d, cfg.centroid_bits).to(device=device, dtype=torch.float32)
    c_sorted, _ = centroids.sort()
    midpoints = (c_sorted[:-1] + c_sorted[1:]) / 2
    num_blocks, bt = paged_layout(torch, b, ctx, device)
    cache = torch.zeros(num_blocks, PAGE, hk, cfg.slot_size_aligned, device=device,
                        dtype=torch.uint8)
    total = num_blocks * PAGE
    chunk = 1 << 16
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        kk = torch.randn(n, hk, d, device=device, dtype=torch.bfloat16)
        vv = torch.randn(n, hk, d, device=device, dtype=torch.bfloat16)
        slots = torch.arange(start, start + n, device=device, dtype=torch.int32)
        triton_turboquant_store(kk, vv, cache, slots, pi, midpoints, mse_bits=cfg.key_mse_bits,
                                key_packed_size=cfg.key_packed_size,
                                value_quant_bits=cfg.effective_value_quant_bits,
                                key_fp8=cfg.key_fp8)
    q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
    seq_lens = torch.full((b,), ctx, device=device, dtype=torch.int32)

    def run():
        triton_turboquant_decode_attention(
            query=q, kv_cache=cache, block_table=bt, seq_lens=seq_lens, Pi=pi,
            centroids=centroids, scale=d ** -0.5, mse_bits=cfg.key_mse_bits,
            key_packed_size=cfg.key_packed_size, value_quant_bits=cfg.effective_value_quant_bits,
            key_fp8=cfg.key_fp8, norm_correction=cfg.norm_correction, PiT=pi,
            max_num_kv_splits=32)

    return bench(run, triton)


def graph_time(torch, calls, runs: list | None = None):
    """ms per call of one CUDA graph that runs every call in `calls` once (each on its own copy
    of the inputs, >= 200 MB together, so no copy is still in the L2 when it comes round):
    device time alone, the median of 5 timings (runs: a list that gets all 5). do_bench times the
    host launch too where that takes longer than its 256 MB L2 memset before each call, which
    tq_attention's did (140-300 us, benchmarks/dev/kv_split_sweep.py)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls[:2]:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(4):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / (4 * len(calls)))
    if runs is not None:
        runs.extend(ts)
    return sorted(ts)[2]


def copies_for(nbytes, total=200_000_000, most=64):
    return max(1, min(most, -(-total // max(1, nbytes))))


def graph_sdpa(torch, b, ctx, hq, hk, d, device, backend_name):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name or "CUDNN_ATTENTION")
    q = torch.randn(b, hq, 1, d, device=device, dtype=torch.bfloat16)
    n = copies_for(2 * b * hk * ctx * d * 2)
    kvs = [(torch.randn(b, hk, ctx, d, device=device, dtype=torch.bfloat16),
            torch.randn(b, hk, ctx, d, device=device, dtype=torch.bfloat16)) for _ in range(n)]
    with sdpa_kernel(backend):
        return graph_time(torch, [lambda k=k, v=v: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True) for k, v in kvs])


def time_ours(torch, triton, name, b, ctx, hq, hk, d, device, tuning, mean=True, fast=True,
              graph=False):
    from vllm_gds.kernels import AttentionTuning, default_splits, tq_attention

    tables = our_tables(torch, name, hk, d, device, mean)
    num_blocks, bt = paged_layout(torch, b, ctx, device)
    cache = fill_ours(torch, tables, num_blocks, hk, d, device)
    q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    qsl = torch.arange(b + 1, device=device, dtype=torch.int32)
    seq_lens = torch.full((b,), ctx, device=device, dtype=torch.int32)
    # None: the launch tq_attention chooses itself (what vLLM serves); fast=False: the gather path
    # (and the portable kernel, not the Hopper one on sm_90, wherever a portable knob is set)
    launch = None if fast else AttentionTuning(fast=False, hopper=False)
    if tuning is not None:
        launch = AttentionTuning(
            splits=default_splits(b, hk, q.device) * tuning.get("split_factor", 1),
            block_n=tuning["block_n"], num_warps=tuning["num_warps"], fast=fast, hopper=False)

    def run():
        tq_attention(q, cache, bt, seq_lens, qsl, tables, d ** -0.5, out, max_query_len=1,
                     tuning=launch)

    if graph:
        caches = [cache] + [cache.clone() for _ in range(copies_for(cache.numel()) - 1)]
        t = graph_time(torch, [lambda c=c: tq_attention(
            q, c, bt, seq_lens, qsl, tables, d ** -0.5, out, max_query_len=1, tuning=launch)
            for c in caches])
        del caches
    else:
        t = bench(run, triton)
    del cache
    return t


def copy_bandwidth(torch, triton, device):
    x = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), triton)
    return 2 * x.numel() / (t * 1e-3) / 1e9


def store_timing_inputs(torch, name, device, tokens=32768, calibrated=True, mean=True):
    """What the store timings run, `tokens` new tokens of the Llama-3-8B shape: (tables, cache,
    k, v, slots, positions, bytes a call moves: bf16 K and V read, the slots written, the slot
    mapping read)."""
    from vllm_gds.kvcache.formats import get_format
    from vllm_gds.kvcache.tables import LayerTables

    hq, hk, d = SHAPES["Llama-3-8B"]
    if calibrated:
        tables = our_tables(torch, name, hk, d, device, mean)
    else:
        tables = LayerTables(get_format(name), d, 0, 0, device, torch.bfloat16, hk)
    cache = torch.empty(tokens // PAGE + 1, PAGE, hk, tables.layout.slot_bytes, device=device,
                        dtype=torch.uint8)
    k = torch.randn(tokens, hk, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(tokens, hk, d, device=device, dtype=torch.bfloat16)
    slots = torch.randperm(tokens, device=device)
    positions = torch.arange(tokens, device=device)
    moved = 2 * k.numel() * 2 + tokens * hk * tables.layout.slot_bytes + slots.numel() * 8
    return tables, cache, k, v, slots, positions, moved


def store_bandwidth(torch, triton, name, device, block_t=None, num_warps=None, calibrated=True,
                    tokens=32768, mean=True, launch=None):
    """(ms, GB/s moved) of tq_store at 32K new tokens of the Llama-3-8B shape. block_t and
    num_warps None (and launch None): the served call (no tuning), what vLLM runs; else a
    measured launch (StoreTuning). launch: a dict that served_launch fills with what the served
    call launched (kernel, tokens and heads a program, warps)."""
    from vllm_gds.kernels import StoreTuning, tq_store
    from vllm_gds.kernels.tq_store import served_launch

    tables, cache, k, v, slots, positions, moved = store_timing_inputs(
        torch, name, device, tokens, calibrated, mean)
    tuning = (None if block_t is None and num_warps is None
              else StoreTuning(block_t=block_t, num_warps=num_warps))
    t = bench(lambda: tq_store(k, v, cache, slots, tables, positions, tuning=tuning), triton)
    if launch is not None and tuning is None:
        launch.update(served_launch(tables, tokens, k.shape[1]) or {})
    return t, moved / (t * 1e-3) / 1e9


STORE_MODES = {"mean": (True, True), "no mean": (True, False), "uncalibrated": (False, False)}


def store_inputs(torch, name, mode, device, tokens, seed=2):
    """The store check's inputs at the Llama-3-8B shape: (tables, reference quantizer, k, v, slots,
    positions). Keys around the RoPE'd key mean (in the modes with one), a tenth far off; random
    positions < 2^17; every 97th slot -1."""
    from vllm_gds.kvcache.formats import get_format
    from vllm_gds.kvcache.quantizer import KVLayerQuantizer
    from vllm_gds.kvcache.tables import LayerTables

    calibrated, mean = STORE_MODES[mode]
    hq, hk, d = SHAPES["Llama-3-8B"]
    cal = calibration(torch, hk, d, mean) if calibrated else {}
    cal = {k: v for k, v in cal.items() if v is not None}
    tables = LayerTables(get_format(name), d, 0, 0, device, torch.bfloat16, hk, **cal)
    lq = KVLayerQuantizer(get_format(name), d, 0, 0, **cal)
    torch.manual_seed(seed)
    positions = torch.randint(0, 1 << 17, (tokens,), device=device)
    k = torch.randn(tokens, hk, d, device=device) * (
        1 + 3 * (torch.rand(tokens, 1, 1, device=device) < 0.1))
    if mean:
        k = k + lq.key_mean_at(positions.cpu()).to(device)
    k, v = k.bfloat16(), torch.randn(tokens, hk, d, device=device).bfloat16()
    slots = torch.randperm(tokens + 100, device=device)[:tokens]
    slots[::97] = -1
    return tables, lq, k, v, slots, positions


def poisoned_cache(torch, tables, tokens, device):
    """A paged cache with room for `tokens` slots and more, every byte 0xAB (to see stray writes)."""
    hk = SHAPES["Llama-3-8B"][1]
    return torch.full((tokens // PAGE + 8, PAGE, hk, tables.layout.slot_bytes), 0xAB,
                      dtype=torch.uint8, device=device)


def store_check(torch, name, mode, device, tokens=32768):
    """Store bytes vs the reference encoder at full size (Llama-3-8B shape): fraction differing."""
    from vllm_gds.kernels import tq_store

    hk = SHAPES["Llama-3-8B"][1]
    tables, lq, k, v, slots, positions = store_inputs(torch, name, mode, device, tokens)
    cache = poisoned_cache(torch, tables, tokens, device)
    tq_store(k, v, cache, slots, tables, positions=positions)
    ok = slots >= 0
    got = cache.view(-1, hk, tables.layout.slot_bytes)[slots[ok]]
    ref = slot_bytes_ref(torch, lq, k[ok].float(), v[ok].float(), positions[ok])
    untouched = torch.ones(cache.shape[0] * PAGE, dtype=torch.bool, device=device)
    untouched[slots[ok]] = False
    poison_ok = bool((cache.view(-1, hk, tables.layout.slot_bytes)[untouched] == 0xAB).all())
    return (got != ref).float().mean().item(), poison_ok


def store_only(args, torch, triton, device, info, log):
    """--store-only: the store kernel against the device copy, and its bytes, in one short run."""
    results = {"info": info, "store": [], "store_check": []}
    out = args.out / "kv_store_results.json"

    def save():
        out.write_text(json.dumps(results, indent=1))

    copy_gbs = copy_bandwidth(torch, triton, device)
    results["copy_gbs"] = copy_gbs
    log(f"device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    for name, mode in (("tq4", "mean"), ("tq4", "uncalibrated")):
        try:
            frac, poison_ok = store_check(torch, name, mode, device)
            results["store_check"].append(dict(format=name, mode=mode, byte_mismatch=frac,
                                               untouched_ok=poison_ok))
            log(f"store check {name} {mode}: {frac:.2e} of bytes differ from the reference, "
                f"other slots untouched: {poison_ok}")
        except Exception:
            log(f"store check {name} {mode} FAILED\n{traceback.format_exc()}")
        save()
    # block_t / warps None: tq_store's default launch (16 x 4 with the raw-key fallback, 64 x 8
    # without); the sweep over launches is benchmarks/kv_store_sweep.py
    for name, mode, block_t, warps in (("tq4", "mean", None, None), ("tq4", "mean", 64, 4),
                                       ("tq4", "no mean", None, None),
                                       ("tq4", "uncalibrated", None, None),
                                       ("tq3", "mean", None, None), ("tq3", "no mean", None, None),
                                       ("tq3", "uncalibrated", None, None)):
        calibrated, mean = STORE_MODES[mode]
        try:
            t, gbs = store_bandwidth(torch, triton, name, device, block_t, warps, calibrated,
                                     mean=mean)
            results["store"].append(dict(format=name, mode=mode, block_t=block_t, num_warps=warps,
                                         ms=t, gbs=gbs, of_copy=gbs / copy_gbs))
            log(f"store {name} {mode} 32K tokens block_t={block_t} warps={warps}: {t:.4f} ms, "
                f"{gbs:.0f} GB/s = {gbs / copy_gbs:.1%} of copy")
        except Exception:
            log(f"store {name} {mode} FAILED\n{traceback.format_exc()}")
        save()
    for name, mode in (("tq3", "mean"), ("tq4", "no mean")):
        try:
            frac, poison_ok = store_check(torch, name, mode, device)
            results["store_check"].append(dict(format=name, mode=mode, byte_mismatch=frac,
                                               untouched_ok=poison_ok))
            log(f"store check {name} {mode}: {frac:.2e} of bytes differ, untouched {poison_ok}")
        except Exception:
            log(f"store check {name} {mode} FAILED\n{traceback.format_exc()}")
        save()
    return 0


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extract", type=Path, help="copy vLLM's Triton files from this wheel and exit")
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--quick", action="store_true", help="one shape, two batches")
    ap.add_argument("--repeats", type=int, default=3,
                    help="time every row's methods this many times (ours: a fresh cache fill each)")
    ap.add_argument("--rows", default="",
                    help="only these rows, e.g. 'Llama-3-70B TP8:1x32768,Llama-3-8B:32x4096'")
    ap.add_argument("--no-tuning", action="store_true", help="skip the other-launches section")
    ap.add_argument("--no-correctness", action="store_true", help="skip the full-size checks")
    ap.add_argument("--no-store", action="store_true", help="skip the store timings")
    ap.add_argument("--store-only", action="store_true",
                    help="only the store kernel: copy bandwidth, store GB/s, store bytes")
    args = ap.parse_args(argv)
    if args.extract:
        extract(args.extract)
        return 0

    import torch
    import triton

    have_vllm = install_vllm_stubs()
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    props = torch.cuda.get_device_properties(device)
    info = {"card": props.name, "sms": props.multi_processor_count, "date": str(datetime.date.today()),
            "torch": torch.__version__, "triton": triton.__version__, "vllm_kernels": have_vllm}
    log(json.dumps(info))
    if args.store_only:
        return store_only(args, torch, triton, device, info, log)
    results = {"info": info, "correctness": {}, "tuning": [], "decode": [], "store": [], "bytes": {}}
    started = time.time()
    warm_up(torch, device)

    # 1. Correctness at full size.
    for name in ([] if args.no_correctness else OURS):
        for shape in ("Llama-3-8B", "SmolLM2-135M"):
            hq, hk, d = SHAPES[shape]
            try:
                results["correctness"][f"{name} {shape}"] = check_correctness(torch, name, hq, hk, d,
                                                                              device, log)
            except Exception:
                log(f"correctness {name} {shape} FAILED\n{traceback.format_exc()}")
    log(f"[{time.time() - started:.0f}s] correctness done")

    # 2. Ceilings and the store kernel.
    copy_gbs = copy_bandwidth(torch, triton, device)
    results["copy_gbs"] = copy_gbs
    log(f"device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    # The served store (no tuning: what vLLM runs, the Hopper store on sm_90), one row per format
    # and calibration; block_t / num_warps: the launch it chose (kv_targets.py reads the first
    # calibrated tq4 row). Launch variants: benchmarks/dev/kv_store_hopper_variants.py.
    for name in ([] if args.no_store else OURS):
        for calibrated in (True, False):
            try:
                launch = {}
                t, gbs = store_bandwidth(torch, triton, name, device, calibrated=calibrated,
                                         launch=launch)
                results["store"].append(dict(
                    format=name, block_t=launch.get("block_t"), num_warps=launch.get("num_warps"),
                    heads=launch.get("heads"), kernel=launch.get("kernel"), served=True,
                    calibrated=calibrated, ms=t, gbs=gbs, of_copy=gbs / copy_gbs))
                log(f"store {name} 32K tokens served ({launch.get('kernel')} "
                    f"{launch.get('block_t')} tokens x {launch.get('heads')} heads a program, "
                    f"{launch.get('num_warps')} warps) calibrated={calibrated}: "
                    f"{t:.3f} ms, {gbs:.0f} GB/s = {gbs / copy_gbs:.0%} of copy")
            except Exception:
                log(f"store {name} FAILED\n{traceback.format_exc()}")
    log(f"[{time.time() - started:.0f}s] store done")

    # 3. Other decode launches on the 8B shape, for the record; the table below times the
    #    launch tq_attention chooses (what the backend serves).
    hq, hk, d = SHAPES["Llama-3-8B"]
    candidates = [dict(block_n=bn, num_warps=nw, split_factor=sf)
                  for bn, nw, sf in ((32, 4, 1), (64, 4, 1), (64, 8, 1), (64, 4, 2), (128, 8, 1))]
    scores = []
    for tuning in ([] if args.no_tuning else candidates):
        total = 0.0
        for b, ctx in ((32, 4096), (8, 32768), (1, 32768)):
            try:
                t = time_ours(torch, triton, "tq4", b, ctx, hq, hk, d, device, tuning)
            except Exception:
                log(f"tuning {tuning} FAILED\n{traceback.format_exc()}")
                t = float("inf")
            results["tuning"].append(dict(tuning, batch=b, ctx=ctx, ms=t))
            log(f"tune tq4 {b}x{ctx} {tuning}: {t:.4f} ms")
            total += math.log(t)
        scores.append((total, tuning))
    results["best_tuning"] = min(scores, key=lambda s: s[0])[1] if scores else None
    log(f"[{time.time() - started:.0f}s] best of these launches over the three shapes: "
        f"{results['best_tuning']} (the table uses the served default)")

    # 4. Decode table.
    shapes = list(SHAPES.items())[:1] if args.quick else list(SHAPES.items())
    batches = BATCHES[:2] if args.quick else BATCHES
    for shape, (hq, hk, d) in shapes:
        for b, ctx in batches:
            if args.rows and f"{shape}:{b}x{ctx}" not in args.rows.split(","):
                continue
            row = {"shape": shape, "batch": b, "ctx": ctx}
            results["decode"].append(row)  # filled in place, saved after every method
            runs = {}

            def rep(key, fn):
                """fn() args.repeats times: row[key] the median, key_runs every time."""
                ts = []
                for _ in range(args.repeats):
                    try:
                        ts.append(fn())
                    except Exception:
                        log(f"{key} FAILED\n{traceback.format_exc()}")
                        return
                runs[key] = ts
                row[key] = sorted(ts)[len(ts) // 2]
                row[key + "_runs"] = ts
                (args.out / "kv_bench.json").write_text(json.dumps(results, indent=1))

            try:
                best = [time_sdpa(torch, triton, b, ctx, hq, hk, d, device)
                        for _ in range(args.repeats)]
                row["sdpa_bf16_runs"] = [t for t, _ in best]
                row["sdpa_bf16"], row["sdpa_backend"] = sorted(best)[len(best) // 2]
            except Exception:
                log(f"sdpa FAILED\n{traceback.format_exc()}")
            try:
                row["sdpa_bf16_graph"] = graph_sdpa(torch, b, ctx, hq, hk, d, device,
                                                    row.get("sdpa_backend"))
            except Exception:
                log(f"sdpa graph FAILED\n{traceback.format_exc()}")
            if have_vllm:
                for key, fp8 in (("vllm_triton_bf16", False), ("vllm_triton_fp8", True)):
                    rep(key, lambda: time_vllm_triton(torch, triton, b, ctx, hq, hk, d, device, fp8))
                for preset in TURBOQUANT:
                    rep(preset, lambda: time_turboquant(torch, triton, preset, b, ctx, hq, hk, d,
                                                        device))
            for name, key, mean, fast in (("tq4", "tq4", True, True), ("tq3", "tq3", True, True),
                                          ("tq5", "tq5", True, True),
                                          ("tq4", "tq4_nomean", False, True),
                                          ("tq4", "tq4_plain", True, False)):
                if key == "tq4_plain" and shape != "Llama-3-8B":
                    continue
                if key == "tq4_nomean" and os.environ.get("KV_BENCH_NOMEAN") == "0":
                    continue
                rep(key, lambda: time_ours(torch, triton, name, b, ctx, hq, hk, d, device, None,
                                           mean, fast))
                if key in ("tq4", "tq3", "tq5"):
                    try:
                        row[key + "_graph"] = time_ours(torch, triton, name, b, ctx, hq, hk, d,
                                                        device, None, mean, fast, graph=True)
                    except Exception:
                        log(f"{key} graph FAILED\n{traceback.format_exc()}")
            torch.cuda.empty_cache()
            log(f"[{time.time() - started:.0f}s] " + json.dumps(row))
            (args.out / "kv_bench.json").write_text(json.dumps(results, indent=1))  # so far

    # 5. Bytes per token per layer, and capacity against BF16.
    from vllm_gds.kvcache.formats import kv_bytes_per_token_per_head

    for shape, (hq, hk, d) in SHAPES.items():
        entry = {"bf16": hk * 2 * d * 2, "fp8": hk * 2 * d}
        for name in (*OURS, "tq5"):
            entry[name] = hk * kv_bytes_per_token_per_head(name, d)
        if have_vllm:
            for preset in TURBOQUANT:
                entry[preset] = hk * turboquant_slot_bytes(preset, d)
        results["bytes"][shape] = entry

    (args.out / "kv_bench.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "kv_bench.png")
    log("")
    for line in table(results):
        log(line)
    (args.out / "kv_bench.log").write_text("\n".join(lines) + "\n")
    return 0


METHODS = ["sdpa_bf16", "vllm_triton_bf16", "vllm_triton_fp8", *TURBOQUANT, *OURS, "tq4_nomean",
           "tq4_plain"]


def table(results) -> list[str]:
    info = results["info"]
    out = [f"KV cache decode, one layer, {info['card']}, {info['date']}, torch {info['torch']}, "
           f"triton {info['triton']} (ms, do_bench median; BF16 = min(SDPA, vLLM Triton BF16))",
           "| shape | batch x ctx | SDPA BF16 | vLLM BF16 | vLLM FP8 | TQ 4bit_nc | TQ k3v4_nc | tq4 "
           "| tq3 | tq4 no mean | tq4 gather path | tq4/BF16 | tq3/BF16 | TQ4nc/tq4 | FP8/tq4 |",
           "| --- | --- |" + " --- |" * 13]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    def r(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    for row in results["decode"]:
        bf16_times = [row[k] for k in ("sdpa_bf16", "vllm_triton_bf16") if row.get(k)]
        bf16 = min(bf16_times) if bf16_times else None
        g = row.get
        ctx = f"{row['ctx'] // 1024}K"
        out.append(f"| {row['shape']} | {row['batch']}x{ctx} | " + " | ".join(f(g(m)) for m in METHODS)
                   + f" | {r(g('tq4'), bf16)} | {r(g('tq3'), bf16)} | {r(g('turboquant_4bit_nc'), g('tq4'))}"
                   + f" | {r(g('vllm_triton_fp8'), g('tq4'))} |")
    out.append("")
    out.append("Repeats (median [min-max] of do_bench medians) and CUDA-graph device time (rotated "
               "caches, ms):")
    out.append("| shape | batch x ctx | SDPA BF16 | tq4 | tq3 | tq5 | SDPA graph | tq4 graph "
               "| tq3 graph | tq5 graph | tq4/BF16 graph |")
    out.append("| --- | --- |" + " --- |" * 9)

    def spread(row, k):
        runs = row.get(k + "_runs")
        if not runs:
            return f(row.get(k))
        return f"{sorted(runs)[len(runs) // 2]:.3f} [{min(runs):.3f}-{max(runs):.3f}]"

    for row in results["decode"]:
        g = row.get
        out.append(f"| {row['shape']} | {row['batch']}x{row['ctx'] // 1024}K | "
                   + " | ".join(spread(row, k) for k in ("sdpa_bf16", "tq4", "tq3", "tq5"))
                   + " | " + " | ".join(f(g(k)) for k in ("sdpa_bf16_graph", "tq4_graph",
                                                          "tq3_graph", "tq5_graph"))
                   + f" | {r(g('tq4_graph'), g('sdpa_bf16_graph'))} |")
    out.append("")
    out.append(f"Store, 32K new tokens, Llama-3-8B shape; copy bandwidth {results.get('copy_gbs', 0):.0f} GB/s:")
    for s in results["store"]:
        out.append(f"  {s['format']} {s.get('kernel') or ''} block_t={s['block_t']} warps={s['num_warps']} calibrated={s['calibrated']}: "
                   f"{s['ms']:.3f} ms, {s['gbs']:.0f} GB/s ({s['of_copy']:.0%} of copy)")
    out.append("")
    out.append("KV bytes per token per layer (capacity vs BF16):")
    for shape, entry in results["bytes"].items():
        out.append(f"  {shape}: " + ", ".join(f"{k} {v} ({entry['bf16'] / v:.2f}x)" for k, v in entry.items()))
    out.append("")
    for k, v in results["correctness"].items():
        out.append(f"correctness {k}: " + ", ".join(
            f"{a} {b:.2e}" if isinstance(b, float) else f"{a} {b}" for a, b in v.items()))
    return out


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = results["decode"]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        xs = [j + i * width for j, row in enumerate(rows) if row.get(m)]
        ys = [row[m] for row in rows if row.get(m)]
        ax.bar(xs, ys, width, label=m)
    ax.set_xticks([j + 0.4 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['shape']}\n{r['batch']}x{r['ctx'] // 1024}K" for r in rows], fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("ms per layer (log)")
    ax.set_title(f"Decode attention, {results['info']['card']}, {results['info']['date']}")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    raise SystemExit(main())
