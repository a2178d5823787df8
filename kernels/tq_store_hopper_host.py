"""The Hopper store's host side (kernels/tq_store_hopper.py is the kernel and its launch): the
tables it reads (bucket_table's and SLUT's code-search tables, the permuted rotation blocks,
constants), the launch's table arguments (table_args), where SLUT's shared tables fit
(_slut_fits), SLUT's PTX strings, and why a call is not the kernel's (why_unsupported)."""

from __future__ import annotations

import torch
from triton.experimental.gluon import language as gl


def perm(c: int) -> list[int]:
    """The rotated coordinate (within a chunk of c columns, c a multiple of 16) that accumulator
    column j holds: j = 8 nt + 2 q + e (n-tile nt, lane q of the quad, element e) holds
    coordinate 2 (c / 8) q + 2 nt + e, so lane q holds 2 c / 8 consecutive coordinates."""
    n = c // 8
    return [2 * n * ((j >> 1) & 3) + 2 * (j >> 3) + (j & 1) for j in range(c)]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def kperm(c: int) -> list[int]:
    """KV16's input order: the column of a chunk (c = 32) that A-operand column L holds. Lane q
    of a quad holds A columns 16 s + 8 h + 2 q + e (k-step s, half h, element e); they hold the
    8 consecutive input columns 8 q + 4 s + 2 h + e, so one 16-byte load a row fills them."""
    assert c == 32, "KV16 is laid out for chunks of 32 columns (head 128)"
    return [8 * ((j >> 1) & 3) + 4 * (j >> 4) + 2 * ((j >> 3) & 1) + (j & 1) for j in range(c)]


