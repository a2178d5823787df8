"""PTX of the Hopper decode's 3-bit lookup (kernels/tq_decode_hopper.py, CODES = 3): packed 3-bit
codes (packing.py: 8 codes in every 3 bytes, little-endian) to bf16 MMA operand pairs.

A prmt selector nibble (bit 3 clear: byte select, no sign replication) looks a code up in the
8-level codebook's low and high bytes (two prmt on the table words, operands held in registers,
four codes a prmt), and two more prmt pair the bytes into bf16 levels. The symmetric codebook
needs no sign trick here: 8 levels fit prmt's 8-byte table. Getting the 3-bit codes into
nibbles is most of the work:

``key_asm``: inline_asm_elementwise(pack=4) on int32 words: $16..$18 are three words of a token's
key codes (32 codes: word w holds the stream bits [32w, 32w + 32)), $19 is ignored. Per 24-bit
group of 8 codes ``_spread`` moves code k from bit 3k to nibble k (three shift-and-select steps
and an and, 7 instructions). Output j ($2j, $2j + 1) holds codes 4j + i of element i (i = 0..3,
two bf16 a register): register $k = codes (2k, 2k + 1).
``value_asm``: inline_asm_elementwise(pack=8) on int16 halfwords of two tokens (t0 in the low,
t1 in the high half of $16..$18; $19 ignored): 16 codes each, the two tokens as 16-bit lanes of
one register (4 codes a lane, spread by one mad, paired into selectors by two selects: 6
instructions per 8 codes); register $k = (t0, t1) levels of code k, so output o holds codes
4o + i of element slot i in both tokens.
Table words: $20, $20 + p, $20 + 2p, $20 + 3p (p = the pack): low bytes of levels 0-3, 4-7, high
bytes of levels 0-3, 4-7 (``table_words``).
"""

from __future__ import annotations

import torch


def table_words(levels: torch.Tensor) -> tuple[int, int, int, int]:
    """(low bytes of levels 0-3, 4-7, high bytes 0-3, 4-7) of 8 bf16 levels, as signed 32-bit
    integers (kernel arguments)."""
    lv = levels.to(torch.bfloat16)
    if lv.numel() != 8:
        raise ValueError("the 3-bit lookup needs a codebook of 8 levels")
    bits = [int(b) & 0xFFFF for b in lv.view(torch.int16).tolist()]

    def word(bs):
        w = bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24
        return w - (1 << 32) if w >= 1 << 31 else w

    lo = [b & 0xFF for b in bits]
    hi = [b >> 8 for b in bits]
    return word(lo[:4]), word(lo[4:]), word(hi[:4]), word(hi[4:])


# lop3 immediate: c ? a : b (bitwise), the select that merges a shifted copy into place
SEL = "0xE4"


def _spread(g: str, s: str) -> str:
    """s = the 8 codes of g's low 24 bits, code k in nibble k (bits above 24 of g ignored): three
    shift-and-select steps (codes 4-7 to the high half, then 2-3 of each half to its high byte,
    then the odd codes to their high nibble), each leaving only garbage that a nibble's bit 3 or
    the steps after ignore, and one and to clear those bits 3 (prmt's sign mode)."""
    return f"""shl.b32 t, {g}, 4;
lop3.b32 {s}, t, {g}, 0xFFFF0000, {SEL};
shl.b32 t, {s}, 2;
lop3.b32 {s}, t, {s}, 0xFF00FF00, {SEL};
shl.b32 t, {s}, 1;
lop3.b32 {s}, t, {s}, 0xF0F0F0F0, {SEL};
and.b32 {s}, {s}, 0x77777777;
"""


def _look(s: str, outs: tuple[str, str, str, str]) -> str:
    """outs = bf16 pairs of (nibbles 0, 1), (2, 3), (4, 5), (6, 7) of selector s (s is consumed)."""
    return f"""prmt.b32 la, tl0, tl1, {s};
prmt.b32 ha, th0, th1, {s};
shr.b32 {s}, {s}, 16;
prmt.b32 lb, tl0, tl1, {s};
prmt.b32 hb, th0, th1, {s};
prmt.b32 {outs[0]}, la, ha, 0x5140;
prmt.b32 {outs[1]}, la, ha, 0x7362;
prmt.b32 {outs[2]}, lb, hb, 0x5140;
prmt.b32 {outs[3]}, lb, hb, 0x7362;
"""


def _tables(pack: int) -> str:
    return (f"mov.b32 tl0, ${20}; mov.b32 tl1, ${20 + pack}; mov.b32 th0, ${20 + 2 * pack}; "
            f"mov.b32 th1, ${20 + 3 * pack};\n")


def key_asm() -> str:
    body = """shr.b32 g1, $16, 24;
shl.b32 t, $17, 8;
or.b32 g1, g1, t;
shr.b32 g2, $17, 16;
shl.b32 t, $18, 16;
or.b32 g2, g2, t;
shr.b32 g3, $18, 8;
"""
    for q, g in enumerate(("$16", "g1", "g2", "g3")):
        body += _spread(g, "s") + _look("s", tuple(f"${4 * q + p}" for p in range(4)))
    return ("{\n.reg .b32 g1, g2, g3, s, t, la, ha, lb, hb, tl0, tl1, th0, th1;\n"
            + _tables(4) + body + "}")


def _look4(s: str, outs: tuple[str, str]) -> str:
    """outs = bf16 pairs of (nibbles 0, 1) and (2, 3) of selector s (its low 16 bits)."""
    return f"""prmt.b32 la, tl0, tl1, {s};
prmt.b32 ha, th0, th1, {s};
prmt.b32 {outs[0]}, la, ha, 0x5140;
prmt.b32 {outs[1]}, la, ha, 0x7362;
"""


def value_asm() -> str:
    # Halfword h of $16..$18 holds stream bits [16i, 16i + 16) of token h: the 16-bit halves are
    # two lanes, one a token. X holds codes 4q..4q+3 of both tokens (12 bits at the bottom of each
    # lane, the rest zero); mad moves codes 2, 3 of each lane up 2 bits (a lane byte: [even code,
    # odd code, 0, 0]); then the selector of codes (4q, 4q + 2) takes t0's even codes from X and
    # t1's from X >> 12 into nibbles (t0, t1, t0, t1), that of (4q + 1, 4q + 3) the odd ones the
    # same way 3 bits higher (then shifted down); the zero bits of the lanes land in the nibbles'
    # bits 3.
    body = """and.b32 x0, $16, 0x0FFF0FFF;
prmt.b32 x1, $16, $17, 0x6341;
shr.b32 x1, x1, 4;
and.b32 x1, x1, 0x0FFF0FFF;
prmt.b32 x2, $17, $18, 0x6341;
and.b32 x2, x2, 0x0FFF0FFF;
shr.b32 x3, $18, 4;
and.b32 x3, x3, 0x0FFF0FFF;
"""
    for q in range(4):
        x = f"x{q}"
        body += f"""and.b32 t, {x}, 0x0FC00FC0;
mad.lo.u32 {x}, t, 3, {x};
shr.b32 t, {x}, 12;
lop3.b32 lo, {x}, t, 0x8787, {SEL};
lop3.b32 hi, {x}, t, 0x7878, {SEL};
shr.b32 hi, hi, 3;
"""
        body += _look4("lo", (f"${4 * q}", f"${4 * q + 2}"))
        body += _look4("hi", (f"${4 * q + 1}", f"${4 * q + 3}"))
    return ("{\n.reg .b32 x0, x1, x2, x3, lo, hi, t, la, ha, tl0, tl1, th0, th1;\n"
            + _tables(8) + body + "}")
