"""One correctness case of kv_bench per process (a fault cannot spoil the next):
python benchmarks/dev/kv_diag.py NAME SHAPE MODE FAST MEAN"""
import sys

import _source_tree  # noqa: F401  this tree's vllm_gds and benchmarks/ importable
import torch

import kv_bench as kb


def main(name, shape, mode, fast, mean):
    from vllm_gds.kernels import AttentionTuning, tq_attention, tq_store

    hq, hk, d = kb.SHAPES[shape]
    dev = torch.device("cuda")
    torch.manual_seed(1)
    tables = kb.our_tables(torch, name, hk, d, dev, mean == "1")
    seq_lens = [4096, 1000, 37, 2500]
    q_lens = [1, 1, 1, 1] if mode == "decode" else [300, 1, 37, 64]
    T = sum(seq_lens)
    pos = torch.cat([torch.arange(s, device=dev) for s in seq_lens])
    k = torch.randn(T, hk, d, device=dev).bfloat16()
    v = torch.randn(T, hk, d, device=dev).bfloat16()
    nblk = [-(-s // kb.PAGE) for s in seq_lens]
    bt = torch.zeros(4, max(nblk), dtype=torch.int32, device=dev)
    perm = torch.randperm(sum(nblk), device=dev).to(torch.int32)
    at, slot_map = 0, []
    for i, s in enumerate(seq_lens):
        bt[i, : nblk[i]] = perm[at : at + nblk[i]]
        at += nblk[i]
        p = torch.arange(s, device=dev)
        slot_map.append(bt[i, p // kb.PAGE].long() * kb.PAGE + p % kb.PAGE)
    slot_map = torch.cat(slot_map)
    cache = torch.zeros(sum(nblk), kb.PAGE, hk, tables.layout.slot_bytes, dtype=torch.uint8,
                        device=dev)
    tq_store(k, v, cache, slot_map, tables, positions=pos)
    torch.cuda.synchronize()
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), hq, d, device=dev, dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    tq_attention(q, cache, bt, sl, qsl, tables, d**-0.5, out, max_query_len=max(q_lens),
                 tuning=None if fast == "1" else AttentionTuning(fast=False))
    torch.cuda.synchronize()
    bad = out.isnan().any(-1)
    if fast == "1" and mode == "decode":  # against the plain path
        ref = torch.full_like(q, float("nan"))
        tq_attention(q, cache, bt, sl, qsl, tables, d**-0.5, ref, max_query_len=1,
                     tuning=AttentionTuning(fast=False))
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"fast vs plain rel diff {err:.2e}")
        if not err < 2e-2:
            raise SystemExit(1)
    print(f"{name} {shape} {mode} fast={fast} mean={mean}: nan rows {int(bad.any(-1).sum())} of "
          f"{out.shape[0]}, first {bad.any(-1).nonzero()[:3].flatten().tolist()}")


if __name__ == "__main__":
    main(*sys.argv[1:])
