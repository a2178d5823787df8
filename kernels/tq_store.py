"""Launching the store kernel (tq_store_kernel.py): quantize new keys and values into the cache.

``tq_store`` is the served launch: the arguments the backend passes, and what it chooses is what
vLLM runs. ``StoreTuning`` holds the measurement switches (tile size, warps, registers, and the
kernel's measurement-only code variants) that benchmarks and tests pass; the backend never does.

Host cost: the constants a launch derives from the tables (signed rotation blocks, the value
mean's rotation, immediates of the codebooks) and its constexprs are worked out once per
(tables, split mode, input dtype, heads, cache page and strides, alignment, tuning) and kept.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from .fast_path import choose
from .launch import CachedLaunch
from .launch_plans import LaunchPlans
from .tq_store_kernel import _tq_store_kernel
from .tq_streams import stream_constexprs

try:  # Gluon is experimental: a Triton without it (or without its APIs) stores on the portable path
    from . import tq_store_hopper as _hop

    GLUON_ERROR = None
except (ImportError, AttributeError) as e:
    _hop = None
    GLUON_ERROR = f"{type(e).__name__}: {e}"

log = logging.getLogger("vllm_gds.kernels")


@dataclass(frozen=True)
class StoreTuning:
    """Measurement switches of tq_store, for benchmarks and tests (None: the served choice).

    Served launches (measured on an H200, benchmarks/RESULTS.md "Store kernel, fourth pass",
    benchmarks/dev/kv_store_sweep.py): with the raw-key fallback 16-token tiles, 4 warps, 32-bit
    stores, and for one full-width stream per vector (tq4, tq3, tq5) chunks with maxnreg 128;
    else 64-token tiles, 8 warps, byte stores.
    block_t: tokens per program; num_warps; maxnreg (0: no limit); heads_per_program (default:
    all heads with a key mean, else 1). split: 0 float32 dots (the CPU interpreter's), 1 the
    GPU's 16-bit dots (default: 0 where the tables' dot type is float32).
    The kernel's variants (tq_store_kernel.py): codes, the code search (0 compares, 1 and 2
    predicate-free); wide_stores: 32/16-bit stores of whole code words; sym, imm_codebooks,
    via_memory, chunks: the full-width fallback path's variants (None: on where they apply);
    codes 3 (the chunked path only, default there): two table lookups per code (_buckets);
    prefetch (chunked path, default off: measured 0.541 ms on, 0.492 ms off for 32K tq4 tokens,
    H100, 2026-12-06, benchmarks/results/kv_store_check.json): the next head's keys and values
    loaded while one head is coded; exact_rot (chunked path, 16-bit inputs or split 0, default
    on): raw keys and values rotated in one 16-bit pass per chunk, the 4-point transform after
    the dots.
    hopper: the Gluon store (tq_store_hopper.py) where it can run (None), never (False), or
    required (True: an error where it cannot run); with it, num_warps (tokens per program / 16)
    and heads_per_program fix its launch shape (default: chosen per call, _Hopper.pick) and
    maxnreg limits its registers (default none)."""

    block_t: int | None = None
    num_warps: int | None = None
    maxnreg: int | None = None
    heads_per_program: int | None = None
    split: int | None = None
    codes: int | None = None
    wide_stores: bool | None = None
    sym: bool | None = None
    imm_codebooks: bool | None = None
    via_memory: bool | None = None
    chunks: bool | None = None
    prefetch: bool | None = None
    exact_rot: bool | None = None
    hopper: bool | None = None


SERVED = StoreTuning()
_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tables -> {key: dict}


def _store_constants(tables, split: int, dtype: torch.dtype) -> dict:
    """Signed rotation blocks in the dtypes the store's dots take, the value mean's rotation and
    which calibration steps are on; built once per tables and split mode."""
    cache = _CONSTANTS.setdefault(tables, {})
    if (split, dtype) in cache:
        return cache[split, dtype]
    signs = tables.signs.double()
    d = signs.numel()
    dev = tables.signs.device
    c = {}
    for name in ("ka", "kb", "va", "vb"):
        cols = tables.h_cols[name].double() * signs[:, None]  # diag(signs) H[:, stream]
        c[name + "_f32"] = cols.float().contiguous()
        c[name + "_f16"] = cols.half().contiguous()
        c[name + "_x"] = cols.to(dtype).contiguous()
    heads = tables.value_mean.shape[0]
    vm = tables.value_mean.double()
    # [heads, 2 (streams A, B), D]: rotate(value_mean) per stream, padded like the tiles
    rot_vm = torch.zeros(heads, 2, d, dtype=torch.float64, device=dev)
    for s, name in enumerate(("va", "vb")):
        r = vm @ (tables.h_cols[name].double() * signs[:, None])
        rot_vm[:, s, : r.shape[1]] = r
    c["rot_vm"] = rot_vm.float().contiguous()
    kcal = bool(tables.has_mean or (tables.key_mean != 0).any() or (tables.key_scale != 1).any())
    c["kcal"] = kcal
    c["vmean"] = bool((tables.value_mean != 0).any())
    c["same_rot"] = bool(torch.equal(c["kb_x"], c["vb_x"])
                         and torch.equal(c["kb_f16"], c["vb_f16"]))
    # One full-width stream per vector (tq4, tq3): H itself (+-1) rotates the signed inputs
    # (tq_store's sym).
    lay = tables.layout
    c["sym_ok"] = (lay.key.a.n == 0 and lay.value.a.n == 0 and lay.key.b.n == d
                   and lay.value.b.n == d and lay.key.b.width == d and lay.value.b.width == d)
    h = tables.h_cols["kb"].double()
    c["h_f32"] = h.float().contiguous()
    c["h_f16"] = h.half().contiguous()
    hc = h[: d // 4, : d // 4]  # H_C, C = d / 4 (tq_store's chunks)
    c["hc_f32"] = hc.float().contiguous()
    c["hc_f16"] = hc.half().contiguous()
    # diag(s_a) H_C for the chunks a of the signs (tq_store's exact_rot): [4, C, C]
    hs = torch.stack([signs[a * (d // 4):(a + 1) * (d // 4), None] * hc for a in range(4)])
    c["hs_f32"] = hs.float().contiguous()
    c["hs_x"] = hs.to(dtype).contiguous()

    # Stream B's codebooks as constants (tq_store's imm_codebooks): the positive levels, then the
    # positive thresholds, as Python floats (exactly the float32 table values), from the host.
    for name, st, i in (("kb", lay.key.b, 1), ("vb", lay.value.b, 3)):
        lv, th = tables.codebooks[i].cpu()  # LayerTables.codebooks: KA, KB, VA, VB
        half = 1 << (st.bits - 1)
        c["cb_" + name] = tuple(float(v) for v in lv[half: 2 * half]) + tuple(
            float(v) for v in th[half: 2 * half - 1])
        c["bk_" + name] = _buckets(th[half: 2 * half - 1])
    c["bk"] = torch.tensor([e for name in ("kb", "vb") for e in
                            (c["bk_" + name][1] if c["bk_" + name] else [0] * 256)],
                           dtype=torch.int64, device=dev)
    cache[split, dtype] = c
    return c


def _buckets(th: torch.Tensor):
    """The table of the code search by buckets (tq_store_codes._codes_bucketed) for the
    positive thresholds th (float32, ascending): ((shift, offset, buckets), 256 int64 entries),
    or None where no 256 buckets part them. The coarsest shift of the float bits that puts every
    threshold in its own bucket; entry b: (count of thresholds in buckets below b) << 32 | bits
    of the threshold in b (of +inf where none)."""
    bits = [int(b) for b in th.float().contiguous().view(torch.int32).tolist()]
    if not bits or min(bits) <= 0:
        return None
    for sh in range(31, -1, -1):
        keys = [b >> sh for b in bits]
        if len(set(keys)) == len(keys):
            break
    off = min(keys)
    nb = 1
    while nb < max(keys) - off + 1:
        nb *= 2
    if nb > 256:
        return None
    entries = []
    for b in range(256):
        below = sum(1 for k in keys if k - off < b)
        inside = [bits[i] for i, k in enumerate(keys) if k - off == b]
        entries.append((below << 32) | (inside[0] if inside and b < nb else 0x7F800000))
    return (sh, off, nb), entries


def _alignment(kv_cache: torch.Tensor, strides) -> int:
    """4, 2 or 1: the widest store every slot's start is aligned to (pointer and strides)."""
    g = kv_cache.data_ptr() | strides[0] | strides[1] | strides[2]
    return 4 if g % 4 == 0 else 2 if g % 2 == 0 else 1


