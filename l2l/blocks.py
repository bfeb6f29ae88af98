"""Parameter blocks: the unit every ZO method and the tuner works on.

One block is one distinct trainable tensor of ``model.named_parameters()``. A weight tied between
two modules (e.g. ``embed_tokens.weight`` / ``lm_head.weight``) is one block, named by its first
name, and is perturbed once per step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from l2l.shards import all_gather, is_sharded, local_rows, shard_group
from l2l.z import _kernels, accelerated, run_kernel

#: Blocks up to this many elements get exact float64 statistics (see ParamBlocks.statistics).
EXACT_STATS = 1 << 16
#: Larger blocks are reduced in parts of at most this many elements.
STATS_PART = 1 << 18

# Names whose weight decay is skipped (biases and norm weights), as in MeZO.
_NO_DECAY_KEYS = ("bias", "norm", "ln_", "layernorm", "layer_norm")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for biases and normalisation weights (1-D tensors or names that say so)."""
    lowered = name.lower()
    return param.ndim < 2 or any(key in lowered for key in _NO_DECAY_KEYS)


@dataclass
class ParamBlocks:
    """The ordered, de-duplicated trainable tensors of a model.

    Attributes:
        names: first parameter name of each block, in ``named_parameters()`` order.
        params: the tensors themselves (shared with the model, never copied).
        aliases: every name that refers to each block (more than one for tied weights).
    """

    names: list[str]
    params: list[torch.Tensor]
    aliases: list[list[str]] = field(default_factory=list)

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        include: Callable[[str, torch.Tensor], bool] | None = None,
    ) -> ParamBlocks:
        """Collect ``model``'s trainable parameters (``requires_grad``), tied ones once.

        ``include(name, param)`` optionally restricts the set (e.g. only LoRA adapters).
        """
        seen: dict[int, int] = {}
        names: list[str] = []
        params: list[torch.Tensor] = []
        aliases: list[list[str]] = []
        for name, param in model.named_parameters(remove_duplicate=False):
            if not param.requires_grad or (include is not None and not include(name, param)):
                continue
            key = id(param)
            if key in seen:
                aliases[seen[key]].append(name)
                continue
            seen[key] = len(params)
            names.append(name)
            params.append(param)
            aliases.append([name])
        if not params:
            raise ValueError(
                "the model has no trainable parameters to optimise: every parameter has "
                "requires_grad=False or was excluded by `include`"
            )
        return cls(names, params, aliases)

    @classmethod
    def from_params(cls, params: Iterable[torch.Tensor], prefix: str = "param") -> ParamBlocks:
        """Blocks from a bare list of tensors (what ``torch.optim.Optimizer`` receives)."""
        unique: list[torch.Tensor] = []
        seen: set[int] = set()
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        names = [f"{prefix}.{i}" for i in range(len(unique))]
        return cls(names, unique, [[n] for n in names])

    def __len__(self) -> int:
        return len(self.params)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.params]

    @property
    def numels(self) -> torch.Tensor:
        """(B,) float64 element count of each block."""
        return torch.tensor([p.numel() for p in self.params], dtype=torch.float64)

    def fingerprint(self) -> str:
        """sha256 over ``name:shape`` lines: two models with equal fingerprints can share a tuner."""
        return block_fingerprint(self.names, self.shapes)

    @torch.no_grad()
    def device_moments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B,) float64 mean and population variance of every block on the first block's
        device, where the blocks take the accelerator's path (an accelerator, no sharded
        block; see :func:`_device_var_mean`); None elsewhere."""
        home = self.params[0].device if self.params else None
        if home is None or not accelerated(home) or any(is_sharded(p) for p in self.params):
            return None
        return _device_var_mean([p.detach().reshape(-1) for p in self.params], home)

    @torch.no_grad()
    def statistics(self, on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) float32 mean and (population) variance of every block, on the CPU, or with
        ``on_device`` left on the first block's device (no host transfer).

        On an accelerator the blocks are reduced in float64 (whose ``E[x^2] - E[x]^2`` keeps 10+
        digits at any mean) by :meth:`device_moments`: two kernels for all blocks with Triton
        on CUDA, else a ``sum`` per block and one multi-tensor ``vector_norm``; no host
        synchronisation.

        The tuner needs them every step. A large block is first reduced with the two fastest
        reductions there are, ``sum`` and ``vector_norm`` (vectorised, multi-threaded, in float32
        parts of ``STATS_PART`` elements), combined as ``E[x^2] - E[x]^2`` in float64; that is
        several times faster than ``torch.var_mean`` on CPU and within 1e-4 relative (tested)
        while the mean is small next to the spread, as in weight matrices. When it is not
        (``mean^2 > 1e-3 E[x^2]``, where the subtraction would cancel digits) and for small
        blocks (biases, norm weights), the exact float64 ``var_mean`` is used.
        """
        moments = self.device_moments()
        if moments is not None:
            out = (moments[0].float(), moments[1].float())
            return out if on_device else (out[0].cpu(), out[1].cpu())
        flats = [local_rows(p)[0].reshape(-1) for p in self.params]  # FSDP2: this rank's rows
        home = self.params[0].device if self.params else torch.device("cpu")
        sharded = [(b, flats[b].numel()) for b, p in enumerate(self.params) if is_sharded(p)]
        means: list[torch.Tensor | None] = [None] * len(flats)
        variances: list[torch.Tensor | None] = [None] * len(flats)
        large = [b for b, flat in enumerate(flats) if flat.numel() > EXACT_STATS]
        if large:
            fast = [_fast_var_mean(flats[b]) for b in large]
            # one host transfer for all blocks (not one per block): which fast results cancel
            exact = torch.stack([bad.to(fast[0][2].device) for _, _, bad in fast]).tolist()
            for b, (var, mean, _), bad in zip(large, fast, exact, strict=True):
                if not bad:
                    means[b], variances[b] = mean, var
        for b, flat in enumerate(flats):
            if means[b] is None:
                variances[b], means[b] = _exact_var_mean(flat)
        if sharded:
            _merge_shards(self.params, sharded, means, variances)
        # blocks may live on several devices (a device_map split): gather on the first block's
        mean = torch.stack([m.to(home) for m in means]).float()
        var = torch.stack([v.to(home) for v in variances]).float()
        return (mean, var) if on_device else (mean.cpu(), var.cpu())


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _device_var_mean(flats: list[torch.Tensor], home: torch.device):
    """(B,) float64 mean and population variance ``E[x^2] - E[x]^2`` of every block.

    Where :mod:`l2l.z_triton` runs, two kernels per dtype for all blocks
    (``block_var_mean``); elsewhere a float64 ``sum`` per block, one multi-tensor
    ``_foreach_norm`` and the combination (the same values to rounding). Profiled as
    ``record_function("l2l::moments")``."""
    with torch.profiler.record_function("l2l::moments"):
        kernels = _kernels(home)
        if kernels is not None and all(
            f.device == home and f.is_contiguous() and f.dtype in _KERNEL_DTYPES for f in flats
        ):
            out = run_kernel(kernels, "block_var_mean", flats)
            if out is not None:
                return out[0], out[1]  # contiguous rows
        sums = torch.stack([f.sum(dtype=torch.float64).to(home) for f in flats])
        if all(f.device == home for f in flats):
            norms = torch.stack(torch._foreach_norm(flats, 2, dtype=torch.float64))
        else:
            norms = torch.stack(
                [torch.linalg.vector_norm(f, dtype=torch.float64).to(home) for f in flats]
            )
        n = torch.tensor([f.numel() for f in flats], dtype=torch.float64)
        n = n.to(home, non_blocking=True)
        mean = sums / n
        return mean, (norms.square() / n - mean.square()).clamp_min(0.0)


