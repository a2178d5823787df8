"""The Hopper store's host side (kernels/tq_store_hopper.py) on the CPU: its bucket tables give
torch.bucketize's codes and levels, its permuted rotation blocks and word packing (emulated here
in torch, step by step as the kernel computes: the fallback's choice, chunked rotations, the
bucket lookup, PERM's columns) give the reference's slot bytes, and the run-time choice of
the path. The Gluon kernel itself cannot run here (no interpreter for Gluon); it is compiled for
sm_90 by tests/test_kv_store_compile.py and checked on the GPU by
benchmarks/dev/kv_store_hopper_check.py."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import kv_bench as kb  # noqa: E402

from vllm_gds.kernels import tq_store_hopper as hop  # noqa: E402
from vllm_gds.kernels.fast_path import hopper_path  # noqa: E402
from vllm_gds.kernels.tq_store import _store_constants  # noqa: E402
from vllm_gds.kvcache.formats import FORMATS, get_format  # noqa: E402
from vllm_gds.kvcache.quantizer import KVLayerQuantizer  # noqa: E402
from vllm_gds.kvcache.tables import LayerTables  # noqa: E402


@pytest.mark.parametrize("name", ["tq4", "tq3", "tq5"])
def test_bucket_table_is_bucketize(name):
    t = LayerTables(FORMATS[name], 128, 0, 0, "cpu", torch.float32, 1)
    for idx, st in ((1, t.layout.key.b), (3, t.layout.value.b)):
        lv, th = t.codebooks[idx]
        n = 1 << st.bits
        shift, tab = hop.bucket_table(lv, th, st.bits)
        thr = th[: n - 1]
        if name == "tq4":  # as the kernel takes it: coordinates and levels scaled by 256
            s2, tab2 = hop.bucket_table(lv * 256.0, th * 256.0, st.bits)
            code2, lev2 = _lookup(thr * 256.0, s2, tab2)
            assert s2 == shift and torch.equal(code2, torch.bucketize(thr, thr.contiguous()))
            assert torch.equal(lev2, lv[code2] * 256.0)
        up_, dn_ = torch.tensor(9.0), torch.tensor(-9.0)
        y = torch.cat([torch.randn(50000) * 0.09, thr, -thr, torch.nextafter(thr, up_),
                       torch.nextafter(thr, dn_), -torch.nextafter(thr, up_),
                       torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
        code, lev = _lookup(y, shift, tab)
        ref = torch.bucketize(y, thr.contiguous(), right=False)
        assert torch.equal(code, ref) and torch.equal(lev, lv[ref])


@pytest.mark.parametrize("name", ["tq4", "tq3", "tq5"])
def test_uniform_bucket_table_is_bucketize(name):
    """SLUT's table (coordinates and levels scaled by 256, as the kernel takes them): the
    kernel's bucket (two FMAs, emulated exactly by _ubucket) and one compare give bucketize's
    codes and levels, so its bytes are the served table's."""
    t = LayerTables(FORMATS[name], 128, 0, 0, "cpu", torch.float32, 1)
    for idx, st in ((1, t.layout.key.b), (3, t.layout.value.b)):
        lv, th = t.codebooks[idx]
        n = 1 << st.bits
        lv, thr = lv * 256.0, th[: n - 1] * 256.0
        k, m, tab = hop.ubucket_table(lv, thr, st.bits)
        assert tab.shape[0] == (1 << m) + 1 <= 129
        up_, dn_ = torch.tensor(1e9), torch.tensor(-1e9)
        y = torch.cat([torch.randn(50000) * 23.0, thr, -thr, torch.nextafter(thr, up_),
                       torch.nextafter(thr, dn_), -torch.nextafter(thr, up_),
                       torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e30, -1e30,
                                     float("inf"), float("-inf"), 2.0 ** (k - 1),
                                     -2.0 ** (k - 1)])])
        e = tab[hop._ubucket(y, k, m)]
        up = y > e[:, 0].view(torch.float32)
        lev = torch.where(up, e[:, 2].view(torch.float32), e[:, 1].view(torch.float32))
        code = (e[:, 3] + up.int()).long()
        ref = torch.bucketize(y, thr.contiguous(), right=False)
        assert torch.equal(code, ref) and torch.equal(lev, lv[ref])


def _lookup(y, shift, tab):
    e = tab[(y.view(torch.int32).long() & 0xFFFFFFFF) >> shift]
    up = y > e[..., 0].view(torch.float32)
    lev = torch.where(up, e[..., 2].view(torch.float32), e[..., 1].view(torch.float32))
    return (e[..., 3] + up.int()).long(), lev


def _f16(x):
    return x.clamp(-65504, 65504).half().float()


