"""The factored (LOZO) perturbation adds its low-rank term without a copy of the output."""

from __future__ import annotations

import pytest
import torch

from l2l import perturb


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lowrank_term_accumulates_into_the_output(dtype):
    """out += c left right^T (LOZO's head: (tokens, vocab) += c (x V) U^T) in out's dtype and
    storage: no allocation of out's size (float32 copies of a vocab-wide output are GBs)."""
    gen = torch.Generator().manual_seed(0)
    tokens, vocab, rank, coeff = 64, 4096, 2, 0.01
    out = torch.randn(2, tokens // 2, vocab, generator=gen).to(dtype)
    left = torch.randn(2, tokens // 2, rank, generator=gen)
    right = torch.randn(vocab, rank, generator=gen)
    expected = out.double() + coeff * left.double() @ right.double().T
    result = []
    largest = _largest_allocation(
        lambda: result.append(perturb._add_lowrank(out, left, right, coeff))
    )
    assert result[0].data_ptr() == out.data_ptr() and result[0].dtype == dtype
    assert largest < out.numel() * out.element_size() // 4
    # float32 keeps float32 accuracy; half precision that of its own product
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert float((out.double() - expected).abs().max()) <= tol * float(expected.abs().max())