def _merge_shards(params, sharded, means, variances) -> None:
    """Replace the per-shard mean/variance of the sharded blocks by the whole block's: one
    all-gather of (count, mean, variance) per block, merged in rank order (Chan et al.)."""
    moments = torch.stack([torch.stack([means[b], variances[b]]) for b, _ in sharded])
    counts = torch.tensor([[float(n)] for _, n in sharded], dtype=torch.float64)
    local = torch.cat([counts, moments.double().cpu()], dim=1)  # (S, 3), one device transfer
    every = all_gather(local, shard_group(params), params[sharded[0][0]].device)  # (world, S, 3)
    for i, (b, _) in enumerate(sharded):
        n, mean, m2 = 0.0, 0.0, 0.0
        for count, mean_r, var_r in every[:, i].tolist():
            n, mean, m2 = _chan(n, mean, m2, count, mean_r, var_r * count)
        means[b] = torch.tensor(mean, dtype=torch.float64)
        variances[b] = torch.tensor(m2 / max(n, 1.0), dtype=torch.float64)


def _parts(flat: torch.Tensor):
    """``flat`` in parts of at most ``STATS_PART`` elements, half precision widened per part."""
    for part in flat.split(STATS_PART):
        yield part if part.dtype in (torch.float32, torch.float64) else part.float()


def _fast_var_mean(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(var, mean, cancels)`` from ``sum`` and ``vector_norm`` as ``E[x^2] - E[x]^2`` in
    float64; ``cancels`` (a 0-d bool tensor, left on the device) says the subtraction would
    cancel digits, so the caller uses the exact path instead."""
    total = square = torch.zeros((), dtype=torch.float64, device=flat.device)
    for part in _parts(flat):
        total = total + part.sum().double()
        square = square + torch.linalg.vector_norm(part).double().square()
    mean, second = total / flat.numel(), square / flat.numel()
    return second - mean * mean, mean, mean * mean > 1e-3 * second


def _exact_var_mean(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 var_mean, part by part, merged with Chan et al.'s pairwise update."""
    n = 0
    mean = m2 = torch.zeros((), dtype=torch.float64, device=flat.device)
    for part in flat.split(STATS_PART):
        var_k, mean_k = torch.var_mean(part.double(), correction=0)
        n, mean, m2 = _chan(n, mean, m2, part.numel(), mean_k, var_k * part.numel())
    return m2 / max(n, 1), mean


def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Count (a number), mean and sum of squared deviations of two merged sets (Chan et al.)."""
    n = n_a + n_b
    if n == 0:
        return n, mean_a, m2_a
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


def block_fingerprint(names: list[str], shapes: list[tuple[int, ...]]) -> str:
    text = "\n".join(f"{n}:{'x'.join(map(str, s))}" for n, s in zip(names, shapes, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()