def kv16_layout(num_warps: int, c: int = 32):
    """KV16's load layout of a chunk [16 num_warps, c] in input order: 8 consecutive columns a
    thread (one 16-byte load), rows g and g + 8 of its warp's 16 (as the MMA's A operand)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0]],
        lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(num_warps.bit_length() - 1)], block_bases=[],
        shape=[16 * num_warps, c])


def bucket_table(levels: torch.Tensor, thresholds: torch.Tensor, bits: int, max_shift: int = 23,
                 min_shift: int = 16):
    """(shift, int32 [2^(32 - shift), 4]) of the code search, or None: the largest shift of the
    float bits of y for which no bucket (bits >> shift) holds two thresholds. Entry: (bits of the
    threshold inside the bucket, else +inf; the level of the code below it; the level above it;
    that code): code(y) = code + (y > threshold) = #{thresholds t < y} (torch.bucketize,
    right=False). levels [2^bits], thresholds [2^bits - 1] (ascending, float32)."""
    n = 1 << bits
    lv = levels[:n].double().cpu()
    th = (thresholds[: n - 1].float().cpu() + 0.0).contiguous()  # -0.0 -> +0.0
    tb = th.view(torch.int32).long() & 0xFFFFFFFF
    for shift in range(max_shift, min_shift - 1, -1):
        if len(set((tb >> shift).tolist())) == tb.numel():
            break
    else:
        return None
    nb = 1 << (32 - shift)
    b = torch.arange(nb, dtype=torch.int64)
    lo_bits = b << shift
    hi_bits = ((b + 1) << shift) - 1
    # the smallest float of each bucket: its first bits (positive), its last bits (negative)
    first = torch.where(lo_bits < (1 << 31), lo_bits, hi_bits)
    fmin = (first - ((first >= (1 << 31)).long() << 32)).to(torch.int32).view(torch.float32)
    below = torch.searchsorted(th.double(), fmin.double(), right=False)  # #{t < fmin}
    below = torch.where(torch.isnan(fmin), torch.zeros_like(below), below)
    thr = torch.full((nb,), float("inf"), dtype=torch.float32)
    inside = torch.zeros(nb, dtype=torch.bool)
    for i, t in enumerate((tb >> shift).tolist()):
        thr[t] = th[i]
        inside[t] = True
    lo = lv[below.clamp(max=n - 1)]
    hi = torch.where(inside, lv[(below + 1).clamp(max=n - 1)], lo)
    tab = torch.stack([thr.view(torch.int32), lo.float().view(torch.int32),
                       hi.float().view(torch.int32), below.to(torch.int32)], dim=1)
    return shift, tab.contiguous()


def _ubucket(t: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """SLUT's bucket of float32 y (as the kernel's two FMAs: fma.rn.sat(y, 2^-k, 0.5), then
    round-half-even of that times 2^m): monotone in y, 2^m + 1 buckets."""
    s = (t.float() * 2.0 ** -k + 0.5).clamp(0.0, 1.0)  # the product is exact: one rounding
    s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
    return torch.round(s * 2.0 ** m).long()  # exact product; round half to even


def ubucket_table(levels: torch.Tensor, thresholds: torch.Tensor, bits: int, max_m: int = 8):
    """(k, m, int32 [2^m + 1, 4]) of SLUT's code search, or None: the fewest buckets (_ubucket)
    that part the thresholds. Entry as bucket_table's: (the threshold inside the bucket, else
    +inf; the level of the code below it; the level above it; that code). A monotone bucket
    function makes code = code_lo + (y > threshold) = #{thresholds t < y}, bucketize's rule:
    thresholds in lower buckets are below y, in higher ones above."""
    n = 1 << bits
    lv = levels[:n].float().cpu()
    th = (thresholds[: n - 1].float().cpu() + 0.0).contiguous()
    top = float(th.abs().max())
    for m in range(3, max_m + 1):
        for k in range(-16, 32):
            if 2.0 ** (k - 1) < top:  # thresholds past the clamp collide
                continue
            b = _ubucket(th, k, m)
            if len(set(b.tolist())) == th.numel():
                break
        else:
            continue
        break
    else:
        return None
    nb = (1 << m) + 1
    thr = torch.full((nb,), float("inf"))
    below = torch.zeros(nb, dtype=torch.long)
    inside = torch.zeros(nb, dtype=torch.bool)
    for i, bi in enumerate(b.tolist()):
        thr[bi] = th[i]
        inside[bi] = True
        below[bi + 1:] += 1
    lo = lv[below.clamp(max=n - 1)]
    hi = torch.where(inside, lv[(below + 1).clamp(max=n - 1)], lo)
    tab = torch.stack([thr.view(torch.int32), lo.view(torch.int32), hi.view(torch.int32),
                       below.to(torch.int32)], dim=1)
    return k, m, tab.contiguous()


def slut_ptx(name: str, rows: int) -> tuple[str, str, str]:
    """SLUT's shared table `name` in PTX: its declaration (rows x 16 bytes), the store of one
    word ($1: byte offset, $2: the word; offsets past the table, the global copy's padding to a
    power of two, not stored), and the lookups' base: the shared address of this
    lane's replica (lane & 7: 16 bytes apart, so a quarter warp's 16-byte loads hit distinct
    banks). The bucket's float bits are 0x4A000000 + bucket (slut_asm), and 0x4A000000 x 128 is
    0 mod 2^32: the address is one shift-and-add."""
    return (f".shared .align 16 .b8 {name}[{rows * 16}];\n\tmov.u32 $0, 0;",
            f"{{ .reg .u32 a; .reg .pred p; setp.lt.u32 p, $1, {rows * 16}; mov.u32 a, {name}; "
            "add.u32 a, a, $1; @p st.shared.b32 [a], $2; mov.u32 $0, 0; }",
            f"{{ .reg .u32 l; mov.u32 l, %laneid; and.b32 l, l, 7; mov.u32 $0, {name}; "
            "mad.lo.u32 $0, l, 16, $0; add.u32 $0, $0, $1; }")


def kvptx(m: int, c: int) -> dict:
    """KVPTX's PTX: the keys' and values' staging buffers (8 chunk buffers of m rows x c 16-bit
    columns, 64 bytes a row at c = 32) declared in PTX, outside Triton's allocation, so that its
    barrier analysis puts no CTA barrier around them: each warp copies and reads only its own 16
    rows (a warp's barrier orders them). A row's 16-byte piece p is stored at piece
    p ^ ((row >> 1) & 3): a quarter warp's ldmatrix rows then hit distinct banks.
    DECL: the declaration. COPY: one thread's share of a head's copy into the buffers from
    `base` (K: 0, V: 4) on: its two rows' global addresses ($1, $2), their byte counts ($3, $4:
    16, or 0 for a row outside the mapping: zeros) and the shared offset of its first row's
    piece ($5); COPY_V also commits the group. WAIT: the group landed, the warp's copies
    visible to the warp. LDM[b]: chunk buffer b as an mma A operand (pack 8: one ldmatrix.x4 of
    a 16 x 16 block; $4 the lane's offset in the buffer, ldm_offset)."""
    row = 2 * c
    size = 8 * m * row
    name = "tq_store_kv"
    decl = f".shared .align 128 .b8 {name}[{size}];\n\tmov.u32 $0, 0;"

    def copy(base: int, commit: bool) -> str:
        ops = []
        for ch in range(4):
            off = (base + ch) * m * row
            for r, (g, n) in enumerate((("$1", "$3"), ("$2", "$4"))):
                ops.append(f"cp.async.cg.shared.global [s+{off + r * 8 * row}], [{g}+{ch * row}], "
                           f"16, {n};")
        tail = " cp.async.commit_group;" if commit else ""
        return ("{ .reg .u32 s; bar.warp.sync -1; mov.u32 s, " + name + "; add.u32 s, s, $5; "
                + " ".join(ops) + tail + " mov.u32 $0, 0; }")

    ldm = tuple("{ .reg .u32 a; mov.u32 a, " + name + "; add.u32 a, a, $4; "
                "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {$0, $1, $2, $3}, "
                f"[a+{b * m * row}]; }}" for b in range(8))
    return dict(DECL=decl, COPY_K=copy(0, False), COPY_V=copy(4, True),
                WAIT="{ cp.async.wait_group 0; bar.warp.sync -1; mov.u32 $0, 0; }", LDM=ldm)


def slut_asm(k: int, m: int) -> str:
    """SLUT's lookup PTX: $4 = y, $5 = the shared address of this lane's replica of the table
    (slut_ptx); outputs as _lookup's. The bucket (_ubucket) as the float bits of 2^21 +
    s 2^(m - 2) (floats 1/4 apart there: bits 0x4A000000 + round-half-even(s 2^m))."""
    def f(x):
        return "0f%08X" % torch.tensor([x], dtype=torch.float32).view(torch.int32).item()
    return ("{ .reg .f32 s; .reg .u32 a; fma.rn.sat.f32 s, $4, " + f(2.0 ** -k) + ", 0f3F000000; "
            "fma.rn.f32 s, s, " + f(2.0 ** (m - 2)) + ", 0f4A000000; mov.b32 a, s; "
            "mad.lo.u32 a, a, 128, $5; ld.shared.v4.b32 {$0, $1, $2, $3}, [a]; }")


def why_unsupported(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, tables,
                    plan_chunked: bool, exact16: bool, align: int) -> str | None:
    """None where this kernel serves the store; else why not (tq_store takes the portable one)."""
    if not key.is_cuda or torch.version.hip is not None:
        return "not a CUDA device"
    lay = tables.layout
    if not plan_chunked:
        return "not the chunked fallback path (uncalibrated, or extra-bit streams)"
    if lay.head_size != 128:
        return f"head size {lay.head_size} (128 only)"
    if not exact16:
        return "inputs not bfloat16/float16"
    if lay.key.b.bits not in (3, 4, 5) or lay.value.b.bits not in (3, 4, 5):
        return "code bits not 3, 4 or 5"
    if align < 2 or lay.key.norm_offset % 2 or lay.value.norm_offset % 2:
        return "slots not 2-byte aligned"
    if tables.has_mean and 2 * tables.rot_half != lay.head_size:
        return "key mean not NEOX-paired over the whole head"
    return None


def constants(tables, dtype: torch.dtype, c: dict) -> dict:
    """The kernel's tables from tq_store's constants c (_store_constants): the rotation blocks
    with PERM's columns, the code-search tables, the per-column vectors; kept in c."""
    if "hop" in c:
        return c["hop"]
    C = tables.layout.head_size // 4
    p = torch.tensor(perm(C), device=c["hs_x"].device)
    hs = c["hs_x"][:, :, p].to(dtype).contiguous()  # [4, C, C] diag(s_a) H_C, columns permuted
    hcp = c["hc_f16"][:, p].contiguous()  # calibrated key: H_C, columns permuted
    lay = tables.layout
    out = dict(hs=hs, hcp=hcp)
    for name, idx, st in (("k", 1, lay.key.b), ("v", 3, lay.value.b)):
        lv, th = tables.codebooks[idx]
        bt = bucket_table(lv * 256.0, th * 256.0, st.bits)  # coordinates scaled by 256
        if bt is None:
            out = None
            break
        out[name + "_shift"] = bt[0]
        out[name + "_tab"] = bt[1].to(tables.codebooks.device)
        # SLUT: the uniform buckets, each entry 8 times (lane & 7's replica: a conflict-free
        # 16-byte shared load), padded to a power of two of rows for the fill's arange (the
        # shared table holds only the rows)
        ub = ubucket_table(lv * 256.0, th * 256.0, st.bits)
        if ub is not None:
            rows = ub[2].repeat_interleave(8, dim=0)
            pad = torch.zeros(_pow2(rows.shape[0]), 4, dtype=torch.int32)
            pad[: rows.shape[0]] = rows
            out[name + "_ukm"] = (*ub[:2], rows.shape[0])
            out[name + "_utab"] = pad.to(tables.codebooks.device)
    if out is not None:
        out["isg"] = (tables.key_inv_scale * tables.signs).contiguous()  # exact: signs +-1
        heads = c["rot_vm"].shape[0]
        out["rvm"] = c["rot_vm"][:, 1].reshape(heads, 4, C)[:, :, p].reshape(heads, -1).contiguous()
        # KV16: the input-side tables in kperm's order (rows of the rotation blocks, the vectors
        # the inputs meet elementwise before their rotation)
        q = torch.tensor(kperm(C), device=hs.device)
        out["hs_q"] = hs[:, q, :].contiguous()
        out["hcp_q"] = hcp[q, :].contiguous()
        for name, vec in (("km_q", tables.key_mean), ("isg_q", out["isg"]),
                          ("vm_q", tables.value_mean)):
            out[name] = vec.reshape(heads, 4, C)[:, :, q].reshape(heads, -1).contiguous()
        out["theta_q"] = tables.rope_theta.reshape(4, C)[:, q].reshape(-1).contiguous()
    c["hop"] = out
    return out


def table_args(tables, hop: dict, cx: dict) -> tuple:
    """The kernel's table arguments (rope_theta_ptr .. vtab_ptr) for the launch's constexprs cx:
    the code-search tables SLUT's or bucket_table's, the input-side ones in kperm's order for
    KV16. tq_store passes these (kept per launch shape), store_launch too."""
    q = "_q" if cx["KV16"] else ""
    theta, km, vm = ((hop["theta_q"], hop["km_q"], hop["vm_q"]) if q else
                     (tables.rope_theta, tables.key_mean, tables.value_mean))
    return (theta, km, hop["isg" + q], tables.key_err_weights, vm, hop["rvm"],
            hop["hs" + q], hop["hcp" + q],
            hop["k_utab" if cx["SLUT"] else "k_tab"], hop["v_utab" if cx["SLUT"] else "v_tab"])


def _slut_fits(cx: dict, hop: dict) -> bool:
    """Whether SLUT's tables (static shared memory, declared in PTX, unknown to Triton) may join
    this launch: Triton raises a kernel's dynamic shared-memory limit only where its own
    allocation passes 48 KB (driver.c: to the opt-in limit less the static), so below that
    static + dynamic must stay under 48 KB. Triton's allocation estimated from the kernel's
    buffers, all live through the head loop (exact for the served shapes: 68, 44, 20 KB)."""
    C = cx["D"] // 4
    M = 16 * cx["NW"]
    dyn = 6 * C * C * 2  # the rotation blocks (16-bit)
    dyn += 4 * M * C * 4 if cx["MEAN"] else 0  # cos / sin
    dyn += 6 * cx["HEADS"] * 4 * C * 4 if cx["VSMEM"] else 0
    dyn += 8 * M * C * 2 if cx["ASYNC"] and not cx.get("KVPTX") else 0
    return dyn > 48 * 1024 or dyn + ptx_static(cx, hop) + 2048 <= 48 * 1024


def ptx_static(cx: dict, hop: dict) -> int:
    """Bytes of static shared memory the launch declares in PTX (at most 48 KB): SLUT's two
    tables (and 1 KB of slack) and KVPTX's staging buffers."""
    static = 1024 + 16 * (hop["k_ukm"][2] + hop["v_ukm"][2])
    return static + (8 * 16 * cx["NW"] * (cx["D"] // 4) * 2 if cx.get("KVPTX") else 0)
