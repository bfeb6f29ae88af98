"""Zeroth-order fine-tuning inside transformers' ``Trainer``: one import changes in a MeZO script.

    from l2l.integrations.hf_trainer import ZOTrainer as Trainer
    from l2l.integrations.hf_trainer import ZOTrainingArguments as TrainingArguments

:class:`ZOTrainer` overrides two hooks of the Trainer's loop and keeps the rest of it (data,
schedule, logging, evaluation, checkpoints, callbacks); ``compute_loss`` adds the candidate
objectives of :mod:`l2l.integrations.objectives`, ``log`` and ``train`` the ZO outputs.

* ``create_optimizer`` builds the ZO method of ``args.zo_method`` over the model's trainable
  parameters (the adapters of a peft model) and hands the Trainer a :class:`ZOStep`: its
  ``param_groups`` are the method's, so the Trainer's lr scheduler (``lr_scheduler_type``,
  ``warmup_steps``) sets the lr each ZO step uses, and its ``state_dict`` carries the method's
  state *and its trajectory*, so ``resume_from_checkpoint`` continues exactly (the same weights
  as an uninterrupted run) with the full trajectory.
* ``training_step`` runs the ZO step: the forwards at ``theta + eps u`` and ``theta - eps u``
  and the update, with no backward pass and no gradient allocated. Under gradient accumulation
  the micro-batches of one optimizer step are kept (their inputs only) and measured together
  under the same ``z``: the step's loss is their mean, so the projected gradient is the mean of
  the micro-batches' projected gradients. The Trainer's own ``optimizer.step()`` is then a no-op.

Data parallel (DDP, e.g. ``torchrun --nproc_per_node N``): every rank draws the same ``z`` and
the step's losses are all-reduced (a few bytes), so every rank applies the same update and the
step equals one process on the global batch. DeepSpeed and FSDP are refused.

The forwards run in eval mode (no dropout), as MeZO's trainer does: both perturbed losses must
see the same network. Logs replace ``grad_norm`` (there is none) by ``projected_grad``, the mean
``|g|`` since the last log. At the end of ``train()`` the output folder receives
``trajectory.json`` and ``results.json``, and every checkpoint a ``trajectory.json``: with the
base model they rebuild the weights (``l2l.load_finetuned``, ``push_finetuned``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from l2l.finetuned.info import RESULTS_NAME, TRAJECTORY_NAME, weights_sha256
from l2l.integrations.hf_args import ZOTrainingArguments
from l2l.integrations.objectives import candidate_objective
from l2l.io import write_json
from l2l.methods.base import StepRecord, ZOOptimizer
from l2l.methods.factory import make_method
from l2l.trajectory import Trajectory

OPTIMIZER_FILE = "optimizer.pt"  # transformers.trainer.OPTIMIZER_NAME


def zo_trajectory(zo: ZOOptimizer) -> Trajectory:
    """The trajectory so far, with the run's initial lr (the scheduler moves the group's)."""
    trajectory = Trajectory.from_optimizer(zo)
    hparams = dict(trajectory.hparams)
    if "initial_lr" in hparams:
        hparams["lr"] = hparams.pop("initial_lr")
    trajectory.hparams = hparams
    return trajectory


class ZOStep(torch.optim.Optimizer):
    """The Trainer's optimizer: a view of a ZO method whose step runs in ``training_step``.

    ``param_groups``, ``state`` and ``defaults`` are the ZO method's own objects (what lr
    schedulers edit); ``step()`` does nothing, since the update needs the batch and ran already.
    """

    def __init__(self, zo: ZOOptimizer) -> None:  # no super().__init__: everything is zo's
        self.zo = zo

    param_groups = property(lambda self: self.zo.param_groups)
    state = property(lambda self: self.zo.state)
    defaults = property(lambda self: self.zo.defaults)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("ZOStep.step takes no closure: ZOTrainer.training_step runs the step")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zo.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("a ZO method takes a single parameter group")

    def state_dict(self) -> dict[str, Any]:
        return dict(self.zo.state_dict(), trajectory=zo_trajectory(self.zo).to_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("trajectory", None)
        if saved is not None:
            self._check_resumable(saved)
        self.zo.load_state_dict(state_dict)
        self._restore_state_dtypes(state_dict)
        if saved is not None:
            self.zo.records = [StepRecord(**r) for r in saved["records"]]

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch's ``Optimizer.load_state_dict`` casts floating state to its parameter's dtype;
        put each tensor back in the dtype it was saved in (LOZO's V and N, HiZOO's H are
        float32 next to bfloat16 weights)."""
        ids = state_dict["param_groups"][0]["params"]
        by_id = dict(zip(ids, self.zo.param_groups[0]["params"], strict=True))
        for index, values in state_dict["state"].items():
            param = by_id[index]
            for key, value in values.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.zo.state[param][key] = value.to(param.device)

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        now = zo_trajectory(self.zo).to_dict()
        if saved["fingerprint"] != now["fingerprint"]:
            raise ValueError(
                "resume_from_checkpoint: the checkpoint's trajectory was recorded on another "
                "model (its parameter blocks differ)"
            )
        for key in sorted(set(saved["hparams"]) | set(now["hparams"])):
            old, new = saved["hparams"].get(key), now["hparams"].get(key)
            if key != "lr" and old != new:
                raise ValueError(
                    f"resume_from_checkpoint: the checkpoint's ZO method ran with {key}={old!r}, "
                    f"this run has {new!r}; resume with the same zo_* settings (and seed)"
                )
        if saved["method"] != now["method"]:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint ran {saved['method']}, this run "
                f"{now['method']}; resume with the same zo_method"
            )


