"""Compile the KV kernels for sm_90 without a GPU (Triton's bundled ptxas) and count SASS
instructions: a cheap look at what the GPU will run, before spending device time. Imported by
kv_sass_attention.py and kv_sass_store.py (this module has no command of its own).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, types: dict, constexprs: dict, num_warps=4, num_stages=3,
                 divisible=(), maxnreg=None):
    """divisible: argument names a launch would specialize as divisible by 16 (pointers from
    torch, strides that are multiples of 16), which lets Triton vectorize loads and stores."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs or None)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=TARGET, options=options)


BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def disassemble(kernel) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(BIN / "cuobjdump"), "-sass", str(path)], check=True,
                              capture_output=True, text=True).stdout


INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_stats(kernel):
    """(op counts of the whole kernel, op counts of its largest loop body, sass text)."""
    sass = disassemble(kernel)
    instrs = [(int(m.group(1), 16), m.group(3).split(".")[0], m.group(4))
              for m in map(INSTR.match, sass.splitlines()) if m]
    total = collections.Counter(op for _, op, _ in instrs)
    best = collections.Counter()
    for addr, op, rest in instrs:
        t = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and t and int(t.group(1), 16) < addr:
            body = collections.Counter(o for a, o, _ in instrs if int(t.group(1), 16) <= a <= addr)
            if sum(body.values()) > sum(best.values()):
                best = body
    return total, best, sass


def report(name, kernel, per=None):
    """Print instruction counts; per = codes (or tokens) handled by one pass of the main loop."""
    total, loop, sass = sass_stats(kernel)
    ptx = kernel.asm["ptx"]
    regs = re.search(r"\.maxnreg|\.reg \.b32\s+%r<(\d+)>", ptx)
    local = "ld.local" in ptx or "st.local" in ptx
    top = ", ".join(f"{k} {v}" for k, v in loop.most_common(12))
    n = sum(loop.values())
    extra = f" = {n / per:.2f} per code" if per else ""
    print(f"{name}: {sum(total.values())} SASS, loop {n}{extra}, shared {kernel.metadata.shared} B, "
          f"local memory {local}\n  loop: {top}")
    return sass
