"""The shared step of every ZO method: seed -> (scaled) perturbation -> losses -> update.

A method subclasses :class:`ZOOptimizer` and supplies

* ``_direction(ctx, block, chunk)``: the float32 chunk of the unscaled direction ``z`` it perturbs
  along (Gaussian for MeZO, ``Sigma^{1/2} z`` for HiZOO, ``U V^T`` for LOZO);
* ``_apply(record)``: the parameter update from a :class:`StepRecord`, a pure function of the
  record and the optimizer state, so that :func:`l2l.trajectory.replay` can re-run it.

The optional ``block_scale`` provider (the learned tuner attaches here) returns one positive
``sigma_b`` per block; the perturbation of block ``b`` becomes ``nf * sigma_b * z_b`` with
``nf = sqrt(sum_b n_b) / sqrt(sum_b n_b sigma_b^2)`` so that ``E||u||^2 = d`` (ZO Fine-tuner).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from l2l.blocks import ParamBlocks, is_no_decay
from l2l.perturb import Perturber, PlainZ
from l2l.rounding import (
    SALT_UPDATE,
    check_rounding,
    lowrank_update_,
    round_into,
    rounding_key,
    upcast,
)
from l2l.scales import block_features
from l2l.z import accelerated, chunk_start, chunk_view, mix_seed, row_chunks

BlockScale = Callable[[torch.Tensor], torch.Tensor]
LossReduce = Callable[[torch.Tensor], torch.Tensor]

NONFINITE_POLICIES = ("raise", "warn", "skip")


class NonFiniteLossError(FloatingPointError):
    """A closure returned NaN/inf; the parameters were left exactly as they were."""


@dataclass
class StepRecord:
    """Everything needed to re-apply one step's update (the trajectory entry).

    ``grad`` is the projected gradient ``(L+ - L-) / (2 eps)``; ``scales`` the effective
    per-block multipliers ``nf * sigma_b`` (``None`` without a provider); ``extra`` holds method
    specific scalars (HiZOO's curvature term).
    """

    step: int
    seed: int
    grad: float
    lr: float
    weight_decay: float
    scales: list[float] | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepContext:
    step: int
    seed: int
    scales: list[float] | None  # nf * sigma_b per block


def _loss_scalar(loss: Any) -> torch.Tensor | float:
    """A closure's loss as a 0-d tensor left on its device (no host synchronisation and, for
    the usual 0-d loss, no kernel; a larger loss tensor is reduced to its float32 mean), or a
    Python float."""
    if isinstance(loss, torch.Tensor):
        loss = loss.detach()
        return loss.float().mean() if loss.ndim else loss
    return float(loss)


def _host_losses(values: list[torch.Tensor | float]) -> list[float]:
    """The step's losses as Python floats: one stack (in the losses' promoted dtype, which holds
    each exactly) and one device-to-host transfer for all of them."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    stacked = torch.stack(
        [
            v.to(device)
            if isinstance(v, torch.Tensor)
            else torch.tensor(v, dtype=torch.float64, device=device)
            for v in values
        ]
    )
    return stacked.tolist()


