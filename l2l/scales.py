"""Block scales: the tuner's inputs and how its sigmas become the perturbation's scale.

Per block ``b`` the tuner sees the features ``x_b = [mean(theta_b), var(theta_b), L+ prev, L- prev,
sigma_b prev]`` (:func:`block_features`), scaled for its MLP (:func:`scale_features`), and returns
``sigma_b > 0``; the perturbation of block ``b`` is ``nf * sigma_b * z_b`` with ``nf`` from
:func:`normalisation`, so that ``E||u||^2 = d`` (ZO Fine-tuner).
"""

from __future__ import annotations

import torch

from l2l.blocks import ParamBlocks


def block_features(
    blocks: ParamBlocks,
    prev_losses: tuple[float, float],
    prev_sigma: torch.Tensor,
    on_device: bool = False,
) -> torch.Tensor:
    """(B, 5) float32 tuner features ``[mean, var, L+ prev, L- prev, sigma prev]`` per block,
    on the CPU, or with ``on_device`` on the blocks' first device with no host transfer."""
    mean, var = blocks.statistics(on_device=on_device)
    return stack_features(mean, var, prev_losses, prev_sigma)


def stack_features(
    mean: torch.Tensor,
    var: torch.Tensor,
    prev_losses: tuple[float, float],
    prev_sigma: torch.Tensor,
) -> torch.Tensor:
    """(B, 5) float32 features from the blocks' (B,) float32 ``mean`` and ``var``, on their
    device."""
    n, where = mean.shape[0], mean.device
    lp = torch.full((n,), float(prev_losses[0]), device=where)
    lm = torch.full((n,), float(prev_losses[1]), device=where)
    sigma = prev_sigma.detach().float().to(where, non_blocking=True)
    return torch.stack([mean, var, lp, lm, sigma], dim=1)


def normalisation(sigma: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """nf = sqrt(sum n_b) / sqrt(sum n_b sigma_b^2): keeps E||nf sigma z||^2 = d."""
    sigma = sigma.to(numels.dtype)
    return numels.sum().sqrt() / (numels * sigma.square()).sum().sqrt()


def scale_features(features: torch.Tensor, scaling: str, scales: torch.Tensor) -> torch.Tensor:
    """(B, 5) raw features -> the MLP inputs; ``scales`` is (5,)."""
    if scaling == "raw":
        return features
    return torch.asinh(features / scales)


def weight_rms_scale(features: torch.Tensor) -> torch.Tensor:
    """A hand-made block scale: ``sigma_b = sqrt(mean_b^2 + var_b)``, the RMS of block ``b``'s
    weights, read from the tuner features ``(B, 5)``.

    A heuristic baseline for the learned tuner: each block is perturbed in proportion to the
    size of its own weights (a norm weight near 1 more than a projection near 0.02), and the
    normalisation ``nf`` keeps ``E||u||^2 = d``. Floored at 1e-8 so an all-zero block still moves.
    """
    mean, var = features[:, 0].double(), features[:, 1].double()
    return (mean.square() + var).sqrt().clamp_min(1e-8)


#: hand-made block scales by name (``finetune --tuner weight-rms``): features (B, 5) -> sigma (B,)
HEURISTICS = {"weight-rms": weight_rms_scale}