def _norm(n, yc, cc, rule):  # of coordinates and levels scaled by 256, as the kernel's
    if rule == 0:
        return n
    if rule == 1:
        return n * 256.0 / cc.sqrt().clamp(min=256e-30)
    return n * yc / cc.clamp(min=65536e-30)


def _wht4(x):  # chunks on dim -2: [..., 4, C]
    a, b, c, d = x.unbind(-2)
    s01, d01, s23, d23 = a + b, a - b, c + d, c - d
    return torch.stack([s01 + s23, d01 + d23, s01 - s23, d01 - d23], -2)


def _split_dot(x, h):
    hi = x.half().float()
    lo = (x - hi).half().float()
    return lo @ h + hi @ h


def _emulate(tables, hc, c, k, v, positions):
    """The kernel's bytes for keys / values [T, H, D] (float32 math as the kernel's: rotated
    coordinates, levels and residuals scaled by 256)."""
    lay = tables.layout
    T, H, D = k.shape
    C = D // 4
    scale = D ** -0.5
    p = torch.tensor(hop.perm(C))
    hs = hc["hs"].float()
    hcp = hc["hcp"].float()
    kr = lay.key.norm_rule
    ew = tables.key_err_weights.float()
    out = torch.zeros(T, H, lay.slot_bytes, dtype=torch.uint8)

    def code(y, name, bits, rule, n, inv_n):  # y [T, 4, C] in PERM's columns, x 256
        cd, lev = _lookup(y, hc[name + "_shift"], hc[name + "_tab"])
        cc = (lev * lev).sum((-1, -2))
        yc = (y * lev).sum((-1, -2)) if rule == 2 else cc
        return cd, lev, _f16(_norm(n, yc, cc, rule))

    def words(cd, bits):  # [T, 4, C] codes at PERM's columns -> [T, D * bits / 8] bytes
        coords = torch.empty_like(cd)
        coords[..., p] = cd
        return kb_pack(coords.reshape(T, D), bits)

    for h in range(H):
        kh, vh = k[:, h].float(), v[:, h].float()
        rsq = kh.pow(2).sum(-1)
        if tables.has_mean:
            mu = kb_key_mean_at(tables, h, positions)
        else:
            mu = tables.key_mean[h].expand(T, D)
        isg = hc["isg"][h]  # inv_scale * signs
        x = (kh - mu) * isg
        nsq = x.pow(2).sum(-1)
        raw = ew[h, 0] * rsq < ew[h, 1] * nsq  # the fallback's rule: one coding a key
        x = torch.where(raw[:, None], kh * isg.sign(), x)
        n = torch.where(raw, rsq, nsq).sqrt()
        inv_n = 1.0 / n.clamp(min=1e-30)
        zx = _wht4(x.view(T, 4, C)) * (inv_n * (256.0 * scale))[:, None, None]
        y = _split_dot(zx, hcp)
        kcd, _unused, cnorm = code(y, "k", lay.key.b.bits, kr, n, inv_n)
        knorm = torch.where(raw, -cnorm.abs(), cnorm.abs())
        vm = tables.value_mean[h]
        vn = (vh - vm).pow(2).sum(-1).sqrt()
        inv_vn = 1.0 / vn.clamp(min=1e-30)
        z = _wht4(torch.einsum("tai,aij->taj", vh.view(T, 4, C), hs))
        z = z - hc["rvm"][h].view(4, C)
        vy = z * (inv_vn * (scale * 256.0))[:, None, None]
        vcd, vlev, _unused = code(vy, "v", lay.value.b.bits, lay.value.norm_rule, vn, inv_vn)
        vcc = (vlev * vlev).sum((-1, -2))
        vyc = (vy * vlev).sum((-1, -2)) if lay.value.norm_rule == 2 else vcc
        vnorm = _norm(vn, vyc, vcc, lay.value.norm_rule)
        kb_bytes = words(kcd, lay.key.b.bits)
        vb_bytes = words(vcd, lay.value.b.bits)
        o = lay.key.b.offset
        out[:, h, o:o + kb_bytes.shape[1]] = kb_bytes
        out[:, h, lay.key.norm_offset:lay.key.norm_offset + 2] = _nb(knorm)
        o = lay.value.b.offset
        out[:, h, o:o + vb_bytes.shape[1]] = vb_bytes
        out[:, h, lay.value.norm_offset:lay.value.norm_offset + 2] = _nb(vnorm)
    return out


def _nb(x):
    return x.clamp(-65504, 65504).half().view(torch.int16).unsqueeze(-1).view(torch.uint8).squeeze(-2)


def kb_pack(codes, bits):
    from vllm_gds.kvcache.packing import pack
    return pack(codes, bits)


