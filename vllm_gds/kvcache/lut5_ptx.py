"""PTX of the Hopper decode's 5-bit key lookup (kernels/tq_decode_hopper.py, tq5's keys; its 4-bit
values take the 4-bit lookup): packed 5-bit codes (packing.py: 8 codes in every 5 bytes,
little-endian) to bf16 MMA operand pairs, in registers.

A lane's 32 key codes are its 20 bytes (5 int32 words). The codebook is symmetric (level[31 - c]
= -level[c]): a code is (s, c4), s = bit 4 (1: positive), and its level is +-|level[m]| with
m = c4 for a negative code and 15 - c4 for a positive one. The 16 magnitudes |level[0..15]| are
looked up with prmt in four 8-byte tables (``table_words``: low and high bytes of entries 0-7 and
8-15), selecting between the two halves on m's bit 3 (one lop3 per output word) and ORing the
sign into the high bytes.

Steps (``key_asm``; about 150 PTX instructions per 32 codes, ~110 ALU instructions in SASS):
1. Planes: byte j of plane q is byte 5j + q of the lane's 20 bytes (11 prmt), so byte j of the
   five planes holds the 40-bit group j (codes 8j .. 8j + 7) and every code sits at the same bits
   of every byte: what follows works on the four groups at once, one per byte.
2. Four pairs of codes (a, b) = (0, 4), (7, 3), (5, 1), (2, 6) of each group: a nibble word c with
   a's low four bits in the low nibble of byte j and b's in the high nibble (1-4 instructions a
   pair: shifts and selects of the planes); the sign bits of a and b moved to a byte's top bit and
   replicated (prmt's sign mode); m = c ^ (0xF where positive); m & 7 is the prmt selector, m's
   bit 3 (replicated, tq_lut4's trick) the half select, the sign the high byte's top bit.
3. Two prmt pairs (low and high bytes) into bf16 pairs: register 4p + j holds (code a_p, code b_p)
   of group j (low half: a), p the pair (PAIRS; the kernel's coordinate() follows it).

Operands (inline_asm_elementwise, pack 8, int32): $0..$15 the outputs (output p = $4p .. $4p + 3:
pair p of groups 0-3), $16..$20 the lane's five words ($21..$23 ignored), the table words at $24,
$32, ..., $80 (an int32 operand with pack 8 takes 8 registers, of which the first is read).
"""

from __future__ import annotations

import torch

# (low nibble, high nibble) code of each output: output p's element e (0..7) holds code
# 8 (e // 2) + PAIRS[p][e % 2] of the lane's 32 (tq_decode_hopper_host.coordinate, K5_PAIRS)
PAIRS = ((0, 4), (7, 3), (5, 1), (2, 6))


def table_words(levels: torch.Tensor) -> tuple[int, ...]:
    """(low bytes of table entries 0-3, 4-7, 8-11, 12-15, high bytes of the same) as signed 32-bit
    integers: entry i is |level[i]| (= level[31 - i], the magnitude of index 15 - i) of a
    symmetric 32-level codebook in bf16; the lookup indexes it by m = c4 (negative code) or
    15 - c4 (positive)."""
    lv = levels.to(torch.bfloat16)
    if lv.numel() != 32 or not torch.equal(lv[16:], -lv[:16].flip(0)) or (lv[16:] < 0).any():
        raise ValueError("the 5-bit lookup needs a symmetric codebook of 32 levels")
    bits = [int(b) & 0xFFFF for b in lv[16:].flip(0).view(torch.int16).tolist()]

    def word(bs):
        w = bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24
        return w - (1 << 32) if w >= 1 << 31 else w

    lo = [b & 0xFF for b in bits]
    hi = [b >> 8 for b in bits]
    return tuple(word(t[4 * i:4 * i + 4]) for t in (lo, hi) for i in range(4))


# Planes: byte j of pq = byte 5j + q of the lane's bytes (w_t = bytes 4t .. 4t + 3)
_PLANES = """prmt.b32 a1, $16, $17, 0x6150;
prmt.b32 a2, $16, $17, 0x4372;
prmt.b32 a3, a2, $18, 0x5342;
prmt.b32 b1, $19, $20, 0x6150;
prmt.b32 b2, $19, $20, 0x4372;
prmt.b32 b3, $18, b2, 0x7362;
prmt.b32 p0, a1, b3, 0x5410;
prmt.b32 p1, a1, b3, 0x7632;
prmt.b32 p2, a2, b1, 0x5410;
prmt.b32 p3, a3, b1, 0x7610;
prmt.b32 p4, a3, b2, 0x5432;
"""

