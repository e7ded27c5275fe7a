"""Per-tensor digests that prove a tensor's bytes arrived intact, computed where the tensor lives.

Choice: two 64-bit sums over the tensor's bytes read as little-endian int32 words, ``s1 = sum(w_i)``
and ``s2 = sum(w_i * (i mod 65521 + 1))``, both modulo 2**64 (the tail bytes of a size that is not a
multiple of 4 form one zero-padded last word). Why this and not a CRC or a hash:

- it runs on the tensor's own device as two integer reductions (no copy of the bytes to the host,
  only 16 bytes come back), chunked so its scratch memory stays bounded;
- integer addition modulo 2**64 is associative, so CPU and GPU, any reduction order, give the same
  value: the sender (GPU) and the receiver (CPU or GPU) compare digests computed on different devices;
- ``s1`` changes for every single corrupted word (any nonzero change below 2**32 is nonzero modulo
  2**64): every flipped bit or byte is caught; ``s2`` catches words that arrive in the wrong order
  (a swapped or shifted chunk) whenever their weights differ.

It is a transport check, not a cryptographic one: a sender that wants to forge bytes can.
"""

from __future__ import annotations

import torch

from ..errors import ConversionTypeError

#: Position weights cycle with this prime period (keeps ``w * weight`` far below 2**63).
PERIOD = 65521
#: Words reduced per chunk: scratch memory is bounded by this many int64 values (32 MiB).
CHUNK_WORDS = 1 << 22

Digest = tuple[int, int]


def digest(tensor: torch.Tensor) -> Digest:
    """``(s1, s2)`` of ``tensor``'s bytes (its contiguous layout), as two Python ints in [0, 2**64)."""
    if not isinstance(tensor, torch.Tensor):
        raise ConversionTypeError(f"digest needs a torch.Tensor, got {type(tensor).__name__}")
    return tuple(int(v) % (1 << 64) for v in digest_on_device(tensor).tolist())  # type: ignore[return-value]


def digest_on_device(tensor: torch.Tensor) -> torch.Tensor:
    """The digest as an int64 tensor ``[s1, s2]`` on ``tensor``'s device (no host sync)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    whole = raw.numel() // 4 * 4
    words = raw[:whole].view(torch.int32)
    sums = torch.zeros(2, dtype=torch.int64, device=raw.device)
    for start in range(0, words.numel(), CHUNK_WORDS):
        chunk = words[start : start + CHUNK_WORDS].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=raw.device)
        weights.remainder_(PERIOD).add_(1)
        sums[0] += chunk.sum()
        sums[1] += (chunk * weights).sum()
    if whole < raw.numel():  # the tail: one zero-padded little-endian word
        tail = raw[whole:].to(torch.int64)
        shifts = torch.tensor([0, 8, 16, 24][: tail.numel()], dtype=torch.int64, device=raw.device)
        word = (tail << shifts).sum()
        word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # as int32, like the other words
        sums[0] += word
        sums[1] += word * ((whole // 4) % PERIOD + 1)
    return sums
