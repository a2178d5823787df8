"""`vllm-gds calibrate MODEL`: measure per-(layer, KV head) key and value statistics once.

Runs the model (transformers, full-sequence forwards) on real text, records keys and queries
(taken back to before RoPE) and values in every attention layer, and writes kv-calibration.stats/.json beside
the model (format: calibration_file.py). The quantized KV cache reads it at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time
from pathlib import Path

import torch

from .calibration_file import Calibration, save_calibration
from .hf_attention import causal_attention, load_causal_lm, use_kv_hook
from .rope import apply_rope
from .texts import CALIBRATION_TOKENS, OPTICKS_SOURCE, read_tokens


class _StatsRecorder:
    """Accumulates per-(layer, KV head, channel) moments in float64; keys and queries are taken
    back to before RoPE (the key mean is a pre-RoPE vector, re-rotated at each position)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float):
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.inv_freq, self.attention_scaling = inv_freq.float().cpu(), float(attention_scaling)

    def __call__(self, layer, query, key, value, scaling):
        b, hq, t, d = query.shape
        hk = key.shape[1]
        positions = torch.arange(t, device=key.device)
        unrope = lambda x: apply_rope(x, positions, self.inv_freq.to(x.device),
                                      self.attention_scaling, inverse=True)
        key_pre, query_pre = unrope(key), unrope(query)
        self._add(layer, query_pre, key_pre, value)
        return causal_attention(query, key, value, scaling)

    def _add(self, layer, query, key, value):
        b, hq, t, d = query.shape
        hk = key.shape[1]
        k = key.double().permute(1, 0, 2, 3).reshape(hk, -1, d)
        v = value.double().permute(1, 0, 2, 3).reshape(hk, -1, d)
        q = query.double().reshape(b, hk, hq // hk, t, d).permute(1, 0, 2, 3, 4).reshape(hk, -1, d)
        s = self.sums.setdefault(layer, {})
        for name, x in (("k", k), ("v", v)):
            s[name] = s.get(name, 0) + x.sum(1)
            s[name + "2"] = s.get(name + "2", 0) + (x * x).sum(1)
            s[name + "max"] = max(s.get(name + "max", 0.0), float(x.abs().max()))
        s["q2"] = s.get("q2", 0) + (q * q).sum(1)
        s["nk"] = s.get("nk", 0) + k.shape[1]
        s["nq"] = s.get("nq", 0) + q.shape[1]

    def stats(self) -> dict[str, torch.Tensor]:
        layers = sorted(self.sums)
        out = {name: [] for name in ("key_mean", "key_var", "query_ms", "value_mean", "value_var")}
        kmax, vmax = [], []
        for layer in layers:
            s = self.sums[layer]
            for x, mean_name, var_name in (("k", "key_mean", "key_var"), ("v", "value_mean", "value_var")):
                mean = s[x] / s["nk"]
                out[mean_name].append(mean)
                out[var_name].append((s[x + "2"] / s["nk"] - mean * mean).clamp_min(0))
            out["query_ms"].append(s["q2"] / s["nq"])
            kmax.append(s["kmax"])
            vmax.append(s["vmax"])
        result = {k: torch.stack(v).float() for k, v in out.items()}
        result["key_absmax"] = torch.tensor(kmax, dtype=torch.float32)
        result["value_absmax"] = torch.tensor(vmax, dtype=torch.float32)
        result["rope_inv_freq"] = self.inv_freq.clone()
        return result


PAIR_WEIGHTS = ("none", "query", "scaled")


def mean_pair_energy(calib: Calibration, weight: str = "query") -> torch.Tensor:
    """Energy [L, H, r/2] of the pre-RoPE key mean on each RoPE pair (i, i + r/2) (rope.py's
    half-split pairing): sum over the pair's two channels c of key_mean[c]^2 times
    ``weight``: "none" 1; "query" query_ms[c] (E[q_c^2], what the mean term adds to scores);
    "scaled" 1 / key_scale[c]^2 of the mean_balanced rule (the mean's energy in the quantizer's
    domain, calibration_file.top_pairs' criterion)."""
    half = calib.rope_inv_freq.shape[-1]
    mu = calib.key_mean[..., : 2 * half].double()
    if weight == "none":
        w = mu * mu
    elif weight == "query":
        w = mu * mu * calib.query_ms[..., : 2 * half].double()
    elif weight == "scaled":
        scale = torch.stack([calib._balanced(calib.key_mean[l], l, "mean_balanced")[1]
                             for l in range(calib.num_layers)])
        w = mu * mu / scale[..., : 2 * half].double() ** 2
    else:
        raise ValueError(f"unknown pair weight {weight!r}; one of {PAIR_WEIGHTS}")
    return w[..., :half] + w[..., half:]


def sparse_mean(calib: Calibration, m: int, weight: str = "query") -> Calibration:
    """A copy of ``calib`` whose key_mean keeps, per (layer, KV head), only the ``m`` RoPE pairs
    (i, i + r/2) of most mean_pair_energy(calib, weight) (ties: the lower pair index), both
    channels as they are; the other rotary channels are exactly zero, channels past the rotary
    dims are kept. ``calib`` is not changed. Served as is, the kernels' mean term runs over the
    m pairs only (the score keeps q . RoPE_p(sparse mean), still exact for attention)."""
    half = calib.rope_inv_freq.shape[-1]
    if not 0 <= m <= half:
        raise ValueError(f"m = {m} pairs: the model has {half} RoPE pairs")
    energy = mean_pair_energy(calib, weight)
    # stable descending sort: equal energies keep the lower index first
    order = energy.argsort(dim=-1, descending=True, stable=True)[..., :m]
    keep = torch.zeros_like(energy, dtype=torch.bool).scatter_(-1, order, True)
    mean = calib.key_mean
    on = torch.cat([keep, keep, torch.ones_like(mean[..., 2 * half:], dtype=torch.bool)], -1)
    return dataclasses.replace(
        calib, key_mean=torch.where(on, mean, torch.zeros_like(mean)),
        meta={**calib.meta, "key_mean_pairs": {"m": m, "weight": weight}})


def rope_of(model) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) of a transformers model's rotary embedding."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            return module.inv_freq.detach().float().cpu(), float(module.attention_scaling)
    raise ValueError(
        f"{type(model).__name__} has no rotary embedding that calibration understands "
        "(a module with inv_freq and attention_scaling)"
    )


