"""Relaunching a compiled Triton kernel without Triton's per-call argument binding.

`kernel[grid](...)` binds and specializes every argument on every call: with Triton 3.6 its
binder and cache key alone took 34-44 us per call of the attention kernel (37 runtime arguments,
~50 constexprs; benchmarks/RESULTS.md, issue 15), more than the decode kernel runs at small
batches. `CachedLaunch` makes the first call of a launch plan through Triton as usual, keeps the
`CompiledKernel` it returns in the plan's own dict, and launches that directly afterwards
(`CompiledKernel[grid](*args)`, the launcher Triton itself calls) for calls whose runtime
arguments specialize the same way. The key holds each runtime argument's dtype and 16-byte
pointer alignment, and for integers whether they equal 1, divide by 16 and fit in 32 bits:
everything Triton specializes a launch on. The plan's constexprs and options never change (the
cache lives and dies with the plan). Where Triton returns no compiled kernel (the CPU
interpreter), every call goes through Triton. Checked on an H100 with Triton 3.6 (RESULTS.md,
"Decode with the Hopper kernel served"): the same output bytes as Triton's own launch for the
attention, reduce, store and Gluon kernels; a decode call's host time about 48 us, from about 120.
"""

from __future__ import annotations

import inspect

import torch

_I32 = 1 << 31


def _spec(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return bool, a
    if isinstance(a, int):
        return int, a == 1, a % 16 == 0, -_I32 <= a < _I32
    return type(a)


class CachedLaunch:
    """Launches of `fn`, a @triton.jit kernel whose runtime parameters all come before its
    constexpr parameters: runtime arguments positionally, constexprs and launch options as the
    plan's `meta`, compiled kernels kept in the plan's `compiled` dict."""

    def __init__(self, fn):
        self.fn = fn
        # From the Python signature, so that the interpreter's functions describe themselves too.
        params = list(inspect.signature(getattr(fn, "fn", fn)).parameters.values())
        is_const = ["constexpr" in str(p.annotation) for p in params]
        runtime = is_const.index(True) if True in is_const else len(params)
        if not all(is_const[runtime:]):
            raise TypeError(f"{fn.__name__}: runtime parameters must come before constexprs")
        self._const_names = tuple(p.name for p in params[runtime:])
        self._defaults = {p.name: p.default for p in params[runtime:]
                          if p.default is not inspect.Parameter.empty}
        self._compiles = hasattr(fn, "params")  # False: the interpreter's function, never cached

    def const_values(self, meta: dict) -> tuple:
        """The constexprs in signature order: the plan's, else the kernel's defaults."""
        try:
            return tuple(meta[n] if n in meta else self._defaults[n] for n in self._const_names)
        except KeyError as e:
            raise TypeError(f"{self.fn.__name__}: constexpr {e} neither given nor defaulted") from None

    def __call__(self, grid, args: tuple, meta: dict, compiled: dict, varying=None,
                 stream: int | None = None) -> None:
        """varying: None, or a function picking from args those that may change from call to
        call of this plan (operator.itemgetter): the rest (the layer's tables) are the same
        objects every call, so their specialization is the first call's and is left out of the
        key (a decode call's host time: each argument's key costs ~0.3 us). stream: the current
        raw CUDA stream where the caller has looked it up already."""
        index = args[0].get_device()
        key = (index, tuple(map(_spec, args if varying is None else varying(args))))
        hit = compiled.get(key)
        if hit is not None:
            kernel, consts = hit
            if stream is None:
                stream = torch._C._cuda_getCurrentRawStream(index)
            kernel[(*grid, 1, 1)[:3]](*args, *consts, stream=stream)
            return
        kernel = self.fn[grid](*args, **meta)
        if self._compiles and index >= 0 and hasattr(kernel, "function"):
            compiled[key] = (kernel, self.const_values(meta))
