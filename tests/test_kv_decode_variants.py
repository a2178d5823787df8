"""benchmarks/dev/kv_decode_phases.py times source variants of the Hopper decode kernel: text edits
of kernels/tq_decode_hopper.py (kv_decode_variants.py) and the phase stamps. Each edit names text
that must be found in the kernel's source; a change to the kernel that moves that text breaks the
GPU run of the script, which costs device time to find. This checks on the CPU that every variant
applies, with the stamps and without, and gives Python source."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "dev"))
import kv_decode_phases  # noqa: E402
import kv_decode_variants  # noqa: E402


@pytest.mark.parametrize("variant", sorted(kv_decode_variants.SOURCE_VARIANTS))
@pytest.mark.parametrize("stamps", [False, True])
def test_variant_applies_to_the_kernel_source(variant, stamps):
    src = kv_decode_phases.instrumented_source(variant, stamps)
    compile(src, f"tq_decode_hopper_{variant}.py", "exec")
    assert ("_stamp(stamp_ptr" in src) == stamps


def test_wht_tables_invert_the_slot_maps():
    """The wht variant's gather and scatter tables: x @ H[:, A] = WHT(x[gather]) and
    y @ H[A, :] = WHT(y) at the columns `scatter` (A: the kernel's slot maps, every format)."""
    import torch

    from vllm_gds.kernels import tq_decode_hopper_host as hh
    from vllm_gds.kvcache.rotation import hadamard_pm1

    for d, codes in ((128, 4), (128, 3), (128, 5), (64, 4)):
        kperm, vperm = hh.slot_maps(d, codes)
        gather, scatter = kv_decode_variants.wht_tables(d, codes, "cpu")
        h = hadamard_pm1(d).double()
        x = torch.randn(16, d, dtype=torch.float64)
        assert torch.allclose(x[:, gather.long()] @ h, x @ h[:, kperm])
        out = torch.empty(16, d, dtype=torch.float64)
        out[:, scatter.long()] = x @ h
        assert torch.allclose(out, x @ h[vperm, :])
