"""Issue 4 screening: what lets ours beat KIVI-style int4 (+0.87%, 4.5 bits) at <= 4.5 bits?

Same machinery as benchmarks/kv_quality.py (decode mode, bf16 K/V first, KL vs the bf16 cache).
Usage: python benchmarks/dev/kv_quality_screen.py WINDOW SEED VARIANT [VARIANT ...]
(rows appended as JSON lines to $Q4_OUT, default .cache/kv_quality/screen.jsonl; run
benchmarks/kv_quality.py once first: it writes the calibration used here)
"""

import dataclasses
import json
import os
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _source_tree import ROOT  # this tree's vllm_gds and benchmarks/ importable

import kv_quality as kq
from vllm_gds.kvcache.calibration import sparse_mean
from vllm_gds.kvcache.calibration_file import load_calibration
from vllm_gds.kvcache.formats import FORMATS, KVFormat, VectorCode
from vllm_gds.kvcache.hf_attention import load_causal_lm
from vllm_gds.kvcache.quantizer import FP16_MAX, KVLayerQuantizer, VectorQuantizer
from vllm_gds.kvcache.rope import apply_rope

RANGES = []
FIXED = (-3.0, 6.0)  # log2 norm range of the fixed-range 8-bit norm, all layers (step 0.035 octave)
CAL = dict(key_calibration="mean_balanced", key_raw_fallback=True)


def fmt(kbits=4, kextra=0, vbits=4, vextra=0):
    return KVFormat("x", VectorCode(kbits, extra=kextra, norm="unit"),
                    VectorCode(vbits, extra=vextra, norm="unit"), **CAL)


# variant -> (format, raw rule, pre-RoPE keys, 8-bit log norms, counted bits at head 64)
def bits(f, norm_bits=16):
    d = 64
    return (f.key.code_bytes(d) + f.value.code_bytes(d)) * 8 / (2 * d) + 2 * norm_bits / (2 * d)


VARIANTS = {
    "kq-tq4": (fmt(), "none", False, False),
    "kivi4": (fmt(), "group64", False, False),  # bits column wrong for it: 4.5
    "tq4": (fmt(), "none", False, False),
    "tq4+self": (fmt(), "self", False, False),
    "tq4+group64": (fmt(), "group64", False, False),
    "tq4+win16": (fmt(), "win16", False, False),
    "K4+32V4": (fmt(kextra=32), "none", False, False),
    "K4V4+32": (fmt(vextra=32), "none", False, False),
    "K4+32V4+self": (fmt(kextra=32), "self", False, False),
    "tq4-log8": (fmt(), "none", False, True),
    "K4+48V4-log8": (fmt(kextra=48), "none", False, True),
    "tq4-prerope": (fmt(), "none", True, False),
    "K4+32V4-prerope": (fmt(kextra=32), "none", True, False),
    "K4+32V4-prerope+self": (fmt(kextra=32), "self", True, False),
    "K4+48V4-prerope-log8": (fmt(kextra=48), "none", True, True),
    "K4+48V4-prerope-log8+self": (fmt(kextra=48), "self", True, True),
    "K4+48V4-log8+self": (fmt(kextra=48), "self", False, True),
    "tq4-prerope+self": (fmt(), "self", True, False),
    "tq4-prerope+win16": (fmt(), "win16", True, False),
    "K4+48V4-prerope-log8+win16": (fmt(kextra=48), "win16", True, True),
    "K4+48V4-log8fixed": (fmt(kextra=48), "none", False, True),
    "K4+48V4-log8fixed+self": (fmt(kextra=48), "self", False, True),
    "K5V4": (fmt(kbits=5), "none", False, False),
    "K5V4-prerope": (fmt(kbits=5), "none", True, False),
}

# Cheaper calibration for the kernels (RESULTS.md, follow-up 2026-11-28): the served tq4
# (formats.FORMATS: key mean on half the pairs by |mu|^2 / s^2, raw fallback), without the
# fallback, and the key mean on only m pairs (calibration.sparse_mean, pairs by E[q^2]-weighted
# |mu|^2 unless the variant names another weight) with and without the fallback.
NOFB = dataclasses.replace(FORMATS["tq4"], key_raw_fallback=False)
VARIANTS["cal-tq4"] = (FORMATS["tq4"], "none", False, False)
VARIANTS["cal-tq4-nofb"] = (NOFB, "none", False, False)
VARIANTS["cal-all32"] = (fmt(), "none", False, False)  # the mean on every pair (the issue-4 table)
VARIANTS["cal-all32-nofb"] = (dataclasses.replace(fmt(), key_raw_fallback=False), "none", False, False)
SPARSE = {}  # variant -> (m, weight) for calibration.sparse_mean
for m in (2, 4, 8, 12, 16):
    for weight, tag in (("query", ""), ("scaled", "s"), ("none", "u")):
        for fb, suffix in ((True, ""), (False, "-nofb")):
            name = f"cal-m{m}{tag}{suffix}"
            VARIANTS[name] = (fmt() if fb else dataclasses.replace(fmt(), key_raw_fallback=False),
                              "none", False, False)
            SPARSE[name] = (m, weight)
# The raw fallback only for the keys at positions < P (the attention sink), calibrated beyond:
# what a kernel that runs the raw dots only in the first tile would serve.
FALLBACK_BELOW = {}
for p_ in (1, 4, 16):
    VARIANTS[f"cal-tq4-fb{p_}"] = (FORMATS["tq4"], "none", False, False)
    FALLBACK_BELOW[f"cal-tq4-fb{p_}"] = p_
    VARIANTS[f"cal-m8-fb{p_}"] = (fmt(), "none", False, False)
    SPARSE[f"cal-m8-fb{p_}"] = (8, "query")
    FALLBACK_BELOW[f"cal-m8-fb{p_}"] = p_


