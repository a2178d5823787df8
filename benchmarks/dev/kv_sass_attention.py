"""sm_90 SASS of the tq4 decode loop (no GPU needed): python benchmarks/dev/kv_sass_attention.py"""

import _source_tree  # noqa: F401  this tree's vllm_gds importable
import torch
import triton.language as tl
from kv_sass import compile_sm90, report

from vllm_gds.kernels.tq_attention_kernel import _tq_attention_kernel
from vllm_gds.kernels.tq_streams import stream_constexprs
from vllm_gds.kvcache.tables import LayerTables
from vllm_gds.kvcache.calibration_file import top_pairs
from vllm_gds.kvcache.formats import FORMATS

TYPES = {"q_ptr": "*bf16", "out_ptr": "*bf16", "cache_ptr": "*u8", "block_table_ptr": "*i32",
         "seq_lens_ptr": "*i32", "query_start_ptr": "*i32", "levels_ptr": "*bf16",
         "signs_ptr": "*fp32", "key_mean_ptr": "*fp32", "key_scale_ptr": "*fp32",
         "value_mean_ptr": "*fp32", "mean_pairs_ptr": "*i32", "mean_theta_ptr": "*fp32", "mean_mu_ptr": "*fp32", "mean_table_ptr": "*fp16", "hka_ptr": "*bf16",
         "hkb_ptr": "*bf16", "hva_ptr": "*bf16", "hvb_ptr": "*bf16", "part_ptr": "*fp32",
         "qk_scale": "fp32"}


def decode(name="tq4", fast=True, mean=False, block_n=64, num_warps=4, g=4, fallback=True,
           num_stages=1, maxnreg=128, mean_step=True, paged=True, fold=True):
    """The decode launch tq_attention uses on the register path (num_stages 1, maxnreg 128);
    mean: a key mean on the format's share of RoPE pairs, as served."""
    d = 128
    kw = {}
    if mean:
        mu = top_pairs(torch.randn(1, d), None, FORMATS[name].key_mean_pairs, d // 2)
        kw = dict(key_mean=mu, rope_inv_freq=torch.ones(d // 2))
    t = LayerTables(FORMATS[name], d, 0, 0, "cpu", torch.bfloat16, 1, **kw)
    fast_k = fast and "k" in t.lut4_asm
    fast_v = fast and "v" in t.lut4_asm
    cx = dict(G=g, BLOCK_Q=1, BLOCK_M=max(16, 2 * g if fold and fallback else g), BLOCK_N=block_n, DECODE=True, SPLITS=4,
              MEAN_STEP=mean_step, PAGED=paged, FOLD=fold and fallback,
              DOT=tl.bfloat16, FALLBACK=fallback, FAST_K=fast_k, FAST_V=fast_v,
              K_ASM=t.lut4_asm.get("k", "") if fast_k else "",
              V_ASM=t.lut4_asm.get("v", "") if fast_v else "", MEAN=mean, ROT_HALF=t.rot_half,
              RH=t.rot_half_pad, MEAN_DOT=tl.float16, PAGE=16, STRIDE_TOK=8 * t.layout.slot_bytes,
              STRIDE_HEAD=t.layout.slot_bytes, **stream_constexprs(t.constexprs))
    divisible = ("q_ptr", "cache_ptr", "block_table_ptr", "out_ptr", "part_ptr", "stride_blk",
                 "stride_bt", "stride_qt", "stride_ot")  # as torch tensors specialize them
    k = compile_sm90(_tq_attention_kernel, TYPES, cx, num_warps=num_warps, num_stages=num_stages,
                     divisible=divisible, maxnreg=maxnreg)
    threads = 32 * num_warps
    codes = block_n * 2 * d  # key and value codes of one tile
    return report(f"{name} fast={fast} mean={mean} BLOCK_N={block_n} warps={num_warps}", k,
                  per=codes / threads)


if __name__ == "__main__":
    for args in ([False], [True], [True, True]):
        decode("tq4", *args)