def kb_key_mean_at(tables, h, positions):
    """RoPE_p(key_mean) of head h, as the reference computes it (the kernel's cos / sin are the
    same exact-angle floats: tq_decode_hopper._rope_cos_sin, checked by the portable kernel's
    tests)."""
    return _LQ[id(tables)].key_mean_at(positions)[:, h]


_LQ = {}  # id(tables) -> the reference quantizer of the same calibration


@pytest.mark.parametrize("name,mean", [("tq4", True), ("tq3", True), ("tq5", True),
                                       ("tq4", False)])
def test_emulated_kernel_bytes_are_the_reference(name, mean):
    hk, d, T = 2, 128, 96
    cal = {k: v for k, v in kb.served_calibration(torch, name, hk, d, mean).items()
           if v is not None}
    tables = LayerTables(get_format(name), d, 0, 0, "cpu", torch.bfloat16, hk, **cal)
    lq = KVLayerQuantizer(get_format(name), d, 0, 0, **cal)
    _LQ[id(tables)] = lq
    torch.manual_seed(3)
    positions = torch.randint(0, 1 << 17, (T,))
    k = torch.randn(T, hk, d) * (1 + 3 * (torch.rand(T, 1, 1) < 0.2))
    if mean:
        k = k + lq.key_mean_at(positions)
    else:  # channels at the calibration's scale: the fallback's rule then goes both ways
        k = k * lq.key_scale
    k, v = k.bfloat16(), torch.randn(T, hk, d).bfloat16()
    c = _store_constants(tables, 1, torch.bfloat16)
    hc = hop.constants(tables, torch.bfloat16, c)
    got = _emulate(tables, hc, c, k, v, positions)
    ref = kb.slot_bytes_ref(torch, lq, k.float(), v.float(), positions)
    raw = (got[..., tables.layout.key.norm_offset + 1] >> 7).bool()
    assert raw.any() and not raw.all()  # both codings chosen somewhere
    assert (got != ref).float().mean().item() < 2e-4  # threshold ties only


def test_store_path_choice():
    def store_path(capability, gluon_error, unsupported):  # as tq_store's plan decides
        return hopper_path(capability, gluon_error, unsupported, "store")

    assert store_path((9, 0), None, None) == (True, "Hopper fast path (Gluon, sm_90)")
    use, why = store_path((8, 0), None, None)
    assert not use and "sm_80" in why
    use, why = store_path((9, 0), "ImportError: x", None)
    assert not use and "no Gluon" in why
    use, why = store_path((9, 0), None, "head size 64 (128 only)")
    assert not use and "head size 64" in why
    assert not store_path(None, None, None)[0]


def test_perm_gives_each_lane_consecutive_coordinates():
    p = hop.perm(32)
    for q in range(4):
        cols = [8 * nt + 2 * q + e for nt in range(4) for e in range(2)]
        assert sorted(p[j] for j in cols) == list(range(8 * q, 8 * q + 8))


def test_launch_tables_follow_the_launch_shape():
    """The table arguments follow each launch's constexprs (tq_store keeps them per launch shape,
    tq_store_hopper.table_args): SLUT's shared-table copies where a program has several heads
    and its static tables fit the launch's shared memory (all heads a program: Triton's 100 KB
    with ASYNC, past 48 KB), bucket_table's L1 table at one head a program (not timed with SLUT;
    at 4 warps Triton's 44 KB + 8 KB would pass 48 KB anyway)."""
    name, hk, d = "tq4", 8, 128
    cal = {k: v for k, v in kb.served_calibration(torch, name, hk, d, True).items()
           if v is not None}
    tables = LayerTables(get_format(name), d, 0, 0, "cpu", torch.bfloat16, hk, **cal)
    c = _store_constants(tables, 1, torch.bfloat16)
    hc = hop.constants(tables, torch.bfloat16, c)
    key = torch.zeros(64, hk, d, dtype=torch.bfloat16)
    cache = torch.zeros(5, 16, hk, tables.layout.slot_bytes, dtype=torch.uint8)
    slots = torch.zeros(64, dtype=torch.int64)
    for warps, heads, slut in ((4, 8, True), (4, 4, True), (4, 1, False), (1, 1, False)):
        _, args, cx = hop.store_launch(key, key, cache, slots, tables, slots, c, hc, 4,
                                       num_warps=warps, heads=heads, slut=True)
        assert cx["SLUT"] == slut, (warps, heads)
        tabs = hop.table_args(tables, hc, cx)
        assert all(a is b for a, b in zip(args[11:], tabs)) and len(args) == 11 + len(tabs)
        assert tabs[-2] is hc["k_utab" if slut else "k_tab"]
        assert tabs[-1] is hc["v_utab" if slut else "v_tab"]
