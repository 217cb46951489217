"""Compressors for the neighbour exchange: what goes on the wire instead of the full state. Pure functions of
their inputs (and of a seeded generator where they are random).

Each compressor turns a dense vector into one 1-D ``uint8`` *payload* — exactly the bytes the transport sends —
and back. The payload's size depends only on the vector's length and dtype, so a receiver can post its buffer
before the message arrives.

- ``topk``: the ``ratio``·P entries of largest magnitude, as values then int32 indices.
- ``randk``: ``ratio``·P entries at indices drawn from the generator; only the values travel, the receiver draws
  the same indices from the same seed (run seed, sender, round).
- ``qsgd``: stochastic quantisation (Alistarh et al. 2017) to ``s = 2^(bits-1) - 1`` levels of the vector's
  largest magnitude (the per-message scale), a sign bit, ``bits`` bits per entry, packed; unbiased.
- ``sign``: scaled sign (Karimireddy et al. 2019): one bit per entry and the scale ``||x||_1 / P``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
from torch import Tensor

from dif_maml_dist.config import CompressionConfig


# ------------------------------------------------------------------------------------------------ wire format
def to_bytes(t: Tensor) -> Tensor:
    """``t``'s memory as a flat ``uint8`` tensor (no copy when contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(buf: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of :func:`to_bytes` for a slice of a payload (copied: a slice may be misaligned for ``dtype``)."""
    return buf.clone().view(dtype)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Non-negative integer ``codes`` (< 2**bits) packed ``bits`` per entry, most significant bit first."""
    if 8 % bits == 0:  # whole codes per byte (1, 2, 4, 8 bits): no per-bit expansion
        per = 8 // bits
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-codes.numel()) % per)).reshape(-1, per)
        shifts = torch.arange(per - 1, -1, -1, dtype=torch.uint8, device=codes.device) * bits
        return (c << shifts).sum(dim=1, dtype=torch.uint8)
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int32, device=codes.device)
    stream = ((codes.to(torch.int32).unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=codes.device)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(buf: Tensor, bits: int, n: int) -> Tensor:
    """The first ``n`` codes of :func:`pack_bits`'s output, as int32."""
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per - 1, -1, -1, dtype=torch.uint8, device=buf.device) * bits
        return ((buf.unsqueeze(1) >> shifts) & (2 ** bits - 1)).reshape(-1)[:n].to(torch.int32)
    shifts = torch.arange(7, -1, -1, dtype=torch.int32, device=buf.device)
    stream = ((buf.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[:n * bits]
    weights = 1 << torch.arange(bits - 1, -1, -1, dtype=torch.int32, device=buf.device)
    return (stream.reshape(n, bits) * weights).sum(dim=1, dtype=torch.int32)


def kept(ratio: float, numel: int) -> int:
    """Entries a sparsifier keeps of ``numel``: ``ratio``·numel rounded up, at least one."""
    return max(1, min(numel, math.ceil(ratio * numel - 1e-9)))


# ------------------------------------------------------------------------------------------------ compressors
class Compressor(ABC):
    """``encode`` a dense vector into a payload, ``decode`` it back; ``gen`` is the sender's seeded stream for this
    round (the same on both ends), used by the random compressors."""

    @abstractmethod
    def encode(self, x: Tensor, gen: Optional[torch.Generator]) -> Tensor: ...

    @abstractmethod
    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, gen: Optional[torch.Generator]) -> Tensor: ...

    @abstractmethod
    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int: ...

    #: whether encode/decode draw from ``gen``
    random: bool = False


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class TopK(Compressor):
    def __init__(self, ratio: float):
        self.ratio = ratio

    def encode(self, x: Tensor, gen: Optional[torch.Generator]) -> Tensor:
        idx = torch.topk(x.abs(), kept(self.ratio, x.numel()), sorted=False).indices
        return torch.cat([to_bytes(x[idx]), to_bytes(idx.to(torch.int32))])

    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, gen: Optional[torch.Generator]) -> Tensor:
        k = kept(self.ratio, numel)
        split = k * _elem(dtype)
        values, idx = from_bytes(payload[:split], dtype), from_bytes(payload[split:], torch.int32)
        return torch.zeros(numel, dtype=dtype, device=payload.device).index_put_((idx.long(),), values)

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return kept(self.ratio, numel) * (_elem(dtype) + 4)


