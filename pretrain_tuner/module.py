"""A thin LightningModule over :func:`l2l.meta.meta_step` (ZO Fine-tuner meta-training).

Per training step: the meta-step (L+, L-, differentiable look-ahead, meta-loss) puts the
meta-gradient in the tuner and dL/dtheta in the base model; the tuner takes an SGD step and the
base model a first-order SGD-with-momentum step, so the tuner sees the states a fine-tuning run
visits. Every ``reset_every`` epochs (``reset_every`` x steps per epoch) the base model goes back
to its initial weights (ZO Fine-tuner's reset; the ablation shows it matters).

Both take their step from one SGD optimizer with two parameter groups: Lightning counts every
``optimizer.step()`` of a manual-optimization module as a global step, so two optimizers
would make ``max_steps``, the step seeds and the checkpoint/log intervals count twice.

Data parallel (DDP): each rank gets its own minibatches; L+ and L- are all-reduced (mean) so
that ``g``, the look-ahead and the tuner inputs are the same on every rank, and DDP averages
the gradients of both backward passes, so every rank applies the same updates.

Sharded (FSDP2, Lightning's ``ModelParallelStrategy``): :meth:`configure_model` applies
``fully_shard`` to every decoder layer and to the whole model, so each rank holds 1/N of the
weights, their gradients and the momentum. The meta-step works on the rows each rank holds (see
``l2l.shards``): the block statistics and the per-block ``<dL/dtheta_b, z_b>`` are reduced over
the ranks (a (B, 3) all-gather and a (B,) all-reduce per step). The tuner is replicated and not
wrapped: its inputs and its meta-gradient are built from reduced values, so every rank computes
the same tuner gradient without a collective.
"""

from __future__ import annotations

import lightning as L
import torch

from l2l.blocks import ParamBlocks
from l2l.meta import MetaState, advance_state, meta_step
from l2l.shards import is_sharded, local_rows
from l2l.z import mix_seed
from llm.tasks import objective_loss
from pretrain_tuner.checkpoint import MANIFEST_KEY
from pretrain_tuner.precision import Float32Tuner