def collect_stats(model, token_ids: list[int], window: int = 2048) -> dict[str, torch.Tensor]:
    """Statistics of ``model``'s K, Q, V over ``token_ids`` in windows of ``window`` tokens."""
    inv_freq, attention_scaling = rope_of(model)
    recorder = _StatsRecorder(inv_freq, attention_scaling)
    device = next(model.parameters()).device
    with torch.inference_mode(), use_kv_hook(model, recorder):
        for start in range(0, len(token_ids) - 1, window):
            chunk = token_ids[start : start + window]
            if len(chunk) < 2:
                break
            model(torch.tensor([chunk], device=device), use_cache=False, logits_to_keep=1)
    return recorder.stats()


def calibrate(
    model_dir,
    text: Path | None = None,
    tokens: int = 8192,
    window: int = 2048,
    device: str | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Write kv-calibration.stats/.json for ``model_dir`` (into ``out_dir``, default beside it)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a Hugging Face model directory")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = read_tokens(tokenizer, text)
    if text is None:
        ids = ids[CALIBRATION_TOKENS[0] : CALIBRATION_TOKENS[1]]
    ids = ids[:tokens]
    if len(ids) < 256:
        raise ValueError(f"the calibration text has only {len(ids)} tokens; give at least 256")
    model = load_causal_lm(model_dir, dtype=dtype, device=device)
    stats = collect_stats(model, ids, window)
    meta = {
        "rope_attention_scaling": rope_of(model)[1],
        "rope_style": "neox",
        "model": model_dir.name,
        "text": str(text) if text else OPTICKS_SOURCE,
        "tokens": len(ids),
        "window": window,
        "created": datetime.date.today().isoformat(),
        "tool": "vllm-gds calibrate",
        "num_layers": int(stats["key_mean"].shape[0]),
        "num_kv_heads": int(stats["key_mean"].shape[1]),
        "head_size": int(stats["key_mean"].shape[2]),
    }
    return save_calibration(out_dir or model_dir, stats, meta)


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="Hugging Face model directory")
    parser.add_argument("--text", type=Path, default=None,
                        help="UTF-8 text file to calibrate on (default: a public-domain English "
                             "book that apache-tvm-ffi ships)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens to read (default 8192)")
    parser.add_argument("--window", type=int, default=2048, help="tokens per forward (default 2048)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to write the files (default: the model directory)")


def run_calibrate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    path = calibrate(args.model, text=args.text, tokens=args.tokens, window=args.window,
                     device=args.device, out_dir=args.out_dir)
    print(f"wrote {path} and {path.with_name('kv-calibration.json').name} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-gds calibrate", description=__doc__.splitlines()[0])
    add_calibrate_arguments(parser)
    return run_calibrate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