def _rows16(x: torch.Tensor, strides) -> bool:
    """Whether every row of x [T, H, D] (16-bit) starts 16-byte aligned: the Hopper store's
    16-byte copies of whole rows (tq_store_hopper.KVPTX) need it."""
    return x.data_ptr() % 16 == 0 and (strides[0] | strides[1]) % 8 == 0


def _heads_per_program(h: int, has_mean: bool) -> int:
    """With a key mean all heads of a token tile share one program (its cos/sin once)."""
    return h if has_mean else 1

class _Launch:
    """Everything of one launch shape that does not change from call to call."""

    __slots__ = ("block_t", "heads", "scratch", "calib", "mats", "hc", "kwargs", "compiled",
                 "chunks", "exact_in", "align", "kvptx", "consts", "tuning", "hopper")

    def __init__(self, tables, split: int, dtype: torch.dtype, exact16: bool, h: int,
                 cuda: bool, page: int, stride_tok: int, stride_head: int, align: int,
                 kvptx: bool, tuning: StoreTuning | None):
        t = tuning or SERVED
        d = tables.layout.head_size
        c = _store_constants(tables, split, dtype)
        kcal = c["kcal"]
        fallback = tables.fallback and kcal
        num_warps = t.num_warps or (4 if fallback else 8)
        self.block_t = t.block_t or (16 if fallback else 64)
        self.heads = t.heads_per_program or _heads_per_program(h, tables.has_mean)
        if h % self.heads:
            raise ValueError(f"heads_per_program {self.heads} does not divide {h} KV heads")
        sym = fallback if t.sym is None else t.sym
        sym = bool(sym and c["sym_ok"] and fallback)
        kb = ("h_f32", "h_f16", "kb_x") if sym else ("kb_f32", "kb_f16", "kb_x")
        vb = ("h_f32", "h_f16", "vb_x") if sym else ("vb_f32", "vb_f16", "vb_x")
        chunks = bool((sym if t.chunks is None else t.chunks) and sym)
        bucketed = chunks and c["bk_kb"] is not None and c["bk_vb"] is not None
        codes = (3 if bucketed else 0) if t.codes is None else t.codes
        if codes == 3 and not bucketed:
            raise ValueError("codes 3 (the bucketed code search) needs the chunked path "
                             "(StoreTuning chunks) and codebooks that 256 buckets part")
        ptx = int(cuda and torch.version.hip is None)  # NVIDIA: the lookups as inline PTX
        imm_codebooks = fallback if t.imm_codebooks is None else t.imm_codebooks
        cbs = (dict(KB_CB=c["cb_kb"], VB_CB=c["cb_vb"]) if imm_codebooks and codes == 0
               else dict(KB_CB=c["bk_kb"][0] + (ptx,), VB_CB=c["bk_vb"][0] + (ptx,))
               if codes == 3 else {})  # (shift, offset, buckets, loads as inline PTX)
        prefetch = bool(t.prefetch and chunks)
        exact_in = split == 0 or exact16  # the inputs exact in the dots' dtype
        exact_rot = bool((chunks if t.exact_rot is None else t.exact_rot) and chunks and exact_in)
        maxnreg = 128 if t.maxnreg is None and chunks else t.maxnreg
        via_memory = sym if t.via_memory is None else t.via_memory
        self.scratch = bool(via_memory and sym and cuda)  # per call: T * H * 2 floats
        self.calib = (tables.codebooks, tables.key_mean, tables.key_inv_scale,
                      tables.key_err_weights, tables.value_mean)
        self.mats = (
            tables.rope_theta, tables.rope_partner, tables.rope_sign,
            c["ka_f32"], c[kb[0]], c["va_f32"], c[vb[0]],
            c["ka_f16"], c[kb[1]], c["va_f16"], c[vb[1]],
            c["ka_x"], c[kb[2]], c["va_x"], c[vb[2]], c["rot_vm"], tables.signs,
        )
        self.hc = (c["hc_f32"], c["hc_f16"], c["bk"], c["hs_f32"], c["hs_x"])
        self.kwargs = dict(
            PAGE=page, STRIDE_TOK=stride_tok, STRIDE_HEAD=stride_head,
            BLOCK_T=self.block_t, HEADS=self.heads, SPLIT=split, EXACT16=exact16, KCAL=kcal,
            FALLBACK=fallback, ABS_NORM=tables.fallback and not kcal,
            MEAN=tables.has_mean, VMEAN=c["vmean"], ALIGN=align, num_warps=num_warps,
            num_stages=1, SAME_KV_ROT=c["same_rot"], CODES=codes, SYM=sym, PREFETCH=prefetch,
            EXACT_ROT=exact_rot,
            SCR=self.scratch, CHUNK=chunks, NEOX=bool(tables.has_mean and 2 * tables.rot_half == d),
            WIDE=fallback if t.wide_stores is None else t.wide_stores,
            **stream_constexprs(tables.constexprs), **cbs,
        )
        if maxnreg and cuda:
            self.kwargs["maxnreg"] = maxnreg
        self.compiled = {}  # CachedLaunch's kernels of this plan
        self.chunks, self.exact_in, self.align = chunks and split == 1, exact16, align
        self.kvptx = kvptx  # the Hopper store's KVPTX: served, and 16-byte rows
        self.consts, self.tuning = c, t
        self.hopper = None  # _Hopper or False (portable), decided on the first call