def log8_norms(fixed=None):
    """Patch VectorQuantizer to store log2(norm) in 8 bits over this tensor's range (an oracle
    per-(layer, call) range: a real format would calibrate it per layer), or over the fixed
    log2 range ``fixed`` (clamped)."""
    original = VectorQuantizer._stored_norm

    def stored(self, n, y, c):
        norm = original(self, n, y, c).float()
        mag = norm.abs().clamp_min(1e-8)
        lg = mag.log2()
        lo, hi = (lg.amin(), lg.amax()) if fixed is None else map(torch.tensor, fixed)
        lg = lg.clamp(lo, hi)
        if fixed is None:
            RANGES.append((float(lo), float(hi)))
        step = ((hi - lo) / 255).clamp_min(1e-12)
        q = torch.round((lg - lo) / step) * step + lo
        return (torch.sign(norm) * q.exp2()).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)

    VectorQuantizer._stored_norm = stored
    return original


def raw_mask(rule, t):
    pos = torch.arange(t)
    i, j = pos[:, None], pos[None, :]
    causal = j <= i
    if rule == "none":
        raw = torch.zeros(t, t, dtype=torch.bool)
    elif rule == "self":
        raw = j == i
    elif rule == "group64":
        raw = (j // 64) == (i // 64)
    elif rule.startswith("win"):
        raw = (i - j) < int(rule[3:])
    return causal & ~raw, causal & raw


def make_hook(variant, seed, calib, num_layers):
    if variant == "kq-tq4":  # the benchmark's own hook, as a cross-check
        return kq.our_hook(kq.FORMATS["tq4"], seed, calib, 64, num_layers)
    if variant == "kivi4":
        return lambda layer, q, k, v, sc: kq.kivi_attention(q, kq.bf16(k), kq.bf16(v), sc, 4, 64)
    f, rule, pre_rope, _ = VARIANTS[variant]
    if variant in SPARSE:
        calib = sparse_mean(calib, *SPARSE[variant])
    quantizers = []
    for layer in range(num_layers):
        key_mean, key_scale = calib.key_transform(layer, f.key_calibration, f.key_mean_pairs)
        quantizers.append(KVLayerQuantizer(
            f, 64, layer, seed, key_mean=key_mean, key_scale=key_scale, key_weight=calib.query_ms[layer],
            rope_inv_freq=calib.rope_inv_freq, rope_attention_scaling=calib.rope_attention_scaling))
    masks = {}

    def hook(layer, q, k, v, scaling):
        k, v = kq.bf16(k), kq.bf16(v)
        lq = quantizers[layer]
        t = k.shape[2]
        pos = torch.arange(t)
        kt = k[0].transpose(0, 1)  # [T, H, d]
        if pre_rope:
            inv, sc = calib.rope_inv_freq, calib.rope_attention_scaling
            kpre = apply_rope(kt, pos[:, None], inv, sc, inverse=True)
            khat = apply_rope(lq.roundtrip_keys(kpre, torch.zeros(t, dtype=torch.long)),
                              pos[:, None], inv, sc)
        elif variant in FALLBACK_BELOW:
            khat = lq.roundtrip_keys(kt, pos)
            lq.fallback = False
            try:
                calibrated = lq.roundtrip_keys(kt, pos)
            finally:
                lq.fallback = True
            khat = torch.where((pos < FALLBACK_BELOW[variant])[:, None, None], khat, calibrated)
        else:
            khat = lq.roundtrip_keys(kt, pos)
        kq_ = khat.transpose(0, 1)[None]
        vq_ = lq.roundtrip_values(v.transpose(1, 2)).transpose(1, 2)
        if rule == "none":
            return kq.causal_attention(q, kq_, vq_, scaling)
        if t not in masks:
            masks[t] = torch.cat(raw_mask(rule, t), 1)
        return F.scaled_dot_product_attention(
            q, torch.cat([kq_, k], 2), torch.cat([vq_, v], 2), attn_mask=masks[t], scale=scaling,
            enable_gqa=q.shape[1] != k.shape[1])

    return hook


def main():
    w, seeds, variants = int(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")], sys.argv[3:]
    from transformers import AutoTokenizer
    from vllm_gds.demo.smollm2 import smollm2

    model_dir = smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir)
    calib = load_calibration(ROOT / ".cache/kv_quality/calibration" / model_dir.name)
    ids = kq.read_tokens(tok)
    window = torch.tensor(ids[kq.EVAL_START + w * 2048: kq.EVAL_START + (w + 1) * 2048])
    base, ref = kq.window_scores(model, window, None, kq.kv_transform_hook(lambda l, k: k, lambda l, v: v))
    out = Path(os.environ.get("Q4_OUT", ROOT / ".cache" / "kv_quality" / "screen.jsonl"))
    for variant, seed in [(v, s) for v in variants for s in (seeds if v != "kivi4" else seeds[:1])]:
        t0 = time.perf_counter()
        f, rule, pre, log8 = VARIANTS[variant]
        original = log8_norms(FIXED if "fixed" in variant else None) if log8 else None
        try:
            r, _ = kq.window_scores(model, window, ref, make_hook(variant, seed, calib, 30))
        finally:
            if original:
                VectorQuantizer._stored_norm = original
        if RANGES:
            print("log2 norm ranges: min lo %.2f max hi %.2f" % (min(a for a, _ in RANGES), max(b for _, b in RANGES)))
            RANGES.clear()
        d = math.exp((r["nll"] - base["nll"]) / base["tokens"]) - 1
        row = {"variant": variant, "window": w, "seed": seed, "dppl_pct": 100 * d,
               "kl": r["kl"] / r["tokens"], "bits": bits(f, 8 if log8 else 16), "raw": rule,
               "secs": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
