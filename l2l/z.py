"""The random direction z: a pure function of (step seed, block, chunk), the leaf of ``l2l``.

The direction of block ``b`` at step seed ``s`` is defined chunk by chunk: the block is cut along
its first dimension into row chunks of at most ``CHUNK_ELEMENTS`` elements, and chunk ``c`` is
``randn`` drawn from a generator seeded with ``chunk_seed(s, b, c)``. Nothing is stored: the
forward passes and the update regenerate exactly the same numbers from ``(s, b, c)``.

This module imports nothing of ``l2l``; blocks, shards, the perturber and the methods import it.
"""

from __future__ import annotations

import torch

#: Largest number of elements of one direction chunk (16 MiB in float32).
CHUNK_ELEMENTS = 1 << 22

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser over the sequence)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


def chunk_seed(step_seed: int, block: int, chunk: int) -> int:
    return mix_seed(step_seed, block, chunk)


def row_chunks(shape: torch.Size | tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges ``[(r0, r1), ...]`` cutting a tensor of ``shape`` along dim 0."""
    if len(shape) == 0:
        return [(0, 1)]
    rows = shape[0]
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]


def chunk_view(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return t if t.ndim == 0 else t[r0:r1]


class _Generators:
    """One reusable ``torch.Generator`` per device."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._by_device.get(device)
        if gen is None:
            gen = self._by_device[device] = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen


_GENERATORS = _Generators()


class _Scratch:
    """One reusable float32 buffer of ``CHUNK_ELEMENTS`` per device for transient z chunks.

    A fresh 16 MiB allocation per chunk costs page faults on every draw (on CPU ``randn`` into a
    new tensor is ~1.5x slower than ``normal_`` into a reused one); the draw itself is the same.
    """

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        buf = self._by_device.get(device)
        if buf is None:
            buf = self._by_device[device] = torch.empty(CHUNK_ELEMENTS, device=device)
        return buf[: torch.Size(shape).numel()].view(shape)


_SCRATCH = _Scratch()


def gaussian_chunk(
    step_seed: int,
    block: int,
    chunk: int,
    shape: tuple[int, ...],
    device: torch.device,
    transient: bool = False,
) -> torch.Tensor:
    """z for one chunk: float32 standard normal of ``shape`` from the chunk's own seed.

    ``transient``: write into the device's scratch buffer (no allocation). The result is then
    overwritten by the next transient draw, so use it at once and never keep it (no autograd).
    """
    gen = _GENERATORS.get(device, chunk_seed(step_seed, block, chunk))
    if transient and torch.Size(shape).numel() <= CHUNK_ELEMENTS:
        return _SCRATCH.get(shape, device).normal_(generator=gen)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def chunk_shape(param: torch.Tensor, r0: int, r1: int) -> tuple[int, ...]:
    return tuple(param.shape) if param.ndim == 0 else (r1 - r0, *param.shape[1:])


def param_chunk_z(
    step_seed: int, block: int, chunk: int, param: torch.Tensor, transient: bool = False
) -> torch.Tensor:
    """z for chunk ``chunk`` of block ``block`` (whose tensor is ``param``); ``transient`` as in
    :func:`gaussian_chunk`."""
    r0, r1 = row_chunks(param.shape)[chunk]
    shape = chunk_shape(param, r0, r1)
    return gaussian_chunk(step_seed, block, chunk, shape, param.device, transient)


def gaussian_block(step_seed: int, block: int, param: torch.Tensor) -> torch.Tensor:
    """The whole z of one block (concatenated chunks). Used by the plain reference code."""
    parts = [
        gaussian_chunk(step_seed, block, c, chunk_shape(param, r0, r1), param.device)
        for c, (r0, r1) in enumerate(row_chunks(param.shape))
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
