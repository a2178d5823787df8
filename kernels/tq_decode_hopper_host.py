"""The Hopper decode's host side (kernels/tq_decode_hopper.py is the kernel and its launch): the
operand layouts of the codes (pure functions of the head size, the code width and the warps; the
compile test uses them too), the score rows a group takes (rows_of), the tables the kernel reads
(the permuted Hadamard operands, the key mean's step and rows, the lookup's table words) and why a
call is not the kernel's (why_unsupported). The lookups' PTX and table words are
vllm_gds.kvcache.hopper_tables' (attach)."""

from __future__ import annotations

import torch
from triton.experimental.gluon import language as gl

NT = 16  # tokens per warp-tile (one m16n8k16 K step of PV)


# ---------------------------------------------------------------------------------------------
# Layouts


def _bits(n: int) -> int:
    b = n.bit_length() - 1
    if 1 << b != n:
        raise ValueError(f"{n} is not a power of two")
    return b


def _warp_bases(nw: int, rank: int) -> list:
    return [[1 << i] + [0] * (rank - 1) for i in range(_bits(nw))]


def stream_codes(codes: int) -> tuple[int, int]:
    """(key codes, value codes) of the kernel's `codes`: 5 is tq5 (5-bit keys, 4-bit values in
    int16 elements), else both streams alike."""
    return (5, 4) if codes == 5 else (codes, codes)


# tq5's keys (lut5_ptx.PAIRS): output p of the 5-bit lookup holds codes (a_p, b_p) of each group
# of 8 codes, as elements (2j, 2j + 1) for group j
K5_PAIRS = ((0, 4), (7, 3), (5, 1), (2, 6))


