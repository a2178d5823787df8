"""SASS and PTX digests (sm_90, no GPU) of the served launches of tq_attention and tq_store (and
the split reduce), to show that a refactor leaves them byte-identical:
python benchmarks/dev/kv_sass_served.py OUT.json [--dump DIR] [--only decode,decode/4,prefill,store]

The launchers run as the backend calls them (tq4 / tq3 / tq5, calibrated and plain, decode with 1
and 4 splits on the portable kernel, a prefill chunk, the store) with CachedLaunch recording the
launches; each is compiled through Triton's own binder and specialization (the GPU's constexprs,
dtypes and divisibility), in a fresh Triton cache. ptxas (CUDA 12.8 in Triton 3.6) chooses some
spill slots and registers by memory addresses: the same PTX gave two different SASS in six runs;
it runs here without address randomization (setarch -R) and with an empty environment, which
makes it repeatable. Compare two trees' OUT.json: identical PTX means identical input to ptxas.
"""
import hashlib, json, os, platform, subprocess, sys, tempfile
from pathlib import Path

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="served_sass_cache_")  # no stale hits

import _source_tree  # noqa: F401  this tree's vllm_gds importable
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from triton import knobs

from vllm_gds.kernels import launch as launch_mod
from vllm_gds.kvcache.calibration_file import top_pairs
from vllm_gds.kvcache.formats import FORMATS
from vllm_gds.kvcache.tables import LayerTables

TARGET = GPUTarget("cuda", 90, 32)

# ptxas (CUDA 12.8 in Triton 3.6) picks spill slots by memory addresses: the same PTX gives
# different SASS from run to run. Without address randomization and with an empty environment
# it is deterministic, so Triton's own ptxas command runs that way here.
import triton.backends.nvidia.compiler as _nvc
_run = subprocess.run


def _fixed_run(cmd, *a, **k):
    if isinstance(cmd, list) and str(cmd[0]).endswith("ptxas"):
        cmd = ["setarch", platform.machine(), "-R", "env", "-i", *map(str, cmd)]
    return _run(cmd, *a, **k)


_nvc.subprocess.run = _fixed_run
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
LOG = []
launch_mod.CachedLaunch.__call__ = lambda self, grid, args, meta, compiled: LOG.append(
    (self.fn, grid, args, dict(meta)))


def tables_of(name, heads, calibrated, d=128):
    if not calibrated:
        return LayerTables(FORMATS[name], d, 0, 0, "cpu", torch.bfloat16, heads)
    torch.manual_seed(0)
    mu = top_pairs(torch.randn(heads, d), None, FORMATS[name].key_mean_pairs, d // 2)
    return LayerTables(FORMATS[name], d, 0, 0, "cpu", torch.bfloat16, heads, key_mean=mu,
                       rope_inv_freq=torch.ones(d // 2), key_scale=torch.rand(heads, d) + 0.5,
                       value_mean=torch.randn(heads, d))


def cases(name, calibrated, batch, hq, hk, d=128):
    """kv_launch_cost's served calls (decode, decode/4, prefill, store) on meta tensors."""
    import kv_launch_cost
    kv_launch_cost._tables = lambda n, heads, d=128, device="meta": tables_of(n, heads, calibrated, d)
    return dict(kv_launch_cost._cases(batch, hq, hk, d, name))


def real(a):
    if isinstance(a, torch.Tensor):
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype)
    return a


def compile_launch(fn, args, meta):
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(meta)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, options = binder(*[real(a) for a in args], **kwargs)
    options, sig, cx, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(fn, sig, cx, attrs), target=TARGET, options=options.__dict__)


def sass(kernel):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.cubin"
        p.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(BIN / "cuobjdump"), "-sass", str(p)], check=True,
                              capture_output=True, text=True).stdout


def main():
    out = sys.argv[1]
    dump = Path(sys.argv[sys.argv.index("--dump") + 1]) if "--dump" in sys.argv else None
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    configs = [("tq4", True, 32, 32, 8), ("tq4", True, 1, 8, 1), ("tq4", False, 32, 32, 8),
               ("tq3", True, 32, 32, 8), ("tq5", True, 32, 32, 8)]
    seen, rows = {}, {}
    for name, cal, b, hq, hk in configs:
        for label, call in cases(name, cal, b, hq, hk).items():
            if only and label not in only:
                continue
            LOG.clear()
            call()
            for fn, grid, args, meta in LOG:
                if fn.__name__ not in ("_tq_attention_kernel", "_tq_store_kernel", "_tq_reduce_kernel"):
                    continue
                tag = f"{name}{'' if cal else '-plain'} G{hq // hk} {label} {fn.__name__}"
                key = (fn.__name__, repr(sorted((k, repr(v)) for k, v in meta.items())),
                       repr([(type(real(a)).__name__, getattr(a, 'dtype', None), a if isinstance(a, int) and not isinstance(a, bool) and (a == 1 or a % 16 == 0) else None) for a in args]))
                if key in seen:
                    rows[tag] = rows[seen[key]]
                    continue
                seen[key] = tag
                kern = compile_launch(fn, args, meta)
                s = sass(kern)
                h = hashlib.sha256(s.encode()).hexdigest()[:16]
                p = hashlib.sha256(kern.asm["ptx"].encode()).hexdigest()[:16]
                n = sum(1 for line in s.splitlines() if line.strip().startswith("/*") and ";" in line)
                rows[tag] = {"sass": h, "ptx": p, "instrs": n}
                if dump:
                    dump.mkdir(parents=True, exist_ok=True)
                    (dump / (tag.replace(" ", "_").replace("/", "-") + ".sass")).write_text(s)
                    (dump / (tag.replace(" ", "_").replace("/", "-") + ".ptx")).write_text(kern.asm["ptx"])
                print(f"{tag:<42} sass {h} ptx {p} {n}", flush=True)
    Path(out).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
