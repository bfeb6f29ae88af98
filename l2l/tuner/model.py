"""The learned perturbation tuner of ZO Fine-tuner (ASTRAL-Group, 2025), all blocks at once.

Per block b the paper's tuner is an MLP ``Linear(5, 64) -> Tanh -> Linear(64, 1)`` and
``sigma_b = |MLP_b(x_b)|`` with ``x_b = [mean(theta_b), var(theta_b), L+, L-, sigma_b]`` of the
previous step. Here the B MLPs are stacked (``w1`` (B, H, 5), ``b1`` (B, H), ``w2`` (B, H),
``b2`` (B,)) and evaluated in one batched einsum, with no per-block Python call or host sync.

Choices (recorded in the config):

* positivity: ``sigma_b = max(|out_b|, sigma_floor)``; for ``|out| >= floor`` (always, in practice)
  this equals the paper's ``|out|`` exactly, and the floor (1e-8) keeps ``nf`` finite;
* inputs: ``asinh(x / s)`` per feature by default (see :mod:`l2l.tuner.config`), or ``raw`` as in
  the paper, which the imported release tuner needs to reproduce its outputs;
* init: ``b2 = 1`` and ``w2 ~ U(-0.01, 0.01)`` so ``sigma_b`` is within ~1% of 1 at the initial
  state: an untrained tuner starts as MeZO, and gradients still reach ``w1``/``b1``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

from l2l.blocks import ParamBlocks
from l2l.scales import scale_features, stack_features
from l2l.tuner.card import CARD_TAGS, render_model_card
from l2l.tuner.config import (
    CARD_NAME,
    CONFIG_NAME,
    FEATURE_NAMES,
    LIBRARY_NAME,
    WEIGHTS_NAME,
    TunerConfig,
)
from l2l.tuner.hub import fetch_tuner_snapshot
from l2l.tuner.io import atomic_directory, read_weights, write_weights
from l2l.z import _kernels, run_kernel

logger = logging.getLogger(__name__)

NUM_FEATURES = len(FEATURE_NAMES)
W2_INIT_RANGE = 0.01


class TunerMismatchError(ValueError):
    """The tuner's parameter blocks differ from the model's (the first difference is named)."""


def _first_mismatch(
    expected: list[tuple[str, tuple[int, ...]]], actual: list[tuple[str, tuple[int, ...]]]
) -> str | None:
    for i, ((e_name, e_shape), (a_name, a_shape)) in enumerate(zip(expected, actual, strict=False)):
        if e_name != a_name:
            return (
                f"block {i}: the tuner expects {e_name!r} {e_shape} but the model has "
                f"{a_name!r} {a_shape}"
            )
        if e_shape != a_shape:
            return (
                f"block {i} {e_name!r}: the tuner expects shape {e_shape}, the model has {a_shape}"
            )
    n = min(len(expected), len(actual))
    if len(actual) > n:
        name, shape = actual[n]
        return f"block {n} {name!r} {shape} of the model has no tuner entry ({n} tuner blocks)"
    if len(expected) > n:
        name, shape = expected[n]
        return f"block {n} {name!r} {shape} expected by the tuner is missing from the model"
    return None


class Tuner(nn.Module, PyTorchModelHubMixin, library_name=LIBRARY_NAME, tags=list(CARD_TAGS)):
    """Per-block perturbation scales ``sigma_b`` from per-block features, for one base model.

    Use it as the ``block_scale`` provider of any ZO optimizer: ``tuner(features)`` maps the
    (B, 5) float32 features to (B,) positive float32 sigma, differentiably in the weights.
    """

    def __init__(self, config: TunerConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        n, h = config.num_blocks, int(config.hidden_size)
        self.w1 = nn.Parameter(torch.empty(n, h, NUM_FEATURES))  # (B, H, 5)
        self.b1 = nn.Parameter(torch.empty(n, h))  # (B, H)
        self.w2 = nn.Parameter(torch.empty(n, h))  # (B, H)
        self.b2 = nn.Parameter(torch.empty(n))  # (B,)
        self.register_buffer(
            "feature_scales",
            torch.tensor(config.feature_scales, dtype=torch.float32),
            persistent=False,
        )
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Deterministic init with sigma ~= 1 everywhere (see the module docstring)."""
        gen = torch.Generator().manual_seed(seed)
        bound1 = 1.0 / math.sqrt(NUM_FEATURES)  # nn.Linear's default range for fan_in = 5

        def uniform(shape: torch.Size, bound: float) -> torch.Tensor:
            return (torch.rand(shape, generator=gen) * 2 - 1) * bound

        self.w1.copy_(uniform(self.w1.shape, bound1))
        self.b1.copy_(uniform(self.b1.shape, bound1))
        self.w2.copy_(uniform(self.w2.shape, W2_INIT_RANGE))
        self.b2.fill_(1.0)

    @torch.no_grad()
    def start_at(self, sigma: torch.Tensor) -> Tuner:
        """Start from the block scales ``sigma`` (B,) instead of 1 (e.g. a hand-made heuristic):
        each block's output is ``b2 = sigma_b / g`` (``g`` the geometric mean of ``sigma``, which
        the normalisation ``nf`` makes irrelevant) and ``w2`` shrinks with it, so every block
        starts as close to its scale as the default init starts to 1."""
        sigma = sigma.detach().double().reshape(-1)
        if sigma.numel() != self.num_blocks or not bool((sigma > 0).all() & sigma.isfinite().all()):
            got = f" from {float(sigma.min()):g} to {float(sigma.max()):g}" if sigma.numel() else ""
            raise ValueError(
                f"start_at takes {self.num_blocks} positive finite block scales, got "
                f"{sigma.numel()}{got}"
            )
        rel = (sigma / sigma.log().mean().exp()).to(self.b2)
        self.w2.mul_(rel[:, None])
        self.b2.copy_(rel)
        return self

    @classmethod
    def for_blocks(
        cls,
        blocks: ParamBlocks,
        base_model: str,
        revision: str | None = None,
        *,
        seed: int = 0,
        **config_kwargs: Any,
    ) -> Tuner:
        """A freshly initialised tuner covering exactly ``blocks`` of ``base_model``.

        ``config_kwargs`` go to :class:`TunerConfig` (``model_type``, ``feature_scaling``,
        ``hidden_size``, ``eps``, ``normalize``, ``recipe``, ...).
        """
        config = TunerConfig(
            base_model=base_model,
            revision=revision,
            block_names=list(blocks.names),
            block_shapes=[list(s) for s in blocks.shapes],
            **config_kwargs,
        )
        return cls(config, seed=seed)

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 5) features -> (B,) float32 sigma_b > 0, on the features' device."""
        expected = (self.num_blocks, NUM_FEATURES)
        if features.dim() != 2 or tuple(features.shape) != expected:
            raise ValueError(
                f"tuner features have shape {tuple(features.shape)}, expected {expected} "
                f"(one row of {', '.join(FEATURE_NAMES)} per block)"
            )
        x = features.to(device=self.w1.device, dtype=self.w1.dtype)
        x = scale_features(x, self.config.feature_scaling, self.feature_scales.to(x))  # (B, 5)
        hidden = torch.tanh(torch.einsum("bhi,bi->bh", self.w1, x) + self.b1)  # (B, H)
        out = (self.w2 * hidden).sum(dim=-1) + self.b2  # (B,)
        sigma = out.abs().clamp_min(self.config.sigma_floor)
        return sigma.to(device=features.device, dtype=torch.float32)

    @torch.no_grad()
    def step_sigma(
        self, blocks: ParamBlocks, prev_losses: tuple[float, float], prev_sigma: torch.Tensor
    ) -> torch.Tensor | None:
        """``forward`` of this step's features with the blocks' statistics on their device: on
        CUDA with Triton one kernel for the features and every block's MLP after the two of the
        statistics (:func:`l2l.z_triton.tuner_sigma`, equal to ``forward`` to float32
        rounding), elsewhere these torch ops; None where the blocks do not take the
        accelerator's path (the caller then builds the features on the host). Profiled as
        ``record_function("l2l::tuner")``."""
        if (
            type(self).forward is not Tuner.forward
            or self._forward_hooks
            or self._forward_pre_hooks
        ):
            return None  # a forward of its own (or hooks): the caller runs it
        if len(blocks) != self.num_blocks or prev_sigma.numel() != self.num_blocks:
            return None  # forward raises its error for the caller
        moments = blocks.device_moments()
        w1 = self.w1
        if moments is None or w1.device != moments[0].device or w1.dtype != torch.float32:
            return None
        mean, var = moments
        prev = prev_sigma.detach().float().to(w1.device, non_blocking=True)
        lp, lm = (float(v) for v in prev_losses)
        hidden = w1.shape[1]
        with torch.profiler.record_function("l2l::tuner"):
            kernels = _kernels(w1.device) if hidden & (hidden - 1) == 0 else None
            if kernels is not None:
                weights = [t.detach().contiguous() for t in (w1, self.b1, self.w2, self.b2)]
                asinh = self.config.feature_scaling == "asinh"
                scales = self.feature_scales.to(w1.device) if asinh else None
                args = (mean, var, prev, lp, lm, scales, *weights, self.config.sigma_floor)
                sigma = run_kernel(kernels, "tuner_sigma", *args)
                if sigma is not None:
                    return sigma
            return self(stack_features(mean.float(), var.float(), prev_losses, prev))

    def block_mlp(self, index: int) -> nn.Sequential:
        """Block ``index`` as the paper's ``nn.Sequential`` (a detached copy of its weights)."""
        mlp = nn.Sequential(
            nn.Linear(NUM_FEATURES, self.config.hidden_size),
            nn.Tanh(),
            nn.Linear(self.config.hidden_size, 1),
        )
        with torch.no_grad():
            mlp[0].weight.copy_(self.w1[index])
            mlp[0].bias.copy_(self.b1[index])
            mlp[2].weight.copy_(self.w2[index].unsqueeze(0))
            mlp[2].bias.copy_(self.b2[index].reshape(1))
        return mlp

    @torch.no_grad()
    def load_block_mlp(self, index: int, mlp: nn.Sequential) -> None:
        """Copy a paper-style ``Sequential(Linear(5,H), Tanh, Linear(H,1))`` into block ``index``."""
        self.w1[index].copy_(mlp[0].weight)
        self.b1[index].copy_(mlp[0].bias)
        self.w2[index].copy_(mlp[2].weight.reshape(-1))
        self.b2[index].copy_(mlp[2].bias.reshape(()))

    def check_compatible(self, blocks: ParamBlocks, model_id: str | None = None) -> None:
        """Raise :class:`TunerMismatchError` unless ``blocks`` are exactly the tuner's blocks.

        A derived checkpoint (e.g. the Instruct variant of the base model) has the same block
        names and shapes and is accepted; ``model_id``, when given and different from the base
        model, is only logged.
        """
        if blocks.fingerprint() != self.config.fingerprint:
            shapes = [tuple(s) for s in self.config.block_shapes]
            expected = list(zip(self.config.block_names, shapes, strict=True))
            actual = list(zip(blocks.names, blocks.shapes, strict=True))
            problem = _first_mismatch(expected, actual) or "the block fingerprints differ"
            raise TunerMismatchError(
                f"tuner for {self.config.base_model} does not fit this model: {problem}. "
                "Use a tuner meta-trained for this model (or a derived checkpoint of it with "
                "the same blocks), or meta-train one for it."
            )
        if model_id is not None and model_id != self.config.base_model:
            logger.info(
                "using the tuner of %s on %s: the parameter blocks match (fingerprint %s)",
                self.config.base_model,
                model_id,
                self.config.fingerprint[:12],
            )

    # --- files ----------------------------------------------------------------------------------

    def _weight_shapes(self) -> dict[str, tuple[int, ...]]:
        n, h = self.num_blocks, int(self.config.hidden_size)
        return {"w1": (n, h, NUM_FEATURES), "b1": (n, h), "w2": (n, h), "b2": (n,)}

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write the three artifact files into ``save_directory`` (non-atomic; see save_pretrained)."""
        save_directory = Path(save_directory)
        write_weights(dict(self.named_parameters()), save_directory / WEIGHTS_NAME)
        (save_directory / CARD_NAME).write_text(render_model_card(self.config), encoding="utf-8")
        (save_directory / CONFIG_NAME).write_text(self.config.to_json(), encoding="utf-8")

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Atomically write ``config.json``, ``model.safetensors`` and ``README.md``.

        The files are written to a hidden sibling folder that is renamed into place at the end,
        so a crash never leaves a half-written tuner. ``config`` must be ``None``: edit
        ``tuner.config`` instead (the mixin's push_to_hub passes ``config=None`` through here).
        """
        if config is not None:
            raise ValueError("Tuner.save_pretrained takes no `config`: edit tuner.config instead")
        with atomic_directory(save_directory) as staged:
            self._save_pretrained(staged)
        if push_to_hub:
            repo_id = repo_id or Path(save_directory).name
            return self.push_to_hub(repo_id=repo_id, **push_to_hub_kwargs)
        return None

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        return ModelCard(render_model_card(self.config))

    @classmethod
    def load_folder(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> Tuner:
        """Load a tuner from a folder holding ``config.json`` and ``model.safetensors``."""
        folder = Path(folder)
        config = TunerConfig.load(folder / CONFIG_NAME)
        tuner = cls(config)
        weights = read_weights(
            folder / WEIGHTS_NAME, tuner._weight_shapes(), str(folder / CONFIG_NAME)
        )
        with torch.no_grad():
            for name, param in tuner.named_parameters():
                param.copy_(weights[name])
        return tuner.to(map_location).eval()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> Tuner:
        """Load from a local folder, else from the HF cache / Hub (``snapshot_download``).

        Never unpickles: only ``config.json`` and ``model.safetensors`` are read. Offline
        (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) a cached snapshot is used.
        """
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            map_location=map_location,
            **kwargs,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> Tuner:
        if kwargs:
            raise TypeError(f"Tuner.from_pretrained got unexpected arguments {sorted(kwargs)}")
        if Path(model_id).is_dir():
            return cls.load_folder(model_id, map_location)
        folder = fetch_tuner_snapshot(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        return cls.load_folder(folder, map_location)
