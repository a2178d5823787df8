"""The one-pass Triton checksum (used on GPUs) equals the torch reference bit for bit.

Runs the kernel in Triton's interpreter on CPU tensors; the GPU machine runs it at full size.
"""

import pytest
import torch

from vllm_gds.kernels.checksum import weighted_word_sum
from vllm_gds import checksum


def _reference(words: torch.Tensor, first_position: int) -> int:
    total = sum(int(w) * (first_position + i) for i, w in enumerate(words.tolist()))
    return total & 0xFFFFFFFFFFFFFFFF


@pytest.mark.parametrize("n_words, block", [(1, 64), (1000, 64), (4096, 256), (5000, 1024)])
@pytest.mark.parametrize("first_position", [1, 2**40 + 3])  # large positions make products wrap
def test_kernel_matches_python_integers(n_words, block, first_position):
    g = torch.Generator().manual_seed(n_words)
    words = torch.randint(-(2**31), 2**31 - 1, (n_words,), dtype=torch.int32, generator=g)
    got = int(weighted_word_sum(words, first_position, block).item()) & 0xFFFFFFFFFFFFFFFF
    assert got == _reference(words, first_position)


def test_kernel_matches_the_torch_checksum():
    data = torch.randint(0, 256, (4 * 3000,), dtype=torch.uint8)
    words = data.view(torch.int32)
    kernel = int(weighted_word_sum(words).item())
    assert checksum.format_checksum(kernel) == checksum.checksum_hex(data)