class _Hopper:
    """The Gluon store's launches of one plan (tq_store_hopper.store_launch's constexprs), one
    per launch shape, chosen per call by the token count (pick)."""

    __slots__ = ("hop", "variants", "sms")

    def __init__(self, plan, tables, key, value, kv_cache, slot_mapping, positions):
        t = plan.tuning
        self.hop = _hop.constants(tables, key.dtype, plan.consts)
        H = key.shape[1]
        if t.num_warps or t.heads_per_program:  # a measured launch: that one only
            shapes = [(t.num_warps or 4, t.heads_per_program or (H if tables.has_mean else 1))]
        else:  # all heads per program (the key mean's cos / sin once), then more programs
            shapes = list(dict.fromkeys([(4, H if tables.has_mean else 1), (4, 1), (1, 1)]))
        # (tokens per program, heads per program, constexprs, compiled, table arguments)
        self.variants = []
        for warps, heads in shapes:
            if H % heads:
                raise ValueError(f"heads_per_program {heads} does not divide {H} KV heads")
            _, _, kwargs = _hop.store_launch(key, value, kv_cache, slot_mapping, tables,
                                             positions, plan.consts, self.hop, plan.align,
                                             num_warps=warps, heads=heads, maxnreg=t.maxnreg,
                                             kvptx=plan.kvptx)
            self.variants.append((16 * warps, heads, kwargs, {},
                                  _hop.table_args(tables, self.hop, kwargs)))
        self.sms = torch.cuda.get_device_properties(key.device).multi_processor_count

    def pick(self, T: int, H: int):
        """The first launch shape with at least two programs per SM at T tokens, else the
        last (the most programs): 32K tokens of 8 heads take 64 tokens x 8 heads a program,
        a decode step's few tokens 16 tokens x 1 head."""
        for v in self.variants:
            if -(-T // v[0]) * (H // v[1]) >= 2 * self.sms:
                return v
        return self.variants[-1]


def _choose(plan, tables, key, value, kv_cache, slot_mapping, positions):
    """The plan's store kernel: a _Hopper, or False (the portable kernel). Logged once."""
    def why_unsupported():
        why = _hop.why_unsupported(key, value, kv_cache, tables, plan.chunks, plan.exact_in,
                                   plan.align)
        if why is None and _hop.constants(tables, key.dtype, plan.consts) is None:
            why = "codebooks that no bucket table of <= 2^16 entries parts"
        return why

    use = choose(tables, "store", "store", plan.tuning.hopper, key.device, GLUON_ERROR,
                 why_unsupported, "tq_store", "StoreTuning")
    return _Hopper(plan, tables, key, value, kv_cache, slot_mapping, positions) if use else False


_LAUNCHES = LaunchPlans(_Launch)
_STORE = CachedLaunch(_tq_store_kernel)
_STORE_HOPPER = None  # CachedLaunch of the Gluon kernel, made on its first use


def served_launch(tables, T: int, H: int) -> dict | None:
    """What tq_store's served calls (no tuning) with these tables launch at T tokens of H heads,
    once one has run: kernel (hopper / portable), tokens and heads a program, warps. For reports
    (kv_bench's store rows); None before a served call."""
    for plan in _LAUNCHES.plans(tables):
        if plan.tuning != SERVED or plan.hopper is None:
            continue
        if plan.hopper:
            tokens, heads, kwargs, _, _ = plan.hopper.pick(T, H)
            return dict(kernel="hopper", block_t=tokens, heads=heads, num_warps=kwargs["NW"],
                        maxnreg=kwargs.get("maxnreg"), slut=kwargs["SLUT"])
        return dict(kernel="portable", block_t=plan.block_t, heads=plan.heads,
                    num_warps=plan.kwargs["num_warps"], maxnreg=plan.kwargs.get("maxnreg"))
    return None


def tq_store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, tables, positions: torch.Tensor | None = None, *,
             tuning: StoreTuning | None = None) -> None:
    """Quantize key/value [T, H_kv, D] into kv_cache (uint8 [blocks, page, H_kv, slot] strides,
    i.e. vLLM's [B, N, H, C] order or any view with those logical axes) at slot_mapping [T].
    tables: the layer's vllm_gds.kvcache.tables.LayerTables (read by attribute: kernels/ never
    imports the package). positions [T] (the tokens' positions in their sequences) are needed
    with a key mean. tuning: measurement only (StoreTuning)."""
    T, H, _ = key.shape
    if T == 0:
        return
    if tables.has_mean and positions is None:
        raise ValueError("these tables have a pre-RoPE key mean: tq_store needs the positions")
    if kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] < tables.layout.slot_bytes:
        raise ValueError(
            f"kv_cache must be uint8 with >= {tables.layout.slot_bytes} bytes per slot")
    ks, vs, cs = key.stride(), value.stride(), kv_cache.stride()
    assert ks[-1] == 1 and vs[-1] == 1
    split = None if tuning is None else tuning.split
    if split is None:
        split = 0 if tables.level_tables.dtype == torch.float32 else 1
    split = min(split, 1)
    exact16 = (bool(split) and key.dtype in (torch.bfloat16, torch.float16)
               and value.dtype == key.dtype)
    key_ = (split, key.dtype if exact16 else torch.float16, exact16, H, key.is_cuda,
            kv_cache.shape[1], cs[1], cs[2], _alignment(kv_cache, cs),
            _hop is not None and _hop.KVPTX and _rows16(key, ks) and _rows16(value, vs),
            tuning)  # tuning None (served): cheaper to hash than a dataclass
    plan = _LAUNCHES.get(tables, key_)
    hop = plan.hopper
    if hop is None:
        hop = plan.hopper = _choose(plan, tables, key, value, kv_cache, slot_mapping, positions)
    if hop:
        global _STORE_HOPPER
        if _STORE_HOPPER is None:
            _STORE_HOPPER = CachedLaunch(_hop._tq_store_hopper_kernel)
        tokens, heads, kwargs, compiled, tabs = hop.pick(T, H)
        # the tables as the launch shape's constexprs take them (tq_store_hopper.table_args)
        args = (key, ks[0], ks[1], value, vs[0], vs[1], kv_cache, cs[0], slot_mapping, T,
                slot_mapping if positions is None else positions, *tabs)
        grid = (-(-T // tokens), H // heads)
        if compiled:
            _STORE_HOPPER(grid, args, kwargs, compiled)
            return
        try:  # the first call compiles (Gluon is experimental): if that fails, store portably
            _STORE_HOPPER(grid, args, kwargs, compiled)
            return
        except Exception as e:  # noqa: BLE001  (a compile error of any kind)
            if plan.tuning.hopper:
                raise
            plan.hopper = False
            log.warning("%s store: the Hopper store failed to compile (%s: %s); the portable "
                        "Triton kernel stores instead (kernels/tq_store_hopper.py)",
                        getattr(tables, "format_name", "quantized KV"), type(e).__name__,
                        str(e)[:300])
    scr = (torch.empty(T * H * 2, dtype=torch.float32, device=key.device) if plan.scratch
           else tables.signs)
    _STORE((-(-T // plan.block_t), H // plan.heads), (
        key, ks[0], ks[1], value, vs[0], vs[1], kv_cache, cs[0], slot_mapping, T, *plan.calib,
        slot_mapping if positions is None else positions, *plan.mats, scr, *plan.hc,
    ), plan.kwargs, plan.compiled)
