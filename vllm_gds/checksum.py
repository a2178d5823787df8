"""A checksum computed where the bytes land: on the GPU at device speed, or on the CPU.

``wsum64-v1``: the tensor's bytes are read as little-endian int32 words w_i (a
tail of 1-3 bytes as single bytes b_j); the checksum is

    sum_i w_i * (i + 1)  +  sum_j b_j * (n_words + j + 1)      (mod 2**64)

Weighting by position catches flipped bits, swapped words and shifted data; a
sum modulo 2**64 is the same whatever order the device reduces in, so the CPU
that wrote the shards and the GPU that reads them agree. It guards against
corruption, not against an adversary.

On a GPU a Triton kernel (vllm_gds/kernels/checksum.py) computes the word sum in
one pass; elsewhere torch does, in bounded chunks.
"""

import torch

ALGORITHM = "wsum64-v1"

# Words per step: bounds the temporary memory to about 3 x 8 bytes x this.
_CHUNK_WORDS = 1 << 22
_weights: dict[torch.device, torch.Tensor] = {}


def _position_weights(device: torch.device) -> torch.Tensor:
    weights = _weights.get(device)
    if weights is None:
        weights = torch.arange(1, _CHUNK_WORDS + 1, dtype=torch.int64, device=device)
        _weights[device] = weights
    return weights


def checksum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The checksum of a contiguous tensor's bytes, as a 0-d int64 tensor on its device.

    Returns a tensor (no host synchronisation) so that callers can check many
    tensors and synchronise once.
    """
    if not tensor.is_contiguous():
        raise ValueError("checksum_tensor needs a contiguous tensor")
    data = tensor.reshape(-1).view(torch.uint8)
    device = data.device
    total = torch.zeros((), dtype=torch.int64, device=device)
    n_words = data.numel() // 4
    if n_words and device.type == "cuda":
        from vllm_gds.kernels.checksum import weighted_word_sum  # one pass over the bytes

        total += weighted_word_sum(data[: n_words * 4].view(torch.int32))
    elif n_words:
        words = data[: n_words * 4].view(torch.int32)
        weights = _position_weights(device)
        for start in range(0, n_words, _CHUNK_WORDS):
            chunk = words[start : start + _CHUNK_WORDS].to(torch.int64)
            position = weights[: chunk.numel()]
            total += (chunk * position).sum() + chunk.sum() * start
    tail = data[n_words * 4 :]
    if tail.numel():
        position = torch.arange(
            n_words + 1, n_words + 1 + tail.numel(), dtype=torch.int64, device=device
        )
        total += (tail.to(torch.int64) * position).sum()
    return total


def format_checksum(value: int) -> str:
    """The manifest's spelling: 16 hex digits of the unsigned 64-bit value."""
    return f"{value & 0xFFFFFFFFFFFFFFFF:016x}"


def checksum_hex(tensor: torch.Tensor) -> str:
    return format_checksum(int(checksum_tensor(tensor).item()))
