"""PTX of the Hopper decode's 3-bit lookup (kernels/tq_decode_hopper.py, CODES = 3): packed 3-bit
codes (packing.py: 8 codes in every 3 bytes, little-endian) to bf16 MMA operand pairs.

Per 24-bit group of 8 codes: ``_SPREAD`` moves code k from bit 3k to bit 4k (three shift-and-merge
steps), so each nibble is a prmt selector (bit 3 clear: byte select, no sign replication); two
prmt look the nibbles up in the 8-level codebook's low and high bytes (the table words, operands
held in registers), and two more pair the bytes into bf16 levels. The symmetric codebook needs no
sign trick here: 8 levels fit prmt's 8-byte table.

``key_asm``: inline_asm_elementwise(pack=4) on int32 words: $16..$18 are three words of a token's
key codes (32 codes: word w holds the stream bits [32w, 32w + 32)), $19 is ignored; output j
($2j, $2j + 1) holds codes 4j + i of element i (i = 0..3, two bf16 a register): register
$k = codes (2k, 2k + 1).
``value_asm``: inline_asm_elementwise(pack=8) on int16 halfwords of two tokens (t0 in the low,
t1 in the high half of $16..$18; $19 ignored): 16 codes each; register $k = (t0, t1) levels of
code k, so output o holds codes 4o + i of element slot i in both tokens.
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


def _spread(g: str, s: str) -> str:
    """s = the 8 codes of g's low 24 bits, code k in nibble k (bits above 24 of g ignored)."""
    return f"""shl.b32 t, {g}, 4;
and.b32 t, t, 0x0FFF0000;
and.b32 {s}, {g}, 0xFFF;
or.b32 {s}, {s}, t;
shl.b32 t, {s}, 2;
and.b32 t, t, 0x3F003F00;
and.b32 {s}, {s}, 0x003F003F;
or.b32 {s}, {s}, t;
shl.b32 t, {s}, 1;
and.b32 t, t, 0x70707070;
and.b32 {s}, {s}, 0x07070707;
or.b32 {s}, {s}, t;
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


def value_asm() -> str:
    # token t's 48 stream bits: a_t (halfwords 0, 1) and c_t (halfword 2); groups A = bits 0-23,
    # B = bits 24-47. Both tokens' selectors interleaved nibble by nibble: byte k of lo = (t0, t1)
    # code 2k of the group, of hi = code 2k + 1.
    body = """prmt.b32 a0, $16, $17, 0x5410;
prmt.b32 a1, $16, $17, 0x7632;
and.b32 c0, $18, 0xFFFF;
shr.b32 c1, $18, 16;
shr.b32 b0, a0, 24;
shl.b32 t, c0, 8;
or.b32 b0, b0, t;
shr.b32 b1, a1, 24;
shl.b32 t, c1, 8;
or.b32 b1, b1, t;
"""
    for grp, (g0, g1) in enumerate((("a0", "a1"), ("b0", "b1"))):
        base = 8 * grp
        body += _spread(g0, "s0") + _spread(g1, "s1")
        body += """and.b32 lo, s0, 0x0F0F0F0F;
shl.b32 t, s1, 4;
and.b32 t, t, 0xF0F0F0F0;
or.b32 lo, lo, t;
shr.b32 hi, s0, 4;
and.b32 hi, hi, 0x0F0F0F0F;
and.b32 t, s1, 0xF0F0F0F0;
or.b32 hi, hi, t;
"""
        body += _look("lo", tuple(f"${base + k}" for k in (0, 2, 4, 6)))
        body += _look("hi", tuple(f"${base + k}" for k in (1, 3, 5, 7)))
    return ("{\n.reg .b32 a0, a1, b0, b1, c0, c1, s0, s1, lo, hi, t, la, ha, lb, hb, "
            "tl0, tl1, th0, th1;\n" + _tables(8) + body + "}")
