"""One fine-tuning run: setup -> zero-shot eval -> ZO steps (with checkpoints) -> final eval.

Output folder (every file replaced atomically):
  results.json     method, task, model, tuner, steps, per-step train loss, evals, time, memory
  trajectory.json  (seed, projected gradient) per step: with the base model it rebuilds the
                   fine-tuned weights bit-for-bit (``l2l.replay``); it is also the checkpoint
  state.json       the optimizer's small state + progress, for ``--resume``
  model/           the fine-tuned weights as safetensors (``--save-model``)

Resuming replays the trajectory onto the freshly loaded base model (one update pass per step, no
forwards), restores the optimizer's state and continues with the same batches and seeds, so an
interrupted-then-resumed run ends with exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.io import check_writable, read_json, write_json
from l2l import LOZO, ZOSGD, HiZOO, Trajectory, apply_records
from l2l.methods.base import ZOOptimizer

METHODS = ("mezo", "hizoo", "lozo", "lozo-m")
RESULTS, TRAJECTORY, STATE, MODEL_DIR = "results.json", "trajectory.json", "state.json", "model"


@dataclass
class RunConfig:
    model: str
    task: str
    method: str = "mezo"
    tuner: str | None = None
    steps: int = 100
    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    eval_every: int = 0
    eval_examples: int = 200
    n_train: int = 1000
    n_dev: int = 500
    n_test: int = 1000
    seed: int = 0
    dtype: str = "float32"
    max_length: int = 256
    rank: int = 2
    nu: int = 50
    momentum: float = 0.9
    hessian_smooth: float = 1e-8
    checkpoint_every: int = 50
    nonfinite: str = "raise"
    peft: str | None = None
    save_model: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def make_optimizer(cfg: RunConfig, model, block_scale, loss_reduce=None) -> ZOOptimizer:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown --method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    common = dict(
        lr=cfg.lr,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        block_scale=block_scale,
        nonfinite=cfg.nonfinite,
        record=True,
        loss_reduce=loss_reduce,
    )
    if cfg.method == "mezo":
        return ZOSGD(model, **common)
    if cfg.method == "hizoo":
        return HiZOO(model, hessian_smooth=cfg.hessian_smooth, **common)
    momentum = cfg.momentum if cfg.method == "lozo-m" else 0.0
    return LOZO(model, rank=cfg.rank, nu=cfg.nu, momentum=momentum, **common)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of global step ``step``: epoch-wise seeded permutations, no state needed."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[offset * batch_size : (offset + 1) * batch_size]


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Run:
    """Holds the pieces of a run; :meth:`fit` does the steps. Rank 0 alone writes files."""

    def __init__(
        self,
        cfg,
        model,
        tokenizer,
        task,
        optimizer,
        output: Path,
        *,
        fabric=None,
        progress: bool = True,
        tuner_info: dict | None = None,
    ) -> None:
        self.cfg, self.model, self.tokenizer, self.task = cfg, model, tokenizer, task
        self.opt, self.output, self.fabric, self.progress = optimizer, output, fabric, progress
        self.rank = fabric.global_rank if fabric else 0
        self.world = fabric.world_size if fabric else 1
        self.device = next(model.parameters()).device
        self.results: dict[str, Any] = dict(
            config=asdict(cfg),
            tuner=tuner_info,
            train_loss=[],
            evals=[],
            eval_before=None,
            eval_after=None,
            nonfinite_steps=0,
            wall_time_s=0.0,
            status="running",
        )
        if self.rank == 0:
            check_writable(output)

    # ---- data ----------------------------------------------------------------------------
    def closure_for(self, step: int):
        from finetune.tasks import loss_batch

        train = self.task.train
        idx = batch_indices(step, len(train), self.cfg.batch_size, self.cfg.seed)
        mine = [train[i] for i in idx[self.rank :: self.world]]  # this rank's shard
        batch = loss_batch(mine, self.tokenizer, max_length=self.cfg.max_length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return lambda: self.model(**batch).loss

    def evaluate(self, split: str) -> dict:
        from finetune.tasks import evaluate

        examples = self.task.split(split)[: self.cfg.eval_examples]
        metrics = evaluate(
            self.model,
            self.tokenizer,
            examples,
            progress=self.progress,
            max_length=self.cfg.max_length,
        )
        return dict(metrics, split=split)

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, status: str) -> None:
        if self.rank != 0:
            return
        self.results.update(
            status=status, nonfinite_steps=self.opt.nonfinite_steps, steps_done=self.opt.step_count
        )
        Trajectory.from_optimizer(self.opt).save(self.output / TRAJECTORY)
        write_json(self.output / STATE, dict(zo=self.opt.zo_state(), results=self.results))
        write_json(self.output / RESULTS, self.results)

    def resume(self) -> int:
        """Replay the saved trajectory and restore the optimizer; returns the next step."""
        state = read_json(self.output / STATE, "run state (state.json)")
        traj = Trajectory.load(self.output / TRAJECTORY)
        if traj.fingerprint != self.opt.blocks.fingerprint():
            raise ValueError(f"{self.output / TRAJECTORY} was recorded on another model")
        saved = state["results"]["config"]
        for key in ("method", "lr", "eps", "seed", "task", "batch_size"):
            if saved.get(key) != getattr(self.cfg, key):
                raise ValueError(
                    f"--resume: {key} was {saved.get(key)!r}, now {getattr(self.cfg, key)!r}; "
                    "resume with the same settings or use a new --output"
                )
        apply_records(self.opt, traj.records)
        self.opt.load_zo_state(state["zo"])
        self.results = dict(state["results"], config=asdict(self.cfg))
        return self.opt.step_count

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, start_step: int = 0) -> dict:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        cfg, t0 = self.cfg, time.perf_counter()
        elapsed0 = self.results.get("wall_time_s", 0.0)
        if self.results["eval_before"] is None and self.rank == 0:
            self.results["eval_before"] = self.evaluate("test")
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.2f} steps/s"),
            TimeRemainingColumn(),
        ]
        try:
            with Progress(*columns, disable=not self.progress or self.rank != 0) as bar:
                job = bar.add_task(
                    f"{cfg.method} on {self.task.name}",
                    total=cfg.steps,
                    completed=start_step,
                    loss=float("nan"),
                    rate=0.0,
                )
                for step in range(start_step, cfg.steps):
                    loss = float(self.opt.step(self.closure_for(step)))
                    self.results["train_loss"].append(loss)
                    rate = (step + 1 - start_step) / (time.perf_counter() - t0)
                    bar.update(job, advance=1, loss=loss, rate=rate)
                    self._maybe_eval_and_save(step + 1)
        except BaseException:
            self.results["wall_time_s"] = elapsed0 + time.perf_counter() - t0
            self.save("interrupted")  # the last completed step is never lost
            raise
        if self.rank == 0:
            self.results["eval_after"] = self.evaluate("test")
        self.results["wall_time_s"] = elapsed0 + time.perf_counter() - t0
        self.results["peak_memory_bytes"] = peak_memory_bytes(self.device)
        self.save("finished")
        if cfg.save_model and self.rank == 0:
            self.save_model()
        return self.results

    def _maybe_eval_and_save(self, done: int) -> None:
        cfg = self.cfg
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps and self.rank == 0:
            self.results["evals"].append(dict(self.evaluate("dev"), step=done))
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            self.save("running")

    def save_model(self) -> Path:
        from l2l.tuner import atomic_directory

        target = self.output / MODEL_DIR
        with atomic_directory(target) as staged:
            self.model.save_pretrained(staged, safe_serialization=True)
            self.tokenizer.save_pretrained(staged)
        return target