def geometry(d: int, codes: int, stream: str) -> tuple[int, int]:
    """(E, phases): a token's code elements in one stream (keys "k", values "v") and the decoded
    levels per element. codes 4: int16 elements of 4 codes; 2: bytes of 2; 3 (3-bit codes, D =
    128): keys in int32 words, values in int16 halfwords, three of every four elements real (the
    fourth repeats the third, ignored; lut3_ptx.py), 8 (keys) or 4 (values) phases; 5 (5-bit
    keys, D = 128): int32 words, five of every eight elements real (the rest repeat the fifth,
    ignored; lut5_ptx.py), 4 phases."""
    if codes == 3:
        return (d // 8, 8) if stream == "k" else (d // 4, 4)
    if codes == 5:
        return d // 4, 4
    return d // codes, codes


def coordinate(codes: int, stream: str, e: int, j: int) -> int:
    """The code index (rotated coordinate) of element e's phase j: codes * e + j, or for 3-bit
    codes (lut3_ptx) 4 j + e % 4 in the lane's 32 (keys) or 16 (values) codes, or for 5-bit
    keys (lut5_ptx) code 8 (e' // 2) + K5_PAIRS[j][e' % 2] of the lane's 32 (e' = e % 8)."""
    if codes == 3:
        return (32 if stream == "k" else 16) * (e >> 2) + 4 * j + (e & 3)
    if codes == 5:
        return 32 * (e >> 3) + 8 * ((e & 7) >> 1) + K5_PAIRS[j][e & 1]
    return codes * e + j


def k_load_layout(d: int, nw: int, codes: int) -> gl.DistributedLinearLayout:
    """Key code elements [NW, NT, E]: lane (c, g) loads token g (and g + 8) elements
    [c E/4, (c+1) E/4): bytes [c D/8, (c+1) D/8) (tq4; 3-bit keys: [12c, 12c + 12))."""
    n = geometry(d, codes, "k")[0]
    eb = _bits(n)
    reg = [[0, 0, 1 << b] for b in range(eb - 2)] + [[0, 8, 0]]
    lane = [[0, 0, 1 << (eb - 2)], [0, 0, 1 << (eb - 1)], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    return gl.DistributedLinearLayout(reg, lane, _warp_bases(nw, 3), [], [nw, NT, n])


def v_load_layout(d: int, nw: int, codes: int, pair_first: bool) -> gl.DistributedLinearLayout:
    """Value code elements [NW, NT, E]: lane (c, g) holds tokens 2c, 2c+1, 2c+8, 2c+9,
    elements [g E/8, (g+1) E/8). pair_first: token bit 0 as register bit 0 (the lookup's packs
    pair tokens 2c and 2c + 1); else the elements first (the load's vectors)."""
    n = geometry(d, codes, "v")[0]
    eb = _bits(n)
    elems = [[0, 0, 1 << b] for b in range(eb - 3)]
    reg = ([[0, 1, 0]] + elems if pair_first else elems + [[0, 1, 0]]) + [[0, 8, 0]]
    lane = [[0, 2, 0], [0, 4, 0]] + [[0, 0, 1 << b] for b in range(eb - 3, eb)]
    return gl.DistributedLinearLayout(reg, lane, _warp_bases(nw, 3), [], [nw, NT, n])


def _dims(d: int, codes: int, stream: str):
    """(e(b): the dim of element-index bit b, the phase dims MSB first, E bits) of the decoded
    tensor [NW, NT, element bits (MSB first), phase bits (LSB first)]."""
    n, phases = geometry(d, codes, stream)
    eb, pb = _bits(n), _bits(phases)
    return (lambda b: 2 + (eb - 1 - b)), [2 + eb + i for i in reversed(range(pb))], eb


def k_order(d: int, codes: int = 4) -> list[int]:
    """The permutation of the decoded keys' dims that reshapes to [NW, NT, D (k-slot)]:
    k = e_0 + 2 e_top2 + 4 e_top1 + 8 (phase) + ... (e_1, e_2, ... above): k bit 0 pairs two
    elements in one register, k bits 1-2 are the lane's."""
    e, phase, eb = _dims(d, codes, "k")
    return [0, 1] + [e(b) for b in range(eb - 3, 0, -1)] + phase + [e(eb - 1), e(eb - 2), e(0)]


def v_order(d: int, codes: int = 4) -> list[int]:
    """The permutation of the decoded values' dims that reshapes to [NW, D (m-slot), NT]:
    m = e_top3 + 2 e_top2 + 4 e_top1 (the lane's) + 8 (phase) + ... (e_0, e_1, ... above)."""
    e, phase, eb = _dims(d, codes, "v")
    return ([0] + [e(b) for b in range(eb - 4, -1, -1)] + phase
            + [e(eb - 1), e(eb - 2), e(eb - 3), 1])


def perm_code(order: list[int]) -> int:
    """A dim order packed 4 bits a dim (the kernel's _permute_bits unpacks it)."""
    return sum(o << (4 * i) for i, o in enumerate(order))


def slot_coordinates(d: int, order: list[int], codes: int = 4, stream: str = "k") -> list[int]:
    """The code index (coordinate of the rotated vector) of each k- or m-slot, following the
    kernel's reshape/permute: a slot's index bits, read in `order` (dims 0 and 1 are the warp and
    the token), give the element e and phase j (coordinate())."""
    n, phases = geometry(d, codes, stream)
    eb, pb = _bits(n), _bits(phases)
    dims = [x for x in order if x not in (0, 1)]  # MSB first
    coords = []
    for slot in range(d):
        bit = {x: (slot >> (len(dims) - 1 - i)) & 1 for i, x in enumerate(dims)}
        e = sum(bit[2 + (eb - 1 - b)] << b for b in range(eb))
        j = sum(bit[2 + eb + i] << i for i in range(pb))
        coords.append(coordinate(codes, stream, e, j))
    return coords


def slot_maps(d: int, codes: int) -> tuple[list[int], list[int]]:
    """(the key k-slots', the value m-slots') coordinates of the kernel's `codes` (slot_coordinates
    of k_order and v_order with stream_codes' widths)."""
    kc, vc = stream_codes(codes)
    return (slot_coordinates(d, k_order(d, kc), kc, "k"),
            slot_coordinates(d, v_order(d, vc), vc, "v"))


# ---------------------------------------------------------------------------------------------
# Tables and checks


def rows_of(G: int, fallback: bool) -> tuple[bool, bool, int, int]:
    """(FOLD, SELECT, R, HALF): how the raw-key fallback is scored (FOLD: G <= 4, calibrated
    rows [0, 4) and uncalibrated [4, 8) of one operand; SELECT: G 5..8, two 8-row operands and a
    select per key), the score rows R (mma N: 8 or 16), and the rows of one softmax (HALF)."""
    if fallback and G <= 4:
        return True, False, 8, 4
    if fallback:
        return False, True, 8, 8
    return False, False, (8 if G <= 8 else 16), (8 if G <= 8 else 16)


WORD_BYTES = {(4, "k"): 2, (4, "v"): 2, (2, "k"): 1, (2, "v"): 1, (3, "k"): 4, (3, "v"): 2,
              (5, "k"): 4}


def finish_rows(tables, codes: int | None = None) -> torch.Tensor:
    """The output Hadamard rows in this kernel's m-slot order, transposed ([D, m-slot]): the
    finish's B operand (FINISH), its k pairs contiguous as the query transform's."""
    cache = tables.__dict__.setdefault("_hopper_finish", {})
    codes = codes or tables.hopper_codes
    if codes not in cache:
        cache[codes] = hadamard_operands(tables, codes)[1].t().contiguous()
    return cache[codes]


def hadamard_operands(tables, codes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(query transform: H's columns in this kernel's k-slot order, transposed ([k-slot, D], so
    the kernel's operand pairs are 4-byte loads), output rows [D, D] in its m-slot order), made
    once per tables (the launch passes them; the finish takes the rows)."""
    codes = codes or tables.hopper_codes
    cache = tables.__dict__.setdefault("_hopper_operands", {})
    if codes not in cache:
        d = tables.layout.head_size
        dev = tables.signs.device
        kperm, vperm = (torch.tensor(p, device=dev) for p in slot_maps(d, codes))
        cache[codes] = (tables.h_cols["kb"][:, kperm].t().contiguous(),
                        tables.h_rows["vb"][vperm].contiguous())
    return cache[codes]


def why_unsupported(query: torch.Tensor, kv_cache: torch.Tensor, tables) -> str | None:
    """None where this kernel serves the launch; else why not (the caller takes tq_attention)."""
    if query.device.type != "cuda" or torch.cuda.get_device_capability(query.device)[0] < 9:
        return "needs an sm_90+ GPU"
    return layout_unsupported(query, kv_cache, tables)


def layout_unsupported(query: torch.Tensor, kv_cache: torch.Tensor, tables) -> str | None:
    """why_unsupported without the device: the format, head size, alignment, page and group
    (shapes and strides only, so CPU tensors answer as CUDA ones would)."""
    T, Hq, D = query.shape
    H = kv_cache.shape[2]
    layout = tables.layout
    k, v = layout.key, layout.value
    kv_bits = (k.b.bits, v.b.bits)
    if not (k.a.n == 0 and v.a.n == 0 and kv_bits in ((3, 3), (4, 4), (5, 4))):
        return "not 4-bit, 3-bit or 5-bit keys (4-bit values) with one stream each"
    bits = k.b.bits
    if D not in ((64, 128) if bits == 4 else (128,)):
        return f"head size {D} ({'64 and 128' if bits == 4 else '128'} only at {bits}-bit keys)"
    if k.b.offset % 2 or v.b.offset % 2 or k.norm_offset % 2 or v.norm_offset % 2:
        return "odd stream offsets"
    if getattr(tables, "hopper_asm", None) is None:
        return "tables have no hopper_asm (vllm_gds.kvcache.hopper_tables.attach)"
    if kv_cache.shape[1] % NT or kv_cache.stride(3) != 1 or kv_cache.stride(2) % 2:
        return f"page size {kv_cache.shape[1]} not a multiple of {NT} (or odd strides)"
    if bits != 4 and (k.b.offset % 4 or kv_cache.stride(2) % 4 or kv_cache.stride(1) % 4
                      or kv_cache.stride(0) % 4):
        return f"{bits}-bit key codes not 4-byte aligned"
    G = Hq // H
    if G > (8 if tables.fallback else 16):
        return f"{G} query heads per KV head"
    if tables.has_mean and tables.rot_half_pad % 16:
        return "mean pairs not a multiple of 16"
    return None


def mean_step(tables, nw: int) -> torch.Tensor:
    """[2, heads * RH] float32: cos and sin of the key mean's per-tile angle step, 16 * nw *
    theta, taken in float64 and rounded once (made once per tables and warp count)."""
    cache = tables.__dict__.setdefault("_hopper_mean_step", {})
    if nw not in cache:
        angle = tables.mean_theta.double() * (16 * nw)
        cache[nw] = torch.stack([angle.cos(), angle.sin()]).float().contiguous()
    return cache[nw]


def mean_rows(tables, nw: int) -> torch.Tensor:
    """[heads, 16 nw, 2 RH] fp16: tables.mean_table(16 nw) with the positions as rows, each row the
    cos then the sin of the head's pairs (the kernel's A operand pairs are 4-byte loads)."""
    cache = tables.__dict__.setdefault("_hopper_mean_rows", {})
    if nw not in cache:
        t = tables.mean_table(NT * nw, torch.float16)  # [heads, 2, RH, 16 nw]
        cache[nw] = t.flatten(1, 2).transpose(1, 2).contiguous()
    return cache[nw]


def lut_args(tables) -> tuple:
    """The kernel's table-word arguments (lut0 .. lut3, lut_zero, klut0 .. klut7): the lookup's
    four words (tq5: the values'), 0, and tq5's eight key words (zeros for the others)."""
    return (*tables.hopper_lut, 0, *(getattr(tables, "hopper_klut", None) or (0,) * 8))


def table_args(tables, codes: int | None = None, nw: int = 4) -> tuple:
    """The kernel's table arguments between query_start_ptr and part_ptr (signs .. hk_ptr)."""
    h_k, _ = hadamard_operands(tables, codes)
    return (tables.signs, tables.key_scale, tables.key_mean, tables.mean_pairs, tables.mean_theta,
            mean_step(tables, nw), tables.mean_mu, mean_rows(tables, nw), h_k)
