"""Host side of the Hopper tq4 decode (kernels/tq_decode_hopper.py): its nibble-lookup PTX.

The kernel reuses tq_lut4's prmt lookup (lut4_ptx.levels4_asm) at head sizes 64 and 128 (the
portable kernel's register path takes 128 only, so LayerTables.lut4_asm lacks 64). ``attach``
gives a layer's tables the attribute the kernel reads; the coordinate permutations and the
permuted Hadamard blocks are made by the kernel module from the tables (kernels/ reads tables by
attribute and never imports this package).
"""

from __future__ import annotations

from .codebook import codebook
from .lut4_ptx import levels4_asm


def attach(tables):
    """Set tables.hopper_asm = {"k": PTX, "v": PTX} where keys and values are single 4-bit
    streams (else None); returns tables."""
    layout = tables.layout
    d = layout.head_size
    asm = {}
    for name, vec in (("k", layout.key), ("v", layout.value)):
        if vec.a.n == 0 and vec.b.bits == 4 and vec.b.n == d:
            asm[name] = levels4_asm(codebook(d, 4)[0])
    tables.hopper_asm = asm if len(asm) == 2 else None
    return tables