# Per pair: c (a's c4 in the low nibble, b's in the high nibble of every byte), sa / sb (the sign
# bits of a / b at each byte's bit 7). Code k of a group sits at its bits [5k, 5k + 5).
# lop3 immLut 0xE4: (a & c) | (b & ~c), a select by the mask c.
_NIBBLES = {
    (0, 4): """lop3.b32 c, p0, p2, 0x0F0F0F0F, 0xE4;
shl.b32 sa, p0, 3;
shl.b32 sb, p3, 7;
""",
    (7, 3): """lop3.b32 t, p4, p1, 0x7F7F7F7F, 0xE4;
shr.b32 t, t, 3;
shl.b32 u, p2, 5;
lop3.b32 c, t, u, 0x1F1F1F1F, 0xE4;
mov.b32 sa, p4;
shl.b32 sb, p2, 4;
""",
    (5, 1): """lop3.b32 t, p3, p0, 0x1F1F1F1F, 0xE4;
shr.b32 t, t, 1;
shl.b32 u, p1, 7;
lop3.b32 c, t, u, 0x7F7F7F7F, 0xE4;
shl.b32 sa, p3, 2;
shl.b32 sb, p1, 6;
""",
    (2, 6): """lop3.b32 t, p1, p3, 0x3F3F3F3F, 0xE4;
shr.b32 t, t, 2;
shl.b32 u, p4, 6;
lop3.b32 c, t, u, 0x3F3F3F3F, 0xE4;
shl.b32 sa, p1, 1;
shl.b32 sb, p4, 5;
""",
}

# c, sa, sb -> selectors and masks: f = 0xF in a nibble whose code is positive; m = c ^ f, the
# table index (15 - the magnitude index: c4 of a negative code, ~c4 of a positive one); ix / ih
# the selectors of output bytes 0-1 / 2-3; mk / mh m's bit 3 and sl / sh the sign (0xFF:
# positive) replicated per output byte (order: a j0, b j0, a j1, b j1).
_FOLD = """prmt.b32 r0, sa, sa, 0xBA98;
prmt.b32 r1, sb, sb, 0xBA98;
lop3.b32 f, r0, r1, 0x0F0F0F0F, 0xE4;
xor.b32 m, c, f;
and.b32 ix, m, 0x77777777;
shr.b32 ih, ix, 16;
shl.b32 m4, m, 4;
prmt.b32 mk, m4, m, 0xD9C8;
prmt.b32 mh, m4, m, 0xFBEA;
prmt.b32 sl, sa, sb, 0xD9C8;
prmt.b32 sh, sa, sb, 0xFBEA;
"""


def _look(sel: str, mask: str, sign: str, outs: tuple[str, str]) -> str:
    """outs = bf16 pairs of output bytes (0, 1) and (2, 3) of selector `sel` (lop3 0xF2: a | (~b
    & c), the sign into the high bytes)."""
    return f"""prmt.b32 l0, $24, $32, {sel};
prmt.b32 l1, $40, $48, {sel};
lop3.b32 l0, l1, l0, {mask}, 0xE4;
prmt.b32 h0, $56, $64, {sel};
prmt.b32 h1, $72, $80, {sel};
lop3.b32 h0, h1, h0, {mask}, 0xE4;
lop3.b32 h0, h0, {sign}, 0x80808080, 0xF2;
prmt.b32 {outs[0]}, l0, h0, 0x5140;
prmt.b32 {outs[1]}, l0, h0, 0x7362;
"""


def key_asm() -> str:
    body = _PLANES
    for p, pair in enumerate(PAIRS):
        body += _NIBBLES[pair] + _FOLD
        body += _look("ix", "mk", "sl", (f"${4 * p}", f"${4 * p + 1}"))
        body += _look("ih", "mh", "sh", (f"${4 * p + 2}", f"${4 * p + 3}"))
    return ("{\n.reg .b32 a1, a2, a3, b1, b2, b3, p0, p1, p2, p3, p4, t, u, c, sa, sb, r0, r1, "
            "f, m, ix, ih, m4, mk, mh, sl, sh, l0, l1, h0, h1;\n" + body + "}")