class ZOOptimizer(torch.optim.Optimizer):
    """Base class of the ZO methods; see the module docstring.

    Args:
        params: an ``nn.Module`` (perturbed on the fly, module by module; recommended for LLMs) or
            an iterable of tensors (perturbed by swapping ``.data`` for a perturbed copy).
        lr: learning rate ``eta``.
        eps: perturbation scale ``epsilon``.
        weight_decay: ``lambda`` of ``theta <- theta - eta (g u + lambda theta)``; skipped for
            biases and normalisation weights.
        seed: base seed; the seed of step t is ``mix_seed(seed, t)``.
        block_scale: optional provider ``features (B, 5) -> sigma (B,)``; features are
            ``[mean, var, L+ prev, L- prev, sigma prev]`` per block.
        normalize: apply ``nf`` to the provider's sigmas (ZO Fine-tuner default: on).
        nonfinite: ``"raise"`` (:class:`NonFiniteLossError`), ``"warn"`` or ``"skip"`` when a loss
            is NaN/inf; the parameters are untouched in every case and ``nonfinite_steps`` counts.
        record: keep a :class:`StepRecord` per step in ``self.records`` (see ``l2l.trajectory``).
        loss_reduce: optional function applied to the stacked losses before use (data parallel:
            an all-reduce mean across ranks).
        rounding: how a float32 update is stored into bfloat16/float16 parameters (and how
            HiZOO's float64 curvature EMA is stored into its float32 state): ``"stochastic"``
            (unbiased, bits from the step seed; see :mod:`l2l.rounding`) or ``"nearest"``, which
            loses most of an update smaller than half the weights' spacing. float32/float64
            parameters are updated in place either way.
    """

    forwards_per_step = 2

    def __init__(
        self,
        params: nn.Module | Any,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        block_scale: BlockScale | None = None,
        normalize: bool = True,
        nonfinite: str = "raise",
        record: bool = False,
        loss_reduce: LossReduce | None = None,
        rounding: str = "stochastic",
        **defaults: Any,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        check_rounding(rounding)
        if isinstance(params, nn.Module):
            self.blocks = ParamBlocks.from_module(params)
            model = params
        else:
            params = list(params)
            if params and isinstance(params[0], dict):
                if len(params) != 1:
                    raise ValueError("ZO optimizers take a single parameter group")
                params = list(params[0]["params"])
            self.blocks = ParamBlocks.from_params(params)
            model = None
        super().__init__(
            self.blocks.params,
            dict(lr=lr, eps=eps, weight_decay=weight_decay, rounding=rounding, **defaults),
        )
        self.perturber = Perturber(self.blocks, model)
        self.block_scale = block_scale
        _check_block_scale_device(block_scale, self.blocks)
        self.normalize = normalize
        self.nonfinite = nonfinite
        self.loss_reduce = loss_reduce
        self.seed = seed
        self.records: list[StepRecord] | None = [] if record else None
        self.nonfinite_steps = 0
        self.step_count = 0
        self._numels = [p.numel() for p in self.blocks.params]
        self._no_decay = [
            is_no_decay(n, p) for n, p in zip(self.blocks.names, self.blocks.params, strict=True)
        ]
        self._prev_losses = (0.0, 0.0)
        # the previous step's raw sigma, a tuner feature; kept where the tuner's output is (on
        # an accelerator no upload per step)
        self._prev_sigma = torch.ones(len(self.blocks))

    # ---- hyperparameters and (de)serialisation -------------------------------------------
    @property
    def group(self) -> dict[str, Any]:
        return self.param_groups[0]

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments that determine the update (recorded in trajectories)."""
        keep = {k: v for k, v in self.group.items() if k != "params"}
        return dict(keep, seed=self.seed, normalize=self.normalize)

    def zo_state(self) -> dict[str, Any]:
        """The optimizer's small global state (step count, tuner inputs): with the
        trajectory records it is all a resume needs, since replaying the records rebuilds the
        parameters and every per-parameter buffer (HiZOO's H, LOZO's V and N)."""
        return dict(
            step_count=self.step_count,
            prev_losses=list(self._prev_losses),
            prev_sigma=self._prev_sigma.tolist(),
            nonfinite_steps=self.nonfinite_steps,
        )

    def load_zo_state(self, zo: dict[str, Any]) -> None:
        self.step_count = int(zo["step_count"])
        self._prev_losses = tuple(float(v) for v in zo["prev_losses"])
        self._prev_sigma = torch.as_tensor(zo["prev_sigma"], dtype=torch.float32)
        self.nonfinite_steps = int(zo["nonfinite_steps"])

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo"] = self.zo_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a saved state without the option
            group.setdefault("rounding", self.defaults["rounding"])
        if zo is not None:
            self.load_zo_state(zo)

    # ---- the step ---------------------------------------------------------------------------
    def features(self) -> torch.Tensor:
        """(B, 5) float32 tuner features: mean, var, L+ prev, L- prev, sigma prev."""
        home = self.blocks.params[0].device if len(self.blocks) else None
        on_device = accelerated(home)  # accelerators: built where the weights are
        return block_features(self.blocks, self._prev_losses, self._prev_sigma, on_device)

    def block_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(raw sigma, effective nf * sigma) from the provider as float64 tensors, or
        (None, None) without one."""
        sigma, scales, _ = self._block_scale_values()
        if sigma is None:
            return None, None
        return torch.tensor(sigma, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64)

    def _block_scale_values(
        self,
    ) -> tuple[list[float] | None, list[float] | None, torch.Tensor | None]:
        """(raw sigma, nf * sigma) as Python floats, and the raw sigma as a float32 tensor where
        a tuner's ``step_sigma`` made it on the blocks' device (else None): the provider's output
        crosses to the host once (one ``tolist``) and nothing after it reads a tensor back."""
        if self.block_scale is None:
            return None, None, None
        kept = None
        with torch.no_grad():
            step_sigma = getattr(self.block_scale, "step_sigma", None)  # a learned tuner's
            out = None
            if step_sigma is not None and self._owner("features") is ZOOptimizer:
                out = step_sigma(self.blocks, self._prev_losses, self._prev_sigma)
                if out is not None:  # float32 as a resume reloads it (a Tuner's is: no copy)
                    kept = out.detach().reshape(-1).float()
            if out is None:
                out = self.block_scale(self.features())
            sigma = out.detach().reshape(-1).tolist()  # exact floats of any dtype
        if len(sigma) != len(self.blocks) or not all(s > 0 for s in sigma):  # NaN fails too
            raise ValueError(
                f"block_scale must return {len(self.blocks)} positive scales, got "
                f"{len(sigma)} with min {min(sigma) if sigma else 'n/a'}"
            )
        if not self.normalize:
            return sigma, list(sigma), kept
        # nf = sqrt(sum n_b) / sqrt(sum n_b sigma_b^2), with correctly rounded sums
        weighted = math.fsum(n * s * s for n, s in zip(self._numels, sigma, strict=True))
        if not 0.0 < weighted < math.inf:
            raise ValueError(
                f"block_scale's scales cannot be normalised: sum n_b sigma_b^2 = {weighted} "
                f"(sigma from {min(sigma)} to {max(sigma)})"
            )
        nf = math.sqrt(math.fsum(self._numels)) / math.sqrt(weighted)
        return sigma, [s * nf for s in sigma], kept

    def _direction(self, ctx: StepContext, block: int, chunk: int) -> torch.Tensor:
        raise NotImplementedError

    def _direction_at(self, ctx: StepContext, block: int, index: torch.Tensor) -> torch.Tensor:
        """The unscaled direction of ``block`` at element positions ``index`` (int64), the
        values ``_direction`` has there; a method that has it perturbs only the embedding rows
        a batch looks up (see ``l2l.perturb``). Not every method has one."""
        raise NotImplementedError

    def _has_direction_at(self) -> bool:
        """Whether ``_direction_at`` gives this optimizer's direction: defined, and by the class
        that defines ``_direction`` and ``_z`` (a subclass overriding either would otherwise
        inherit a looked-up-rows direction that is not its own)."""
        owner = self._owner("_direction_at")
        return owner is not ZOOptimizer and self._defined_by(owner, "_direction", "_z")

    def _defined_by(self, owner: type, *names: str) -> bool:
        """Whether every one of ``names`` that this optimizer has comes from class ``owner``."""
        return all(self._owner(name) is owner for name in names if hasattr(self, name))

    #: True in a class whose ``_direction`` is z itself (``param_chunk_z`` of the step seed): its
    #: perturbed copies and updates then draw and add in one fused op (:class:`l2l.perturb.PlainZ`).
    _direction_is_z = False

    def _direction_of(self, ctx: StepContext):
        """The step's direction as the perturber takes it: :class:`PlainZ` when ``_direction`` is
        plain z (declared by the class that defines it), else ``_direction`` itself."""
        if self._plain_z():
            return PlainZ(ctx.seed, self.blocks.params)
        return lambda b, c: self._direction(ctx, b, c)

    def _plain_z(self) -> bool:
        """Whether the class that declares ``_direction_is_z`` also defines every method its
        direction is made of (a subclass overriding ``_direction`` or ``_z`` has its own)."""
        if not self._direction_is_z:
            return False
        return self._defined_by(self._owner("_direction_is_z"), "_direction", "_z")

    def _owner(self, name: str) -> type:
        """The class of this optimizer's MRO that defines ``name``."""
        return next(c for c in type(self).__mro__ if name in vars(c))

    def _factors(self, ctx: StepContext, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U, V)`` with ``z_b = U V^T`` when block ``b``'s direction is low rank, else None;
        the perturbed forward then need not materialise ``z_b`` (see ``l2l.perturb``)."""
        return None

    def _losses(self, ctx: StepContext, closure: Callable[[], Any]) -> list[torch.Tensor | float]:
        """[L+, L-] (HiZOO prepends L0), each left where the closure computed it."""
        eps = self.group["eps"]
        direction = self._direction_of(ctx)
        factors = lambda b: self._factors(ctx, b)  # noqa: E731
        at = (lambda b, i: self._direction_at(ctx, b, i)) if self._has_direction_at() else None
        scales = [1.0] * len(self.blocks) if ctx.scales is None else ctx.scales
        out = []
        for sign in (1.0, -1.0):
            with self.perturber([sign * eps * s for s in scales], direction, factors, at):
                out.append(_loss_scalar(closure()))
        return out

    def _prepare(self, step: int, seed: int) -> None:
        """Per-step state preparation (LOZO redraws V here). Must be idempotent."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One ZO step. ``closure`` runs a forward pass only and returns the minibatch loss."""
        if closure is None:
            raise ValueError("ZO optimizers need a closure that returns the minibatch loss")
        seed = mix_seed(self.seed, self.step_count)  # a pure function of (seed, step)
        sigma, scales, kept = self._block_scale_values()
        ctx = StepContext(self.step_count, seed, scales)
        self._prepare(ctx.step, seed)
        values = _host_losses(self._losses(ctx, closure))  # the step's one wait on the device
        losses = torch.tensor(values, dtype=torch.float64)
        if self.loss_reduce is not None:
            losses = self.loss_reduce(losses)
            values = losses.tolist()
        step = self.step_count
        self.step_count += 1
        if not all(math.isfinite(v) for v in values):
            self._on_nonfinite(step, losses)
            return torch.tensor(float("nan"))
        record = self._make_record(ctx, values)
        # bookkeeping first: an interrupt inside _apply then leaves a record and state that a
        # resume (which replays the records onto the initial weights) can trust
        self._prev_losses = (values[-2], values[-1])
        if sigma is not None:  # the next step's feature, on the device it was made on
            if kept is None:
                kept = torch.tensor(sigma, dtype=torch.float32)
            self._prev_sigma = kept
        if self.records is not None:
            self.records.append(record)
        self._apply(record)
        return self._report_loss(values)

    def _report_loss(self, losses: list[float]) -> torch.Tensor:
        """The step's reported loss, a float32 host tensor made from the host values (no op on
        the device): the mean of the two perturbed losses."""
        return torch.tensor((losses[-2] + losses[-1]) / 2, dtype=torch.float32)

    def _make_record(self, ctx: StepContext, losses: list[float]) -> StepRecord:
        lp, lm = losses[-2], losses[-1]
        return StepRecord(
            step=ctx.step,
            seed=ctx.seed,
            grad=(lp - lm) / (2 * self.group["eps"]),
            lr=self.group["lr"],
            weight_decay=self.group["weight_decay"],
            scales=None if ctx.scales is None else list(ctx.scales),
        )

    def _on_nonfinite(self, step: int, losses: torch.Tensor) -> None:
        self.nonfinite_steps += 1
        msg = (
            f"non-finite loss at step {step} (losses {losses.tolist()}); the update was skipped "
            "and the parameters are unchanged. Lower lr/eps, use float32 or bfloat16, or check "
            "the data."
        )
        if self.nonfinite == "raise":
            raise NonFiniteLossError(msg)
        if self.nonfinite == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _apply(self, record: StepRecord) -> None:
        raise NotImplementedError

    # ---- shared update helper ---------------------------------------------------------------
    def _sgd_update(self, record: StepRecord, direction) -> None:
        """theta_b <- theta_b - lr (g s_b u_b + lambda theta_b) with s_b the block scale."""
        scales = record.scales or [1.0] * len(self.blocks)
        self._update(record, direction, [record.lr * record.grad * s for s in scales])

    def _update(self, record: StepRecord, direction, coeffs: list[float], factors=None) -> None:
        """theta_b <- (1 - lr lambda) theta_b - coeffs[b] d_b, chunk by chunk, in float32.

        float32/float64 parameters are updated in place; a half-precision chunk is computed in
        float32 and rounded into the parameter as ``rounding`` says, with the bits of
        ``(record.seed, b, SALT_UPDATE)``, so a replay rounds exactly as the run did.

        ``factors(b, c)``, when given and not None, returns ``(A, B)`` with chunk ``c`` of ``d_b``
        equal to ``A B^T``; the update is then one fused ``addmm_`` (no materialised ``d_b``).
        Blocks whose coefficient and decay are both zero are not touched at all, so lr = 0 leaves
        every parameter bit-for-bit unchanged.
        """
        for b, p in enumerate(self.blocks.params):
            decay = self._decay(record, b)
            if coeffs[b] == 0.0 and decay == 0.0:
                continue
            for c in range(len(row_chunks(p.shape, p.device))):
                self._update_chunk(record, b, c, direction, coeffs[b], decay, factors)

    def _decay(self, record: StepRecord, block: int) -> float:
        """The step's weight-decay factor ``lr lambda`` of ``block`` (0 for no-decay blocks)."""
        return 0.0 if self._no_decay[block] else record.lr * record.weight_decay

    def _update_chunk(self, record, b: int, c: int, direction, coeff, decay, factors=None) -> None:
        """:meth:`_update` of chunk ``c`` of block ``b``."""
        p = self.blocks.params[b]
        r0, r1 = row_chunks(p.shape, p.device)[c]
        key, rounding = rounding_key(record.seed, b, SALT_UPDATE), self.group["rounding"]
        view, start = chunk_view(p.data, r0, r1), chunk_start(p.shape, c, p.device)
        lowrank = factors(b, c) if factors is not None and coeff else None
        plain = coeff and lowrank is None and type(direction) is PlainZ
        if plain and direction.update_(view, b, start, coeff, decay, key, rounding):
            return  # one fused kernel
        if lowrank is not None and view.dtype == torch.bfloat16 and accelerated(p.device):
            # one fused kernel where there are kernels (its reference ops elsewhere): a GPU's
            # bfloat16 update is not an upcast copy, a GEMM and a rounding pass
            a, bt = lowrank
            lowrank_update_(view, a, bt, -coeff, 1.0 - decay, key, start=start, rounding=rounding)
            return
        # a half-precision chunk of plain z is one fused kernel where there are kernels: its
        # reference ops below are profiled as that one kernel
        fused = plain and view.dtype == torch.bfloat16
        with torch.profiler.record_function("l2l::add_z") if fused else nullcontext():
            in_place = view.dtype in (torch.float32, torch.float64)
            new = view if in_place else upcast(view, torch.float32)
            if decay:
                new.mul_(1.0 - decay)
            if lowrank is not None:
                a, bt = (t.to(new.dtype) for t in lowrank)
                new.addmm_(a, bt.T, alpha=-coeff)
            elif isinstance(direction, PlainZ) and coeff:  # draw and add fused
                direction.add(new, b, start, -coeff, out=new)
            elif coeff:
                new.add_(direction(b, c), alpha=-coeff)
            if not in_place:
                round_into(view, new, key, start=start, rounding=rounding)


def _check_block_scale_device(block_scale: Any, blocks: ParamBlocks) -> None:
    """Warn when a module provider (a tuner) is not where the weights are: it still works, but
    every step then ships the features to the provider's device and its scales back."""
    if not isinstance(block_scale, nn.Module) or not len(blocks):
        return
    home = blocks.params[0].device
    where = {p.device for p in block_scale.parameters()}
    if where and home not in where and home.type != "meta":
        warnings.warn(
            f"block_scale is on {', '.join(sorted(map(str, where)))} and the weights on {home}: "
            f"each step copies the features there and back; move it with "
            f"block_scale.to({str(home)!r}) (finetune and the Trainer integration do for a "
            "Tuner)",
            RuntimeWarning,
            stacklevel=2,
        )