class RandK(Compressor):
    random = True

    def __init__(self, ratio: float):
        self.ratio = ratio

    def _indices(self, numel: int, gen: torch.Generator) -> Tensor:
        # Drawn on the CPU (where the generator lives) on both ends, whatever the device.
        return torch.randperm(numel, generator=gen)[:kept(self.ratio, numel)]

    def encode(self, x: Tensor, gen: Optional[torch.Generator]) -> Tensor:
        return to_bytes(x[self._indices(x.numel(), gen).to(x.device)])

    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, gen: Optional[torch.Generator]) -> Tensor:
        idx = self._indices(numel, gen).to(payload.device)
        return torch.zeros(numel, dtype=dtype, device=payload.device).index_put_((idx,), from_bytes(payload, dtype))

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return kept(self.ratio, numel) * _elem(dtype)


class QSGD(Compressor):
    random = True

    def __init__(self, bits: int):
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1  # the sign takes one bit

    def encode(self, x: Tensor, gen: Optional[torch.Generator]) -> Tensor:
        scale = x.abs().max()
        u = x.abs() / scale * self.levels if scale > 0 else torch.zeros_like(x)
        low = u.floor()
        # Rounded up with probability u - floor(u): unbiased, E[level] = u.
        level = low + (torch.rand(x.numel(), generator=gen, dtype=x.dtype).to(x.device) < u - low).to(x.dtype)
        codes = level.to(torch.int32) + (x < 0).to(torch.int32) * (1 << (self.bits - 1))
        return torch.cat([to_bytes(scale), pack_bits(codes, self.bits)])

    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, gen: Optional[torch.Generator]) -> Tensor:
        split = _elem(dtype)
        scale = from_bytes(payload[:split], dtype)
        codes = unpack_bits(payload[split:], self.bits, numel)
        sign_bit = 1 << (self.bits - 1)
        magnitude = (codes & (sign_bit - 1)).to(dtype) * (scale / self.levels)
        return torch.where(codes >= sign_bit, -magnitude, magnitude)

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return _elem(dtype) + math.ceil(numel * self.bits / 8)


class ScaledSign(Compressor):
    def encode(self, x: Tensor, gen: Optional[torch.Generator]) -> Tensor:
        scale = x.abs().sum() / x.numel()
        return torch.cat([to_bytes(scale), pack_bits((x >= 0).to(torch.int32), 1)])

    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, gen: Optional[torch.Generator]) -> Tensor:
        split = _elem(dtype)
        scale = from_bytes(payload[:split], dtype)
        positive = unpack_bits(payload[split:], 1, numel)
        return (positive.to(dtype) * 2 - 1) * scale

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return _elem(dtype) + math.ceil(numel / 8)


#: ``compression=NAME`` -> its compressor from the config (``none``: the exchange sends the full state); config
#: validation reads the names
COMPRESSORS: dict[str, Callable[[CompressionConfig], Optional[Compressor]]] = {
    "none": lambda c: None,
    "topk": lambda c: TopK(c.ratio),
    "randk": lambda c: RandK(c.ratio),
    "qsgd": lambda c: QSGD(c.bits),
    "sign": lambda c: ScaledSign(),
}
SPARSIFIERS = ("topk", "randk")  #: the compressors that keep compression.ratio of the entries


def make_compressor(cfg: CompressionConfig) -> Optional[Compressor]:
    """The configured compressor; ``None`` for ``none`` (the exchange sends the full state)."""
    if cfg.name not in COMPRESSORS:
        raise ValueError(f"unknown compression {cfg.name!r}; choose one of: {', '.join(COMPRESSORS)}")
    return COMPRESSORS[cfg.name](cfg)
