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

Data parallel (``--strategy ddp``): every rank takes the same step seed, runs the forwards on its
shard of the global batch and all-reduces the 2 (HiZOO: 3) float64 losses of the step, so all
ranks apply the identical update. Each shard's mean loss is weighted by its share of the
batch's answer tokens, which makes the reduced loss the global batch's token mean (what one
process computes). Evaluation is sharded the same way; only rank 0 writes files.
"""

from __future__ import annotations

import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.io import OutputError, check_writable, explain_write_error, read_json, write_json
from l2l import LOZO, ZOSGD, HiZOO, NonFiniteLossError, Trajectory, apply_records
from l2l.methods.base import ZOOptimizer

METHODS = ("mezo", "hizoo", "lozo", "lozo-m")
# settings that decide the parameters a step produces: --resume refuses to change them
RESUME_KEYS = (
    "model", "task", "method", "tuner", "lr", "eps", "weight_decay", "batch_size", "n_train",
    "seed", "dtype", "max_length", "rank", "nu", "momentum", "hessian_smooth", "peft",
)  # fmt: skip
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


class LossAllReduce:
    """``loss_reduce`` for data parallel ZO: the all-reduce mean of a step's loss scalars.

    It also counts what it sends: one all-reduce of 2 (HiZOO: 3) float64 values per step.
    """

    def __init__(self, fabric) -> None:
        self.fabric = fabric
        self.calls = 0
        self.payload_bytes = 0

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.payload_bytes += losses.numel() * losses.element_size()
        return self.fabric.all_reduce(losses.to(self.fabric.device), reduce_op="mean").cpu()

    def report(self, world_size: int) -> dict[str, Any]:
        per_step = self.payload_bytes / self.calls if self.calls else 0
        return dict(
            world_size=world_size,
            all_reduces_per_step=1,
            payload_bytes_per_step=per_step,
            dtype="float64",
            note="loss scalars only; evaluation adds one small all-reduce per evaluation",
        )


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal-LM loss averages over (labels are shifted left by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


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
        self.device = next(model.parameters()).device  # where batches go (the embedding's)
        self.devices = sorted({p.device for p in model.parameters()}, key=str)  # device_map
        self._token_counts: dict[int, int] = {}  # train index -> answer tokens (data parallel)
        self.results: dict[str, Any] = dict(
            self._header(),
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

    def _header(self) -> dict[str, Any]:
        cfg = self.cfg
        return dict(
            method=cfg.method, task=cfg.task, model=cfg.model, steps=cfg.steps, config=asdict(cfg)
        )

    # ---- data ----------------------------------------------------------------------------
    def closure_for(self, step: int):
        """The closure of global step ``step``: this rank's shard, weighted by its token share.

        With ``W`` ranks, shard ``r`` holding ``n_r`` of the ``N`` answer tokens returns
        ``mean_r * n_r * W / N``, whose all-reduce mean is the token mean of the global batch.
        """
        from llm.tasks import loss_batch

        train, cfg = self.task.train, self.cfg
        idx = batch_indices(step, len(train), cfg.batch_size, cfg.seed)
        mine = idx[self.rank :: self.world]
        batch = loss_batch([train[i] for i in mine], self.tokenizer, cfg.max_length)
        weight = 1.0
        if self.world > 1:
            weight = sum(self._answer_tokens(i) for i in mine) * self.world
            weight /= sum(self._answer_tokens(i) for i in idx)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return lambda: self.model(**batch).loss * weight

    def _answer_tokens(self, index: int) -> int:
        """Loss tokens of training example ``index`` (they add up over a batch), cached."""
        from llm.tasks import loss_batch

        if index not in self._token_counts:
            example = self.task.train[index]
            batch = loss_batch([example], self.tokenizer, self.cfg.max_length)
            self._token_counts[index] = answer_tokens(batch)
        return self._token_counts[index]

    def evaluate(self, split: str) -> dict:
        """Metrics on the first ``eval_examples`` of ``split``; sharded over the ranks."""
        from llm.tasks import evaluate

        examples = self.task.split(split)[: self.cfg.eval_examples]
        mine = examples[self.rank :: self.world]
        metrics = {"n": 0}
        if mine:
            metrics = evaluate(
                self.model,
                self.tokenizer,
                mine,
                progress=self.progress and self.rank == 0,
                max_length=self.cfg.max_length,
            )
        if self.world > 1:
            metrics = self._gather_metrics(metrics)
        return dict(metrics, split=split)

    def _gather_metrics(self, metrics: dict) -> dict:
        """Every rank's example-weighted metrics summed by one all-reduce (all ranks call it)."""
        keys = ["accuracy"] if self.task.kind == "classification" else ["f1", "exact_match"]
        n = metrics["n"]
        local = [metrics.get(k, 0.0) * n for k in keys] + [float(n)]
        sums = torch.tensor(local, dtype=torch.float64, device=self.fabric.device)
        sums = self.fabric.all_reduce(sums, reduce_op="sum").cpu().tolist()
        total = int(round(sums[-1]))
        out = {k: v / max(total, 1) for k, v in zip(keys, sums, strict=False)}
        if "accuracy" in out:  # a count of correct examples: keep it exact
            out["accuracy"] = round(sums[0]) / max(total, 1)
        return dict(out, n=total)

    def replicas_identical(self) -> bool:
        """Whether every rank holds the same parameters: float64 sum and sum of squares of each
        block, whose all-reduce max and min agree only when every rank has the same values."""
        local = torch.stack(
            [
                torch.stack([p.double().sum(), p.double().square().sum()])
                for p in self.opt.blocks.params
            ]
        ).to(self.fabric.device)  # (P, 2)
        high = self.fabric.all_reduce(local.clone(), reduce_op="max")
        low = self.fabric.all_reduce(local.clone(), reduce_op="min")
        return bool(torch.equal(high, low))

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, status: str, collective: bool = True) -> None:
        """Write trajectory, state and results (rank 0). ``collective``: every rank calls it
        and learns whether rank 0 succeeded, so a full disk stops all ranks, not just rank 0."""
        self._on_rank0(lambda: self._write(status), collective)

    def _on_rank0(self, write, collective: bool) -> None:
        error = None
        if self.rank == 0:
            try:
                write()
            except Exception as e:  # any failure: the other ranks must hear of it
                error = e
        if collective and self.world > 1:
            message = self.fabric.broadcast(str(error) if error else None, src=0)
            if message and error is None:
                raise OutputError(message)
        if error is not None:
            raise error

    def _write(self, status: str) -> None:
        self.results.update(
            status=status, nonfinite_steps=self.opt.nonfinite_steps, steps_done=self.opt.step_count
        )
        # trajectory first: it may run ahead of state.json, never behind (resume trims it)
        try:
            Trajectory.from_optimizer(self.opt).save(self.output / TRAJECTORY)
        except OSError as e:
            raise explain_write_error(self.output / TRAJECTORY, e) from e
        write_json(self.output / STATE, dict(zo=self.opt.zo_state(), results=self.results))
        write_json(self.output / RESULTS, self.results)

    def resume(self) -> int:
        """Replay the saved trajectory and restore the optimizer; returns the next step."""
        state = read_json(self.output / STATE, "run state (state.json)")
        traj = Trajectory.load(self.output / TRAJECTORY)
        if traj.fingerprint != self.opt.blocks.fingerprint():
            raise ValueError(f"{self.output / TRAJECTORY} was recorded on another model")
        saved = state["results"]["config"]
        for key in RESUME_KEYS:
            if saved.get(key) != getattr(self.cfg, key):
                raise ValueError(
                    f"--resume: {key} was {saved.get(key)!r}, now {getattr(self.cfg, key)!r}; "
                    "resume with the same settings or use a new --output"
                )
        done = int(state["zo"]["step_count"])
        apply_records(self.opt, [r for r in traj.records if r.step < done])
        self.opt.load_zo_state(state["zo"])
        self.results = dict(state["results"], **self._header())
        return self.opt.step_count

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, start_step: int = 0) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        elapsed0 = self.results.get("wall_time_s", 0.0)
        if self.results["eval_before"] is None:
            self.results["eval_before"] = self.evaluate("test")
        t_train = time.perf_counter()
        try:
            self._steps(start_step)
        except BaseException as err:
            self.results["wall_time_s"] = elapsed0 + time.perf_counter() - t0
            if isinstance(err, NonFiniteLossError):  # the failed step counts, as with "skip"
                self.results["train_loss"].append(float("nan"))
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            try:  # not collective: after Ctrl-C the ranks are not in step
                self.save(status, collective=False)  # the last completed step is never lost
            except OSError:
                if not isinstance(err, OSError):
                    raise
            raise
        train_s = time.perf_counter() - t_train
        self.results["eval_after"] = self.evaluate("test")
        self.results["wall_time_s"] = elapsed0 + time.perf_counter() - t0
        self.results["train_time_s"] = train_s
        self.results["steps_per_s"] = (cfg.steps - start_step) / train_s if train_s > 0 else None
        self.results["peak_memory_bytes"] = sum(peak_memory_bytes(d) for d in self.devices)
        if isinstance(self.opt.loss_reduce, LossAllReduce):
            self.results["communication"] = self.opt.loss_reduce.report(self.world)
            self.results["replicas_identical"] = self.replicas_identical()
        self.save("finished")
        if cfg.save_model:  # collective: no rank exits while rank 0 still writes
            self._on_rank0(self.save_model, collective=True)
        return self.results

    def _steps(self, start_step: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        cfg, t0 = self.cfg, time.perf_counter()
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.2f} steps/s"),
            TimeRemainingColumn(),
        ]
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

    def _maybe_eval_and_save(self, done: int) -> None:
        cfg = self.cfg
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            self.results["evals"].append(dict(self.evaluate("dev"), step=done))  # every rank
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            self.save("running")

    def save_model(self) -> Path:
        from l2l.tuner import atomic_directory

        target = self.output / MODEL_DIR
        try:
            with atomic_directory(target) as staged:
                os.chmod(staged, 0o755)  # a staging folder is created 0700
                self.model.save_pretrained(staged, safe_serialization=True)
                self.tokenizer.save_pretrained(staged)
        except OSError as e:
            raise explain_write_error(target, e) from e
        return target
