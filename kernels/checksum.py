"""The wsum64-v1 checksum (vllm_gds/checksum.py) in one pass over the bytes.

Each program weights BLOCK int32 words by their 1-based position and writes one
int64 partial sum; the partials are summed by torch. Products and sums wrap
modulo 2**64 (two's complement), exactly like the torch reference, so the
result is bit-identical whatever the block size.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _weighted_word_sums(words_ptr, partial_ptr, n_words, first_position, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offsets < n_words
    words = tl.load(words_ptr + offsets, mask=mask, other=0).to(tl.int64)
    positions = offsets + first_position
    tl.store(partial_ptr + pid, tl.sum(words * positions, axis=0))


def weighted_word_sum(words: torch.Tensor, first_position: int = 1, block: int = 4096) -> torch.Tensor:
    """sum_i words[i] * (first_position + i) mod 2**64, as a 0-d int64 tensor on the words' device."""
    assert words.dtype == torch.int32 and words.dim() == 1 and words.is_contiguous()
    n_words = words.numel()
    programs = triton.cdiv(n_words, block)
    partial = torch.empty(max(programs, 1), dtype=torch.int64, device=words.device)
    if programs == 0:
        return partial[:0].sum()
    _weighted_word_sums[(programs,)](words, partial, n_words, first_position, BLOCK=block)
    return partial.sum()
