"""Launching the attention over the quantized cache (the kernel: tq_attention_kernel.py).

``tq_attention`` is the served launch: the arguments the backend passes, and what it chooses is
what vLLM runs. ``AttentionTuning`` holds the measurement switches (tile sizes, warps, splits, the
register lookup, the key mean's stepping, page-wise addresses, FOLD) that benchmarks and tests
pass to try other launches; the backend never passes one.

Host cost: a launch's constexprs, its table arguments and the reduce's launch are worked out once
per (tables, decode or prefill, G, splits, page and strides, tuning) and kept (a _Launch). A call
reads shapes and strides, looks its plan up, allocates the split partials and launches; no dict
building, table lookups, device queries or syncs (with max_query_len given). The partials are a
new buffer every call (the caching allocator's, about as cheap as a kept one), which stays
correct whatever stream or CUDA graph runs the call.

Decode on Hopper: where it can run, decode takes the Gluon kernel (tq_decode_hopper.py) instead
of the portable one: Triton has Gluon, the GPU is sm_90 (the only architecture it was checked
on), and its why_unsupported passes (tq4: one 4-bit stream each for keys and values, head size
64 or 128; tq3: one 3-bit stream each, head size 128; ...). Its split count follows its own rule
(split_count's resident: one wave of programs). Decided once per plan on its first call
(fast_path.choose is the decision) and logged once per distinct choice on the "vllm_gds.kernels"
logger. AttentionTuning.hopper=False measures the portable kernel; True requires the Hopper one.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fast_path import choose
from .launch import CachedLaunch
from .launch_plans import LaunchPlans
from .tq_attention_kernel import _tq_attention_kernel
from .tq_attention_parts import _tq_reduce_kernel
from .tq_streams import stream_constexprs

try:  # Gluon is experimental: a Triton without it (or without its APIs) serves the portable path
    from . import tq_decode_hopper as _hop

    GLUON_ERROR = None
except (ImportError, AttributeError) as e:
    _hop = None
    GLUON_ERROR = f"{type(e).__name__}: {e}"

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# The Hopper decode merges its partials in the kernel (merge groups, no reduce launch), so a batch
# of one sequence and KV head may spread over every SM: 128 programs of 4 tiles at 32K tokens.
HOPPER_MAX_SPLITS = 128
_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class AttentionTuning:
    """Measurement switches of tq_attention, for benchmarks and tests (None: the served choice).

    splits: programs per sequence (decode: split_count of the batch shape; prefill: 1).
    block_n: keys per tile (64 on the GPU, 16 in the interpreter). block_m: rows per program of
    chunked prefill (decode always takes G rows, 2G with FOLD, padded). num_warps (4 decode, 8
    prefill), num_stages, maxnreg (decode on the register path: 1 stage, 128 registers).
    fast: False keeps decode on the gather path (the GPU's 4-bit register lookup otherwise).
    mean_step, paged, fold: False measures the key mean computed exactly every tile, per-token
    addresses, and a second set of score dots for the raw keys (tq_attention_kernel.py).
    hopper: decode on the Gluon kernel (tq_decode_hopper.py) where it can run (None), never
    (False: the portable kernel, to which the other switches apply), or always (True: raises
    where it cannot run); the Hopper launch takes only splits of these switches."""

    splits: int | None = None
    block_n: int | None = None
    block_m: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    maxnreg: int | None = None
    fast: bool | None = None
    mean_step: bool = True
    paged: bool = True
    fold: bool = True
    hopper: bool | None = None


SERVED = AttentionTuning()


def _pow2_at_least(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def reduce_chunk(splits: int, rows: int = 16, width: int = 128) -> int:
    """Partials the reduce merges per step: a power of two, as many as fit [rows, SC, width]
    float32 in 64 registers of 8 warps (8 at 16 rows of width 128), at most 64."""
    fit = max(1, 16 * 8 * 128 // (rows * width))
    return min(64, fit, triton.next_power_of_2(splits))


# From this many splits a reduce program merges one query head's row, not all G: at batch 1 a
# single program merging 64 splits of 8 rows took 15 us, longer than most decodes (ncu, H100,
# 2026-12-06, benchmarks/dev/kv_hopper_ncu.py: Llama-3-70B TP8 1x32K).
REDUCE_ROW_SPLITS = 8


def reduce_kwargs(tables, g: int, splits: int, dot, num_warps: int = 4) -> dict:
    """Constexprs and warps of _tq_reduce_kernel merging the splits of G query heads (the
    portable and the Hopper decode both leave their partials to it): GM rows a program, all G
    (rounded up to a power of two) or one where splits >= REDUCE_ROW_SPLITS; its grid is
    (tokens, KV heads, reduce_groups(kwargs))."""
    kw = tables.constexprs
    gm = 1 if splits >= REDUCE_ROW_SPLITS else triton.next_power_of_2(g)
    sc = reduce_chunk(splits, gm, max(kw["VB_W"], kw["VA_W"]))
    return dict(G=g, BLOCK_M=_pow2_at_least(g), SPLITS=splits, DOT=dot, D=kw["D"],
                VA_N=kw["VA_N"], VA_W=kw["VA_W"], VB_W=kw["VB_W"], SC=sc, GM=gm,
                num_warps=8 if sc >= 8 else num_warps)


def reduce_groups(kwargs: dict) -> int:
    """The reduce grid's third dim: row groups of GM rows."""
    return triton.cdiv(kwargs["G"], kwargs["GM"])


# Programs of the Hopper decode an SM holds at once: its 210-243 registers a thread (Triton 3.6,
# 4 warps, maxnreg 255: tests/hopper_compile.py) leave room for two.
HOPPER_PROGRAMS_PER_SM = 2


def split_count(num_seqs: int, num_kv_heads: int, sms: int, max_splits: int = MAX_SPLITS,
                resident: int | None = None) -> int:
    """Splits per sequence for decode, at most max_splits.

    Portable kernel (resident None): about 2-4 programs per SM (2 * sms rounded up to a power of
    two). Measured on an H200 (benchmarks/dev/kv_split_sweep.py): the attention kernel was
    fastest at 512 programs on 132 SMs at every shape that reaches it.
    Hopper kernel (resident: the programs an SM holds at once, HOPPER_PROGRAMS_PER_SM): resident
    * sms programs rounded down to a power of two, so all run in one wave; the portable rule's
    second, part-filled wave measured 1.2-1.4x slower at Llama-3-70B TP8 32x4K and 8x32K and at
    Llama-3-8B 1x32K (benchmarks/results/kv_split_sweep.json, H100, 2026-12-06).

    From the batch shape only (never the sequence lengths), so that a CUDA graph captured for a
    batch size stays valid for any context length; splits past a short context get no tiles and
    only write an empty partial."""
    if resident:
        want = max(1, resident * sms // max(1, num_seqs * num_kv_heads))
        return int(min(max_splits, 1 << (want.bit_length() - 1)))
    want = triton.cdiv(2 * sms, max(1, num_seqs * num_kv_heads))
    return int(min(max_splits, max(1, triton.next_power_of_2(want))))


@functools.lru_cache(maxsize=None)
def _splits_on(num_seqs: int, num_kv_heads: int, cuda_index: int, hopper: bool = False) -> int:
    if cuda_index < 0:
        return 1
    sms = torch.cuda.get_device_properties(cuda_index).multi_processor_count
    if hopper:
        return split_count(num_seqs, num_kv_heads, sms, HOPPER_MAX_SPLITS, HOPPER_PROGRAMS_PER_SM)
    return split_count(num_seqs, num_kv_heads, sms)


@functools.lru_cache(maxsize=None)
def _capability(cuda_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(cuda_index)


def _hopper_likely(tables, query: torch.Tensor, tuning) -> bool:
    """Whether the decode will take the Hopper kernel, as far as the split count needs to know
    (the plan decides for sure: where it then takes the portable kernel, the split count is
    still a valid one)."""
    return (GLUON_ERROR is None and query.is_cuda
            and getattr(tables, "hopper_codes", None) is not None
            and (tuning is None or tuning.hopper is not False)
            and _capability(query.get_device())[0] == 9)


def default_splits(num_seqs: int, num_kv_heads: int, device: torch.device,
                   hopper: bool = False) -> int:
    """split_count for this device (hopper: the Hopper kernel's rule); 1 off CUDA (the CPU
    interpreter)."""
    if device.type != "cuda":
        return 1
    device = torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return _splits_on(num_seqs, num_kv_heads, index, hopper)


class Counters:
    """The Hopper decode's completion counters (int32 zeros, tq_decode_hopper.counter_count; every
    launch leaves them zero): one buffer per CUDA stream, so that launches of one plan on two
    streams (vLLM's dual-batch overlap) never share a counter; grown for larger batches, the
    outgrown ones kept alive (a captured CUDA graph may still point at them)."""

    def __init__(self):
        self.by_stream: dict[int, torch.Tensor] = {}
        self.kept: list[torch.Tensor] = []

    def get(self, stream: int, n: int, device) -> torch.Tensor:
        counts = self.by_stream.get(stream)
        if counts is None or counts.numel() < n:
            if counts is not None:
                self.kept.append(counts)
            counts = self.by_stream[stream] = torch.zeros(n, dtype=torch.int32, device=device)
        return counts


class _Hopper:
    """The Hopper decode's launch of one plan (tq_decode_hopper.decode_launch's, kept): it
    finishes the rows itself (FINISH 1 or 2), never leaving partials to the reduce launch."""

    __slots__ = ("kwargs", "tables", "lut", "finish", "finish_tables", "counters", "compiled",
                 "varying")

    def __init__(self, query, kv_cache, tables, splits):
        H = kv_cache.shape[2]
        self.finish = _hop.finish_mode(splits)
        self.counters = Counters()
        self.kwargs = _hop.launch_constexprs(tables, query.shape[1] // H, kv_cache,
                                             finish=self.finish)
        self.tables = _hop.table_args(tables)
        self.lut = _hop.lut_args(tables)
        self.finish_tables = _hop.finish_tables(tables)
        self.compiled = {}
        # the launch's arguments that change between calls (tq_attention's order): all but the
        # tables, the table words and the finish's tables, which are these objects every call
        t, lw, f = len(self.tables), len(self.lut), len(self.finish_tables)
        self.varying = operator.itemgetter(*range(9), 9 + t, 10 + t, 11 + t + lw, 12 + t + lw,
                                           13 + t + lw, 14 + t + lw + f)


_HOPPER = None  # CachedLaunch of the Gluon kernel, made on its first use


def _choose_decode(query, kv_cache, tables, splits, tuning):
    """The plan's decode kernel: a _Hopper, or False (the portable kernel). Logged once."""
    global _HOPPER
    use = choose(tables, "decode", "kernel", tuning.hopper if tuning is not None else None,
                 query.device, GLUON_ERROR,
                 lambda: _hop.why_unsupported(query, kv_cache, tables),  # hopper_asm too
                 "tq_attention", "AttentionTuning")
    if not use:
        return False
    if _HOPPER is None:
        _HOPPER = CachedLaunch(_hop._tq_decode_hopper_kernel)
    return _Hopper(query, kv_cache, tables, splits)


class _Launch:
    """Everything of one launch shape that does not change from call to call. hopper: the
    decode's Hopper launch (_Hopper), False for the portable kernel, None until the first call."""

    __slots__ = ("block_q", "splits", "part_width", "tables", "kwargs", "reduce_args",
                 "reduce_kwargs", "compiled", "compiled_reduce", "hopper")

    def __init__(self, tables, decode: bool, g: int, splits: int, page: int, stride_tok: int,
                 stride_head: int, interpreted: bool, tuning: AttentionTuning | None):
        t = tuning or SERVED
        self.hopper = None if decode else False
        if not decode and t.hopper:
            raise ValueError("tq_attention: AttentionTuning(hopper=True) serves decode only "
                             "(max_query_len 1); pass hopper=None or False for prefill")
        dot = tl.float32 if interpreted else _TORCH_TO_TL[tables.level_tables.dtype]
        # The register lookup serves decode only: on an H200 with Triton 3.6 the chunked-prefill
        # launch (64-row blocks, 8 warps) with it hit an illegal memory access (not understood).
        use_fast = (not interpreted) and dot == tl.bfloat16 and t.fast is not False and decode
        fast_k = use_fast and "k" in tables.lut4_asm
        fast_v = use_fast and "v" in tables.lut4_asm
        fold = t.fold and decode and tables.fallback
        if decode:
            self.block_q = 1
            block_m = _pow2_at_least(2 * g if fold else g)
        else:
            block_m = t.block_m or _pow2_at_least(g, 16 if interpreted else 64)
            self.block_q = max(1, block_m // g)
        self.splits = splits
        block_n = t.block_n or (16 if interpreted else 64)
        num_warps = t.num_warps or (4 if decode else 8)
        num_stages, maxnreg = t.num_stages, t.maxnreg
        if decode and (fast_k or fast_v):
            # Measured on an H200 (benchmarks/dev/kv_decode_sweep.py, RESULTS.md): no software
            # pipelining and at most 128 registers (four programs per SM) were fastest.
            num_stages = num_stages or 1
            maxnreg = maxnreg or 128
        layout = tables.layout
        self.part_width = max(16, layout.value.a.width) + max(16, layout.value.b.width) + 2
        h_cols, h_rows = tables.h_cols, tables.h_rows
        hkb = h_cols["kb_perm"] if fast_k else h_cols["kb"]
        hvb = h_rows["vb_perm"] if fast_v else h_rows["vb"]
        self.tables = (
            tables.level_tables, tables.signs, tables.key_mean, tables.key_scale,
            tables.value_mean, tables.mean_pairs, tables.mean_theta, tables.mean_mu,
            tables.mean_table(block_n, torch.float32 if interpreted else torch.float16),
            h_cols["ka"], hkb, h_rows["va"], hvb,
        )
        kw = tables.constexprs
        self.kwargs = dict(
            G=g, BLOCK_Q=self.block_q, BLOCK_M=block_m, BLOCK_N=block_n, DECODE=decode,
            SPLITS=splits, DOT=dot, FALLBACK=tables.fallback, FAST_K=fast_k, FAST_V=fast_v,
            K_ASM=tables.lut4_asm.get("k", "") if fast_k else "",
            V_ASM=tables.lut4_asm.get("v", "") if fast_v else "",
            MEAN=tables.has_mean, ROT_HALF=tables.rot_half, RH=tables.rot_half_pad,
            MEAN_DOT=tl.float32 if interpreted else tl.float16, MEAN_STEP=t.mean_step,
            PAGED=t.paged and block_n % page == 0, FOLD=fold, PAGE=page, STRIDE_TOK=stride_tok,
            STRIDE_HEAD=stride_head, num_warps=num_warps, **stream_constexprs(kw),
        )
        if num_stages is not None:
            self.kwargs["num_stages"] = num_stages
        if maxnreg is not None and not interpreted:
            self.kwargs["maxnreg"] = maxnreg
        self.compiled, self.compiled_reduce = {}, {}  # CachedLaunch's kernels of this plan
        self.reduce_args = (h_rows["va"], hvb, tables.signs, tables.value_mean)
        self.reduce_kwargs = reduce_kwargs(tables, g, splits, dot, num_warps)


_LAUNCHES = LaunchPlans(_Launch)
_ATTENTION = CachedLaunch(_tq_attention_kernel)
_REDUCE = CachedLaunch(_tq_reduce_kernel)


def tq_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, query_start_loc: torch.Tensor, tables,
                 softmax_scale: float, out: torch.Tensor | None = None, *,
                 max_query_len: int | None = None,
                 tuning: AttentionTuning | None = None) -> torch.Tensor:
    """Attention of query [T, Hq, D] over the quantized paged cache.

    kv_cache: uint8 with axes [blocks, page, H_kv, slot bytes] (any strides); block_table
    [num_seqs, max_blocks] int32; seq_lens [num_seqs] (context + query tokens); query_start_loc
    [num_seqs + 1]; tables: the layer's vllm_gds.kvcache.tables.LayerTables (read by attribute:
    kernels/ never imports the package). The cache already holds the keys and values of the
    query tokens, and a key's position is its index in its sequence (what the key mean's RoPE
    uses). max_query_len: 1 selects the decode path (one query token per sequence); None reads
    it from query_start_loc (a device sync). tuning: measurement only (AttentionTuning).
    """
    T, Hq, _ = query.shape
    if out is None:
        out = torch.empty_like(query)
    if T == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    num_seqs = seq_lens.shape[0]
    H = kv_cache.shape[2]
    decode = max_query_len == 1
    splits = tuning.splits if tuning is not None else None
    if not splits and decode:
        splits = _splits_on(num_seqs, H, query.get_device() if query.is_cuda else -1,
                            _hopper_likely(tables, query, tuning))
    splits = splits or 1
    cs = kv_cache.stride()
    # tuning None (served) in the key: cheaper to hash than a dataclass
    plan = _LAUNCHES.get(tables, (decode, Hq // H, splits, kv_cache.shape[1], cs[1], cs[2],
                                  query.is_cpu, tuning))
    qs, os_ = query.stride(), out.stride()
    hop = plan.hopper
    if hop is None:
        hop = plan.hopper = _choose_decode(query, kv_cache, tables, splits, tuning)
    if hop:
        part, counts, stream = out, seq_lens, None  # unread unless FINISH 2
        if hop.finish == 2:
            part = _hop.partials(T * Hq, splits, hop.kwargs["WP"], query.device)
            stream = torch._C._cuda_getCurrentRawStream(query.get_device())
            counts = hop.counters.get(stream, _hop.counter_count(num_seqs, H, splits),
                                      query.device)
        _HOPPER((num_seqs, H, splits), (
            query, qs[0], qs[1], kv_cache, cs[0], block_table, block_table.stride(0), seq_lens,
            query_start_loc, *hop.tables, part, softmax_scale * LOG2E / query.shape[2] ** 0.5,
            *hop.lut, out, os_[0], os_[1], *hop.finish_tables, counts,
        ), hop.kwargs, hop.compiled, hop.varying, stream)
        return out
    part = out
    if splits > 1:
        part = torch.empty(T * Hq * splits * plan.part_width, dtype=torch.float32,
                           device=query.device)
    grid0 = num_seqs if decode else T // plan.block_q + num_seqs
    _ATTENTION((grid0, H, splits), (
        query, qs[0], qs[1], kv_cache, cs[0], block_table, block_table.stride(0), seq_lens,
        query_start_loc, num_seqs, *plan.tables,
        out, os_[0], os_[1], part, softmax_scale * LOG2E / query.shape[2] ** 0.5,
    ), plan.kwargs, plan.compiled)
    if splits > 1:
        _REDUCE((T, H, reduce_groups(plan.reduce_kwargs)),
                (part, out, os_[0], os_[1], *plan.reduce_args, T), plan.reduce_kwargs,
                plan.compiled_reduce)
    return out