class _CheckpointTrajectory(TrainerCallback):
    """Writes ``trajectory.json`` into each checkpoint folder as it is saved."""

    def __init__(self, trainer: ZOTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        zo = self.trainer.zo_optimizer
        if args.should_save and zo is not None and folder.is_dir():
            zo_trajectory(zo).save(folder / TRAJECTORY_NAME)
        return control


class ZOTrainer(Trainer):
    """``transformers.Trainer`` with a zeroth-order method (see the module docstring).

    Args beyond the Trainer's: ``tuner`` a block-scale provider (e.g. an ``l2l.tuner.Tuner``;
    default: ``args.zo_tuner`` loaded, or none); ``base_model`` the id recorded in
    ``results.json`` (default: the model config's ``_name_or_path``).
    """

    def __init__(self, *args: Any, tuner: Any = None, base_model: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ZOTrainingArguments):
            raise TypeError(
                "ZOTrainer needs args=ZOTrainingArguments(...) (TrainingArguments plus the zo_* "
                f"settings), got {type(self.args).__name__}"
            )
        self.tuner, self.base_model = tuner, base_model
        self.tuner_info: dict[str, Any] | None = None
        self.zo_optimizer: ZOOptimizer | None = None
        self._micro_batches: list[tuple[dict, Any]] = []
        self._logged_step = 0
        self.add_callback(_CheckpointTrajectory(self))

    # ---- the optimizer -------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        current = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        if isinstance(current, ZOStep):
            return self.optimizer
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "ZOTrainer does not run under DeepSpeed or FSDP: a ZO step perturbs whole "
                "parameters in place and keeps no optimizer state worth sharding; use data "
                "parallel (DDP) or one process"
            )
        if self.optimizer is not None and not isinstance(self.optimizer, ZOOptimizer):
            raise TypeError(
                f"ZOTrainer got optimizers=({type(self.optimizer).__name__}, ...): pass an "
                "l2l ZO optimizer (record=True) or none, and set the method with zo_method"
            )
        with torch.no_grad():
            zo = self.optimizer if self.optimizer is not None else self._build_method()
        if zo.records is None:
            raise ValueError("ZOTrainer needs a ZO optimizer built with record=True")
        self.zo_optimizer = zo
        self.optimizer = ZOStep(zo)
        return self.optimizer

    def _build_method(self) -> ZOOptimizer:
        args = self.args
        reduce = None
        if self.accelerator.num_processes > 1:  # same seed everywhere; average the losses

            def reduce(losses: torch.Tensor) -> torch.Tensor:
                out = self.accelerator.reduce(losses.to(args.device), reduction="mean")
                return out.cpu()

        return make_method(
            args.zo_method,
            self.model,
            lr=args.learning_rate,
            eps=args.zo_eps,
            weight_decay=args.weight_decay,
            rank=args.zo_rank,
            nu=args.zo_nu,
            momentum=args.zo_momentum,
            hessian_smooth=args.zo_hessian_smooth,
            seed=args.zo_base_seed,
            block_scale=self._block_scale(),
            normalize=args.zo_normalize,
            nonfinite=args.zo_nonfinite,
            record=True,
            loss_reduce=reduce,
        )

    def _block_scale(self) -> Any:
        if self.tuner is None and self.args.zo_tuner is None:
            return None
        from l2l.blocks import ParamBlocks
        from l2l.tuner import Tuner

        tuner = self.tuner
        if tuner is None:
            tuner = Tuner.from_pretrained(self.args.zo_tuner, revision=self.args.zo_tuner_revision)
        if isinstance(tuner, Tuner):
            tuner.check_compatible(ParamBlocks.from_module(self.model))
            self.tuner_info = dict(
                spec=self.args.zo_tuner,
                revision=self.args.zo_tuner_revision,
                base_model=tuner.config.base_model,
                fingerprint=tuner.config.fingerprint,
            )
            tuner = tuner.to(self.args.device)
        return tuner

    # ---- the step ------------------------------------------------------------------------
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Keep the micro-batch; on the last one of an optimizer step, run the ZO step on all.

        Returns the share of the step's loss the Trainer's logging adds up: 0 for the kept
        micro-batches, the step's (mean) loss for the last one.
        """
        self._micro_batches.append((self._prepare_inputs(inputs), num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        model.eval()
        loss = self.zo_optimizer.step(lambda: self._step_loss(model, batches))
        return loss.detach().float().to(self.args.device)

    def _step_loss(self, model: nn.Module, batches: list[tuple[dict, Any]]) -> torch.Tensor:
        """The accumulated batch's loss at the current (perturbed) parameters."""
        total = torch.zeros((), device=self.args.device)
        for inputs, num_items in batches:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            total = total + (
                loss if self._scaled_for_accumulation(num_items) else loss / len(batches)
            )
        return total

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The Trainer's loss for ``zo_objective="lm"``; else the candidate objective, whose
        outputs carry the (B, K) ``candidate_scores`` (see ``l2l.integrations.objectives``)."""
        if self.args.zo_objective == "lm":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, grid = candidate_objective(model, inputs, self.args.zo_objective)
        return (loss, {"loss": loss, "candidate_scores": grid}) if return_outputs else loss

    def _scaled_for_accumulation(self, num_items: Any) -> bool:
        """Whether a micro-batch loss is already normalised over the whole accumulated batch
        (token counts via ``num_items_in_batch``), the Trainer's own rule."""
        if self.args.zo_objective != "lm":
            return False
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        by_items = self.model_accepts_loss_kwargs and num_items is not None
        return by_items or self.compute_loss_func is not None

    # ---- logging, training, outputs -------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.zo_optimizer is not None:
            logs = {k: v for k, v in logs.items() if k != "grad_norm"}
            recent = []
            for record in reversed(self.zo_optimizer.records):
                if record.step < self._logged_step:
                    break
                recent.append(abs(record.grad))
            if recent:
                logs["projected_grad"] = sum(recent) / len(recent)
            self._logged_step = self.state.global_step
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint:
            _check_checkpoint(resume_from_checkpoint, self.args.output_dir)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.args.should_save:
            self.save_finetune(self.args.output_dir)
        return output

    def final_trajectory(self) -> Trajectory:
        """The trajectory that rebuilds ``self.model``: up to the best checkpoint when
        ``load_best_model_at_end`` loaded it, else every step."""
        trajectory = zo_trajectory(self.zo_optimizer)
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best:
            done = TrainerState.load_from_json(str(Path(best) / "trainer_state.json")).global_step
            trajectory.records = [r for r in trajectory.records if r.step < done]
        return trajectory

    def save_finetune(self, folder: str | Path) -> Path:
        """Write ``trajectory.json`` and ``results.json`` (with the weights' sha256) to
        ``folder``: what ``l2l.push_finetuned`` uploads."""
        if self.zo_optimizer is None:
            raise ValueError("nothing to save: train() has not built the ZO optimizer yet")
        folder = Path(folder)
        trajectory = self.final_trajectory()
        trajectory.save(folder / TRAJECTORY_NAME)
        write_json(folder / RESULTS_NAME, self._results(trajectory))
        return folder

    def _results(self, trajectory: Trajectory) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(base, "config", None)
        peft = getattr(model, "peft_config", None)
        return dict(
            trainer="transformers",
            method=self.args.zo_method,
            model=self.base_model or getattr(config, "_name_or_path", None) or None,
            model_revision=getattr(config, "_commit_hash", None),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            objective=self.args.zo_objective,
            tuner=self.tuner_info,
            peft=next(iter(peft.values())).peft_type.value.lower() if peft else None,
            steps=trajectory.records[-1].step + 1 if trajectory.records else 0,
            config=self.args.zo_config(),
            metrics=_final_metrics(self.state.log_history),
            weights_sha256=weights_sha256(model),
            status="finished",
        )


def _check_checkpoint(resume: str | bool, output_dir: str) -> None:
    folder = get_last_checkpoint(output_dir) if resume is True else str(resume)
    if folder and not (Path(folder) / OPTIMIZER_FILE).is_file():
        raise ValueError(
            f"resume_from_checkpoint: {folder} has no {OPTIMIZER_FILE}, which holds the ZO "
            "method's state and trajectory; without it the run cannot continue exactly "
            "(checkpoints written with save_only_model=True cannot resume a ZO run)"
        )


def _final_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of the training loss, projected gradient and each eval metric."""
    keep = ("loss", "train_loss", "projected_grad")
    out: dict[str, float] = {}
    for entry in history:
        for key, value in entry.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and (key in keep or key.startswith("eval_")):
                out[key] = float(value)
    return out