class MetaTunerModule(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        tuner: torch.nn.Module,
        *,
        eps: float = 1e-3,
        lr_update: float = 1e-6,
        lr_tuner: float = 0.1,
        lr_model: float = 0.01,
        momentum: float = 0.8,
        reset_every: int = 5,
        normalize: bool = True,
        grad_clip: float = 1.0,
        seed: int = 0,
        keep_z: bool | None = None,
        anchor: float = 0.0,
        anchor_to: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in dict(eps=eps, lr_tuner=lr_tuner, lr_update=lr_update).items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not anchor >= 0:
            raise ValueError(f"anchor must be >= 0, got {anchor}")
        self.save_hyperparameters(ignore=["model", "tuner", "anchor_to"])
        self.automatic_optimization = False
        self.model, self.tuner = model, tuner
        self.model.train(False)  # dropout off: the losses must be deterministic functions
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.blocks = ParamBlocks.from_module(self.model)
        # the reference of --anchor (the tuner's initial scales); rebuilt, not checkpointed
        self.anchor_to = anchor_to if anchor_to is not None else torch.ones(len(self.blocks))
        self._initial: list[torch.Tensor] | None = None  # theta_0, taken by configure_model
        self.meta_state = MetaState()
        self.replicas_match: bool | None = None  # set after data-parallel training
        self.manifest: dict | None = None  # what decides the result, saved in every checkpoint

    def _snapshot(self) -> list[torch.Tensor]:
        """theta_0 for the periodic resets: the rows of every block held here, on the CPU."""
        return [local_rows(p)[0].to("cpu", copy=True) for p in self.blocks.params]

    @property
    def sharded(self) -> bool:
        return any(is_sharded(p) for p in self.blocks.params)

    def configure_model(self) -> None:
        """Shard with FSDP2 under ``ModelParallelStrategy`` (which sets ``device_mesh``), then
        keep theta_0 for the resets: after sharding, so each rank copies only its rows.

        Lightning calls this before it restores a checkpoint, so theta_0 is the pretrained
        weights on ``--resume`` too.
        """
        if self.device_mesh is not None and not self.sharded:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            layers = set(getattr(self.model, "_no_split_modules", None) or ())
            for module in self.model.modules():
                if type(module).__name__ in layers:
                    fully_shard(module, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            self.blocks = ParamBlocks.from_module(self.model)  # fully_shard made new parameters
        if self._initial is None:
            self._initial = self._snapshot()

    def configure_optimizers(self):
        hp = self.hparams
        groups = [dict(params=list(self.tuner.parameters()), lr=hp.lr_tuner, momentum=0.0)]
        if hp.lr_model > 0:
            groups.append(dict(params=self.blocks.params, lr=hp.lr_model, momentum=hp.momentum))
        return torch.optim.SGD(groups, lr=hp.lr_tuner)

    def _loss(self, batch):
        loss = objective_loss(self.model, batch)  # an llm.tasks.ObjectiveBatch
        if self.sharded and not torch.is_grad_enabled():
            # FSDP2 keeps the root's weights (embeddings, final norm, head) gathered after a
            # forward, expecting a backward; the meta-step shifts the shards in place next
            self.model.reshard()
        return loss

    def _reduce(self, losses: torch.Tensor) -> torch.Tensor:
        """All-reduce (mean) of (L+, L-) across ranks: the same g on every rank."""
        if self.trainer.world_size == 1:
            return losses
        return self.trainer.strategy.reduce(losses.to(self.device), reduce_op="mean").cpu()

    def training_step(self, batch, batch_idx: int):
        hp = self.hparams
        opt = self.optimizers()
        opt.zero_grad()
        out = meta_step(
            self.model,
            self.blocks,
            Float32Tuner(self.tuner),  # float32 and outside autocast whatever the precision
            lambda: self._loss(batch),
            self.meta_state,
            seed=mix_seed(hp.seed, self.global_step),
            eps=hp.eps,
            lr_update=hp.lr_update,
            normalize=hp.normalize,
            backward=self.manual_backward,
            loss_reduce=self._reduce,
            keep_z=hp.keep_z,
            anchor=hp.anchor,
            anchor_to=self.anchor_to,
        )
        if hp.grad_clip:  # the tuner's gradient only (the model group is not clipped)
            torch.nn.utils.clip_grad_norm_(self.tuner.parameters(), hp.grad_clip)
        opt.step()
        self.meta_state = advance_state(self.meta_state, out)
        sync = self.trainer.world_size > 1
        self.log("meta_loss", out.meta_loss.float(), prog_bar=True, on_step=True, sync_dist=sync)
        self.log_dict(
            {
                "loss_plus": out.loss_plus,
                "loss_minus": out.loss_minus,
                "sigma_mean": out.sigma.mean(),
                "sigma_min": out.sigma.min(),
                "sigma_max": out.sigma.max(),
                "anchor_loss": out.anchor_loss,
            },
            on_step=True,
        )
        return out.meta_loss

    def on_train_end(self) -> None:
        if self.trainer.world_size > 1:  # every rank is here: a safe place for a collective
            self.replicas_match = self.replicas_identical()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """The reset, every ``reset_every`` epochs counted in steps: a resumed run resets at the
        same steps as an uninterrupted one, whatever Lightning makes of the restarted epoch."""
        every = self.hparams.reset_every
        period = every * self.trainer.num_training_batches
        if every and self.global_step > 0 and self.global_step % period == 0:
            self.reset_model()

    @torch.no_grad()
    def reset_model(self) -> None:
        """Back to theta_0, momentum cleared, tuner state back to sigma = 1 and losses 0."""
        for p, initial in zip(self.blocks.params, self._initial, strict=True):
            local_rows(p)[0].copy_(initial)
        state = self.optimizers().optimizer.state
        for p in self.blocks.params:
            state.pop(p, None)  # momentum buffers
        self.meta_state = MetaState()

    @torch.no_grad()
    def replicas_identical(self) -> bool:
        """Whether all ranks hold the same tuner and model (a sharded model: the tuner and the
        blocks that are not sharded): float64 sum and sum of squares of each tensor, whose
        all-reduce max and min agree only when all ranks agree."""
        params = list(self.tuner.parameters())
        params += [p for p in self.blocks.params if not is_sharded(p)]
        local = torch.stack(
            [torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]
        )
        reduce = self.trainer.strategy.reduce
        return bool(
            torch.equal(
                reduce(local.clone(), reduce_op="max"), reduce(local.clone(), reduce_op="min")
            )
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.manifest is not None:
            checkpoint[MANIFEST_KEY] = self.manifest
        s = self.meta_state
        checkpoint["meta_state"] = dict(
            loss_plus=s.loss_plus, loss_minus=s.loss_minus, sigma=s.sigma
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "meta_state" in checkpoint:
            self.meta_state = MetaState(**checkpoint["meta_state"])
