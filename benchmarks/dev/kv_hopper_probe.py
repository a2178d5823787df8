"""The Hopper decode's register tricks one at a time (GPU; run by kv_hopper_check.py first): where
the full kernel disagrees with the reference, these say which part does.

A one-program Gluon kernel runs kernels/tq_decode_hopper.py's own helpers on known inputs and
stores what they return: the key codes decoded into the QK MMA's A operand, the value codes into
the PV MMA's A operand (both through the lookup PTX, the index-bit permutations and the layout
conversions), and P transposed into the PV MMA's B operand (movmatrix or the compiler's
conversion). The host compares them with torch: levels of the codes in the slot order that
slot_coordinates gives, and P itself.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from vllm_gds.kernels import tq_decode_hopper as hop


@gluon.jit
def _store3(ptr, x, layout: gl.constexpr, S0: gl.constexpr, S1: gl.constexpr, S2: gl.constexpr):
    i = gl.arange(0, S0, gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    j = gl.arange(0, S1, gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    k = gl.arange(0, S2, gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    offs = i[:, None, None] * (S1 * S2) + j[None, :, None] * S2 + k[None, None, :]
    gl.store(ptr + offs, x)


@gluon.jit
def _load3(ptr, layout: gl.constexpr, S0: gl.constexpr, S1: gl.constexpr, S2: gl.constexpr):
    i = gl.arange(0, S0, gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    j = gl.arange(0, S1, gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    k = gl.arange(0, S2, gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    return gl.load(ptr + i[:, None, None] * (S1 * S2) + j[None, :, None] * S2 + k[None, None, :])


@gluon.jit
def _probe_kernel(kw_ptr, vw_ptr, p_ptr, ka_ptr, va_ptr, pb_ptr, lut0, lut1, lut2, lut3,
                  klut0, klut1, klut2, klut3, klut4, klut5, klut6, klut7,
                  NW: gl.constexpr, D: gl.constexpr, R: gl.constexpr, K_CODES: gl.constexpr,
                  V_CODES: gl.constexpr,
                  ASM: gl.constexpr, V_ASM: gl.constexpr, TRANS_ASM: gl.constexpr,
                  K_LOAD: gl.constexpr, V_LOAD: gl.constexpr, V_PAIR: gl.constexpr,
                  K_ORDER: gl.constexpr, V_ORDER: gl.constexpr, K_E: gl.constexpr,
                  V_E: gl.constexpr):
    L: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1],
                                                instr_shape=[1, 16, 8])
    LA: gl.constexpr = gl.DotOperandLayout(0, L, 2)
    LB: gl.constexpr = gl.DotOperandLayout(1, L, 2)
    lut = (lut0, lut1, lut2, lut3)
    if K_CODES == 5:
        klut = (klut0, klut1, klut2, klut3, klut4, klut5, klut6, klut7)
    else:
        klut = lut
    kw = _load3(kw_ptr, K_LOAD, NW, 16, K_E)
    vw = _load3(vw_ptr, V_LOAD, NW, 16, V_E)
    ka = hop._decode_k(kw, klut, ASM, LA, NW, D, K_ORDER, K_CODES)
    va = hop._decode_v(vw, lut, V_ASM, LA, V_PAIR, NW, D, V_ORDER, V_CODES)
    _store3(ka_ptr, ka, LA, NW, 16, D)
    _store3(va_ptr, va, LA, NW, D, 16)
    p = _load3(p_ptr, L, NW, 16, R).to(gl.bfloat16)
    _store3(pb_ptr, hop._transpose_p(p, LB, NW, R, TRANS_ASM), LB, NW, 16, R)


def probe(tables, rows: int = 8, codes: int = 4, trans_asm: bool = True, nw: int = 4) -> dict:
    """Max abs difference of each decoded operand (and of P through the transpose) against
    torch, for random codes: 0.0 everywhere when the tricks hold."""
    from vllm_gds.kvcache.codebook import codebook

    from vllm_gds.kvcache.packing import pack

    d = tables.layout.head_size
    dev = tables.signs.device
    kc, vc = hop.stream_codes(codes)
    bits = 3 if codes == 3 else 4
    codes_kv = torch.randint(0, 1 << bits, (2, nw, 16, d), device=dev)
    if codes == 3:  # the kernel's loads: three words of every four, the fourth repeating the third
        def triples(packed, dtype):
            w = packed.view(dtype)
            e = torch.arange(4 * w.shape[-1] // 3, device=dev)
            return w[..., 3 * (e // 4) + (e % 4).clamp(max=2)].contiguous()
        packed = pack(codes_kv, 3)
        kwords, vwords = triples(packed[0], torch.int32), triples(packed[1], torch.int16)
    elif codes == 5:  # 5-bit keys: five words of every eight, the rest repeating the fifth
        codes_kv[0] = torch.randint(0, 32, (nw, 16, d), device=dev)
        w = pack(codes_kv[0], 5).view(torch.int32)  # [NW, 16, D * 5 / 32]
        e = torch.arange(8 * w.shape[-1] // 5, device=dev)
        kwords = w[..., 5 * (e // 8) + (e % 8).clamp(max=4)].contiguous()
        vwords = pack(codes_kv[1], 4).view(torch.int16).contiguous()
    else:
        packed = pack(codes_kv, 4)  # bytes [2, NW, 16, D/2], low nibble first
        dtype = torch.int16 if codes == 4 else torch.int8
        kwords, vwords = packed[0].view(dtype).contiguous(), packed[1].view(dtype).contiguous()
    p = torch.randn(nw, 16, rows, device=dev)
    ka = torch.empty(nw, 16, d, device=dev, dtype=torch.bfloat16)
    va = torch.empty(nw, d, 16, device=dev, dtype=torch.bfloat16)
    pb = torch.empty(nw, 16, rows, device=dev, dtype=torch.bfloat16)
    cx = hop.kernel_constexprs(tables, 4 if rows == 8 else 8, 16, 0, 0, nw, False, trans_asm,
                               codes)
    klut = getattr(tables, "hopper_klut", None) or (0,) * 8
    _probe_kernel[(1,)](kwords, vwords, p, ka, va, pb, *tables.hopper_lut, *klut, NW=nw, D=d,
                        R=rows, K_CODES=kc, V_CODES=vc, ASM=cx["ASM"], V_ASM=cx["V_ASM"],
                        TRANS_ASM=trans_asm, K_LOAD=cx["K_LOAD"], V_LOAD=cx["V_LOAD"],
                        V_PAIR=cx["V_PAIR"], K_ORDER=cx["K_ORDER"], V_ORDER=cx["V_ORDER"],
                        K_E=cx["K_E"], V_E=cx["V_E"], num_warps=nw)
    levels = codebook(d, bits)[0].to(device=dev, dtype=torch.bfloat16)
    k_levels = codebook(d, kc)[0].to(device=dev, dtype=torch.bfloat16) if kc == 5 else levels
    kperm, vperm = (torch.tensor(p, device=dev) for p in hop.slot_maps(d, codes))
    want_k = k_levels[codes_kv[0][:, :, kperm]]  # [NW, 16, k-slot]
    want_v = levels[codes_kv[1][:, :, vperm]].transpose(1, 2)  # [NW, m-slot, 16]
    torch.cuda.synchronize()
    return {"keys": (ka.float() - want_k.float()).abs().max().item(),
            "values": (va.float() - want_v.float()).abs().max().item(),
            "p_transpose": (pb.float() - p.bfloat16().float()).abs().max().item()}
