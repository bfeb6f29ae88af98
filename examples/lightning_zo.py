"""Zeroth-order fine-tuning inside your own LightningModule, with manual optimisation.

An l2l ZO method is a ``torch.optim.Optimizer`` whose ``step(closure)`` evaluates the closure
(a forward pass returning the loss) at ``theta + eps u`` and ``theta - eps u`` and updates
``theta``; no backward pass runs and no gradient is allocated. In Lightning that is manual
optimisation, three lines in ``training_step``::

    self.automatic_optimization = False                      # in __init__
    opt = self.optimizers()                                  # in training_step
    loss = opt.step(closure=lambda: self.model(**batch).loss)

Lightning's own schedulers, loggers, precision (``32-true``, ``bf16-true``), checkpoints and
callbacks work unchanged (the optimizer's ``state_dict`` holds the ZO state). The recorded
trajectory (``record=True``) is the whole fine-tune: ``on_train_end`` saves it, and
``l2l.replay`` or ``l2l.load_finetuned`` rebuild the weights from it and the base model.

    python examples/lightning_zo.py --steps 50 --output runs/lightning_zo
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import lightning as L
import torch

from l2l import MeZO, Trajectory
from llm.models import load_model
from llm.tasks import load_task, loss_batch


class ZOFineTune(L.LightningModule):
    """A causal LM fine-tuned with MeZO; any l2l method (HiZOO, LOZO, a tuner) drops in."""

    def __init__(self, model, lr: float = 1e-3, eps: float = 1e-3, warmup: int = 5) -> None:
        super().__init__()
        self.model, self.lr, self.eps, self.warmup = model, lr, eps, warmup
        self.automatic_optimization = False  # the ZO step runs its own forwards
        self.trajectory_path: Path | None = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.model.eval()  # both perturbed forwards must see the same network (no dropout)
        opt = self.optimizers()
        loss = opt.step(closure=lambda: self.model(**batch).loss)
        self.lr_schedulers().step()
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", opt.param_groups[0]["lr"])
        return loss

    def configure_optimizers(self):
        opt = MeZO(self.model, lr=self.lr, eps=self.eps, record=True)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": warmup}

    def on_train_end(self) -> None:
        if self.trajectory_path is not None and self.trainer.is_global_zero:
            zo = self.optimizers().optimizer  # the MeZO inside Lightning's wrapper
            Trajectory.from_optimizer(zo).save(self.trajectory_path)


def main(argv: list[str] | None = None) -> ZOFineTune:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("runs/lightning_zo"))
    args = parser.parse_args(argv)

    model, tokenizer = load_model("tiny-llama")
    train = load_task("tweets", n_train=args.steps * args.batch_size, n_dev=1, n_test=1).train
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.batch_size,
        collate_fn=partial(loss_batch, tokenizer=tokenizer, max_length=64),
    )
    module = ZOFineTune(model)
    module.trajectory_path = args.output / "trajectory.json"
    args.output.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        default_root_dir=args.output,
        logger=L.pytorch.loggers.CSVLogger(args.output),
        log_every_n_steps=min(10, args.steps),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module


if __name__ == "__main__":
    main()
