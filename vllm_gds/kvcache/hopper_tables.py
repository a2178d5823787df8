"""Host side of the Hopper decode (kernels/tq_decode_hopper.py): its lookup PTX.

Two forms of tq_lut4's prmt lookup (lut4_ptx.py), at head sizes 64 and 128 (the portable kernel's
register path takes 128 only, so LayerTables.lut4_asm lacks 64):
- 4 codes per element: lut4_ptx.levels4_asm itself (int16 elements in pairs, four outputs);
- 2 codes per element: ``bytes_asm`` (int8 elements in fours, two outputs of two registers: the
  low and the high nibbles). Its bf16 pairs are (byte 0, byte 1) and (byte 2, byte 3) of one
  nibble half, which the table lookups' byte order gives with one permute per pair: 4 permutes
  per 8 codes where levels4_asm needs 6 to pair codes of different 16-bit elements.
3-bit codes (tq3) take lut3_ptx.py's lookups (keys and values apart); tq5's 5-bit keys take
lut5_ptx.py's (eight table words, ``hopper_klut``) and its 4-bit values the 4-bit lookup.
``attach`` gives a layer's tables the attributes the kernel reads; the coordinate permutations and
the permuted Hadamard blocks are made by the kernel module from the tables (kernels/ reads tables
by attribute and never imports this package).
"""

from __future__ import annotations

from . import lut3_ptx, lut5_ptx
from .codebook import codebook
from .lut4_ptx import levels4_asm, lookup_asm, magnitude_bytes


def bytes_asm(levels) -> str:
    """PTX for inline_asm_elementwise(pack=4) on int8 elements: $4 holds bytes b0..b3 (nibbles
    n0..n7, n0 the low nibble of b0); $0 = (L(n0), L(n2)), $1 = (L(n4), L(n6)) (the low
    nibbles of b0..b3), $2 = (L(n1), L(n3)), $3 = (L(n5), L(n7)) (the high nibbles), each a bf16
    pair (first element in the low half). The lookup is levels4_asm's."""
    return lookup_asm(levels, "f, g, idx, idh, w4, la, ha, lb, hb, tl0, tl1, th0, th1", """prmt.b32 $0, la, ha, 0x6240;
prmt.b32 $2, la, ha, 0x7351;
prmt.b32 $1, lb, hb, 0x6240;
prmt.b32 $3, lb, hb, 0x7351;
""")


PACK = {4: 2, 2: 4}  # codes per element -> elements per inline-asm call


def operand_asm(asm: str, codes: int) -> str:
    """The lookup with its four table words read from operands instead of immediates: the words
    come from kernel arguments, so every lookup of a tile shares four registers (ptxas copied the
    immediates from uniform registers before each lookup: about 3 instructions per 8 codes). The
    operands follow the output registers and the code register $4; an int32 operand of an
    inline_asm_elementwise call with pack p takes p registers, of which the first is read."""
    p = PACK[codes]
    lines = asm.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("mov.b32 tl0,")]
    if len(at) != 1:
        raise ValueError("unexpected lookup PTX: no table line")
    lines[at[0]] = (f"mov.b32 tl0, ${5}; mov.b32 tl1, ${5 + p}; mov.b32 th0, ${5 + 2 * p}; "
                    f"mov.b32 th1, ${5 + 3 * p};")
    return "\n".join(lines)


def table_words(levels) -> tuple[int, int, int, int]:
    """lut4_ptx.magnitude_bytes as signed 32-bit integers (kernel arguments)."""
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in magnitude_bytes(levels))


def attach(tables):
    """Where keys and values are single streams of 4 bits (tq4: both use codebook(d, 4)), 3 bits
    at head size 128 (tq3), or 5-bit keys and 4-bit values at head size 128 (tq5):
    tables.hopper_codes (the kernel's codes: 4, 3 or 5), tables.hopper_asm = {(codes, "k" or
    "v"): PTX} (4-bit: codes 4 and 2, the same lookup for keys and values; the table words are
    operands), tables.hopper_lut = the four table words (tq5: the values') and
    tables.hopper_klut = tq5's eight key table words (else None); else all None. Returns
    tables."""
    layout = tables.layout
    d = layout.head_size
    single = all(vec.a.n == 0 and vec.b.n == d for vec in (layout.key, layout.value))
    kv_bits = (layout.key.b.bits, layout.value.b.bits)
    bits = set(kv_bits)
    tables.hopper_codes = tables.hopper_asm = tables.hopper_lut = tables.hopper_klut = None
    if single and kv_bits == (5, 4) and d == 128:
        levels = codebook(d, 4)[0]
        tables.hopper_codes = 5
        tables.hopper_asm = {(5, "k"): lut5_ptx.key_asm(),
                             (5, "v"): operand_asm(levels4_asm(levels), 4)}
        tables.hopper_lut = table_words(levels)
        tables.hopper_klut = lut5_ptx.table_words(codebook(d, 5)[0])
    elif single:
        if bits == {4}:
            levels = codebook(d, 4)[0]
            asm = {4: operand_asm(levels4_asm(levels), 4), 2: operand_asm(bytes_asm(levels), 2)}
            tables.hopper_codes = 4
            tables.hopper_asm = {(c, s): a for c, a in asm.items() for s in ("k", "v")}
            tables.hopper_lut = table_words(levels)
        elif bits == {3} and d == 128:
            tables.hopper_codes = 3
            tables.hopper_asm = {(3, "k"): lut3_ptx.key_asm(), (3, "v"): lut3_ptx.value_asm()}
            tables.hopper_lut = lut3_ptx.table_words(codebook(d, 3)[0])
    return tables
