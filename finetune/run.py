"""One fine-tuning run: setup -> zero-shot eval -> ZO steps (with checkpoints) -> final eval.

Output folder (every file replaced atomically):
  results.json     method, task, model, tuner, steps, per-step train loss, evals, time, memory
  trajectory.json  (seed, projected gradient) per step: with the base model it rebuilds the
                   fine-tuned weights bit-for-bit (``l2l.replay``); it is also the checkpoint
  state.json       the optimizer's small state + progress, for ``--resume``
  model/           the fine-tuned weights as safetensors (``--save_model``)

results.json also says which ``lr``, ``eps`` and ``normalize`` the run used and where each came
from (``resolved``: user, tuner, registry or default), and ``status``: running, interrupted,
failed or finished ("finished" only once every requested file is written).

Resuming replays the trajectory onto the freshly loaded base model (one update pass per step, no
forwards), restores the optimizer's state and continues with the same batches and seeds, so an
interrupted-then-resumed run ends with exactly the parameters of an uninterrupted one;
:mod:`finetune.checkpoint` first checks that nothing that decides the result has changed.

Interrupts (SIGINT, and SIGTERM through :func:`llm.cli.run_command`) save the last completed
step; the steps are also saved before the final evaluation, so an interrupt there loses none.

Data parallel (``--strategy ddp``): every rank takes the same step seed, runs the forwards on its
shard of the global batch and all-reduces the 2 (HiZOO: 3) float64 losses of the step, so all
ranks apply the identical update. Each shard's mean loss is weighted by its share of the
batch's answer tokens, which makes the reduced loss the global batch's token mean (what one
process computes). Evaluation is sharded the same way; only rank 0 writes files.
"""

from __future__ import annotations

import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from finetune.checkpoint import check_resume, records_summary
from finetune.config import FinetuneConfig
from finetune.io import (
    MODEL_DIR,
    RESULTS,
    STATE,
    TRAJECTORY,
    OutputError,
    clear_run,
    explain_write_error,
    read_json,
    write_json,
)
from finetune.metrics import lr_at, print_line, shows_bar
from finetune.parallel import LossAllReduce, replicas_identical
from l2l import NonFiniteLossError, Trajectory, apply_records
from l2l.io import atomic_directory
from l2l.methods.base import ZOOptimizer
from l2l.methods.factory import make_method


def make_optimizer(cfg: FinetuneConfig, model, block_scale, loss_reduce=None) -> ZOOptimizer:
    """The ZO method of ``cfg`` (resolved: ``lr``, ``eps`` and ``normalize`` are set)."""
    return make_method(
        cfg.method,
        model,
        lr=cfg.lr,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        rank=cfg.rank,
        nu=cfg.nu,
        momentum=cfg.momentum,
        hessian_smooth=cfg.hessian_smooth,
        seed=cfg.seed,
        block_scale=block_scale,
        normalize=cfg.normalize,
        nonfinite=cfg.on_nonfinite,
        record=True,
        loss_reduce=loss_reduce,
    )


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
        cfg: FinetuneConfig,
        model,
        tokenizer,
        task,
        optimizer,
        output: Path,
        *,
        fabric=None,
        progress: bool = True,
        tuner_info: dict | None = None,
        resolved: dict | None = None,
        identity: dict | None = None,
    ) -> None:
        self.cfg, self.model, self.tokenizer, self.task = cfg, model, tokenizer, task
        self.opt, self.output, self.fabric, self.progress = optimizer, output, fabric, progress
        self.rank = fabric.global_rank if fabric else 0
        self.world = fabric.world_size if fabric else 1
        self.device = next(model.parameters()).device  # where batches go (the embedding's)
        self.devices = sorted({p.device for p in model.parameters()}, key=str)  # device_map
        self._units: dict[int, int] = {}  # train index -> what the loss averages over (DDP)
        from llm.tasks import resolve_objective

        self.objective = resolve_objective(cfg.objective, task)  # auto -> the task's default
        self.max_length = task.max_length if cfg.max_length is None else cfg.max_length
        self.results: dict[str, Any] = dict(
            self._header(),
            objective=self.objective,
            max_length=self.max_length,
            tuner=tuner_info,
            resolved={k: dict(value=v.value, source=v.source) for k, v in (resolved or {}).items()},
            train_loss=[],
            evals=[],
            eval_before=None,
            eval_after=None,
            nonfinite_steps=0,
            wall_time_s=0.0,
            status="running",
        )
        self.identity = identity or {}
        self.saved_steps: int | None = None  # steps in --output as of the last good save
        self.phase = "setup"  # setup, steps, final evaluation, model, done

    def _header(self) -> dict[str, Any]:
        cfg = self.cfg
        return dict(
            method=cfg.method, task=cfg.task, model=cfg.model, steps=cfg.steps, config=cfg.to_dict()
        )

    # ---- data ----------------------------------------------------------------------------
    def closure_for(self, step: int):
        """The closure of global step ``step``: the objective's loss on this rank's shard,
        weighted by the shard's share of the loss units (answer tokens for ``lm``, examples
        otherwise; see :func:`llm.tasks.objective_batch`).

        With ``W`` ranks, shard ``r`` holding ``n_r`` of the ``N`` units returns
        ``mean_r * n_r * W / N``, whose all-reduce mean is the mean over the global batch.
        """
        from llm.tasks import objective_batch, objective_loss

        train, cfg = self.task.train, self.cfg
        idx = batch_indices(step, len(train), cfg.batch_size, cfg.seed)
        mine = idx[self.rank :: self.world]
        examples = [train[i] for i in mine]
        batch = objective_batch(examples, self.tokenizer, self.objective, self.max_length)
        weight = 1.0
        if self.world > 1:
            weight = sum(self._loss_units(i) for i in mine) * self.world
            weight /= sum(self._loss_units(i) for i in idx)
        batch = batch.to(self.device)
        return lambda: objective_loss(self.model, batch) * weight

    def _loss_units(self, index: int) -> int:
        """Loss units of training example ``index`` (they add up over a batch), cached."""
        from llm.tasks import objective_batch

        if index not in self._units:
            example = self.task.train[index]
            batch = objective_batch([example], self.tokenizer, self.objective, self.max_length)
            self._units[index] = batch.units
        return self._units[index]

    def evaluate(self, split: str) -> dict:
        """Metrics on the whole test split (its size is ``n_test``), or on the first
        ``eval_examples`` of dev; sharded over the ranks."""
        from llm.tasks import evaluate

        examples = self.task.split(split)
        if split != "test":
            examples = examples[: self.cfg.eval_examples]
        mine = examples[self.rank :: self.world]
        metrics = {"n": 0}
        if mine:
            metrics = evaluate(
                self.model,
                self.tokenizer,
                mine,
                progress=self.progress and self.rank == 0,
                max_length=self.max_length,
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

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, status: str, collective: bool = True) -> None:
        """Write trajectory, state and results (rank 0). ``collective``: every rank calls it
        and learns whether rank 0 succeeded, so a full disk stops all ranks, not just rank 0."""
        self._on_rank0(lambda: self._write(status), collective)
        self.saved_steps = self.opt.step_count
        if self.rank == 0:
            for logger in self._loggers():  # the logged metrics reach disk with the state
                logger.save()

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
        self.output.mkdir(parents=True, exist_ok=True)
        # trajectory first: it may run ahead of state.json, never behind (resume drops the rest)
        try:
            Trajectory.from_optimizer(self.opt).save(self.output / TRAJECTORY)
        except OSError as e:
            raise explain_write_error(self.output / TRAJECTORY, e) from e
        state = dict(
            zo=self.opt.zo_state(),
            records=records_summary(self.opt.records),
            identity=self.identity,
            results=self.results,
        )
        write_json(self.output / STATE, state)
        write_json(self.output / RESULTS, self.results)

    def begin(self) -> int:
        """The step to start from: with ``--resume`` the saved run's (:meth:`resume`), else 0,
        after removing every file of an old run in the folder (``--overwrite``)."""
        if self.cfg.resume:
            return self.resume()
        if self.cfg.overwrite and self.rank == 0:
            clear_run(self.output)
        return 0

    def resume(self) -> int:
        """Check the saved run (:func:`finetune.checkpoint.check_resume`), replay its
        trajectory and restore the optimizer; returns the next step."""
        state = read_json(self.output / STATE, "run state (state.json)")
        if not (self.output / TRAJECTORY).is_file():
            raise OutputError(f"--resume: {self.output / TRAJECTORY} is missing")
        records = check_resume(
            self.output,
            state,
            Trajectory.load(self.output / TRAJECTORY),
            config=self.cfg.to_dict(),
            identity=self.identity,
            fingerprint=self.opt.blocks.fingerprint(),
        )
        apply_records(self.opt, records)
        self.opt.load_zo_state(state["zo"])
        self.results = dict(state["results"], **self._header())
        self.saved_steps = self.opt.step_count
        stale = self.output / MODEL_DIR
        if self.rank == 0 and self.cfg.steps > self.saved_steps and stale.is_dir():
            shutil.rmtree(stale)  # the weights of an earlier step: more steps follow
        return self.opt.step_count

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, start_step: int = 0) -> dict:
        """Zero-shot test evaluation, the steps, the final evaluation, then the files. An
        interrupt or a failure first saves the last completed step (:meth:`_save_progress`)."""
        cfg, t0 = self.cfg, time.perf_counter()
        elapsed0 = self.results.get("wall_time_s", 0.0)
        try:
            if self.results["eval_before"] is None:
                self.results["eval_before"] = self.evaluate("test")
            t_train = time.perf_counter()
            self.phase = "steps"
            self._steps(start_step)
            train_s = time.perf_counter() - t_train
            if self.saved_steps != self.opt.step_count:
                self.save("running")  # every step is safe before the final evaluation
            self.phase = "final evaluation"
            self.results["eval_after"] = self.evaluate("test")
        except BaseException as err:
            self.results["wall_time_s"] = elapsed0 + time.perf_counter() - t0
            self._save_progress(err)
            raise
        self.results["wall_time_s"] = elapsed0 + time.perf_counter() - t0
        self.results["train_time_s"] = train_s
        self.results["steps_per_s"] = (cfg.steps - start_step) / train_s if train_s > 0 else None
        self.results["peak_memory_bytes"] = sum(peak_memory_bytes(d) for d in self.devices)
        if isinstance(self.opt.loss_reduce, LossAllReduce):
            self.results["communication"] = self.opt.loss_reduce.report(self.world)
            self.results["replicas_identical"] = replicas_identical(
                self.fabric, self.opt.blocks.params
            )
        from l2l.finetuned import weights_sha256
        from llm.ids import base_model_id

        self.results["base_model"] = base_model_id(cfg.model, self.model)
        self.results["weights_sha256"] = weights_sha256(self.model)  # what replay must rebuild
        if cfg.save_model:
            self.phase = "model"
            self._save_model_or_fail()
        self.save("finished")
        self.phase = "done"
        return self.results

    def _save_progress(self, err: BaseException) -> None:
        """After ``err`` stopped the run: save the last completed step, unless nothing is
        there to save (no step done and nothing saved before)."""
        if isinstance(err, NonFiniteLossError):  # the failed step counts, as with "skip"
            self.results["train_loss"].append(float("nan"))
        if self.saved_steps is None and self.opt.step_count == 0:
            return
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        try:  # not collective: after Ctrl-C the ranks are not in step
            self.save(status, collective=False)  # the last completed step is never lost
        except OSError:
            if not isinstance(err, OSError):
                raise

    def _save_model_or_fail(self) -> None:
        """Write model/ (collective: no rank exits while rank 0 still writes); when that fails,
        results.json says so ("failed", with the error) and the error goes on."""
        try:
            self._on_rank0(self.save_model, collective=True)
        except OSError as err:
            self.results["error"] = str(err)
            try:
                self.save("failed", collective=False)
            except OSError:
                pass  # the disk refuses even results.json: the files before stay intact
            raise

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
        with Progress(*columns, disable=not shows_bar(self.progress) or self.rank != 0) as bar:
            job = bar.add_task(
                f"{cfg.method} on {self.task.name}",
                total=cfg.steps,
                completed=start_step,
                loss=float("nan"),
                rate=0.0,
            )
            for step in range(start_step, cfg.steps):
                self.opt.param_groups[0]["lr"] = lr_at(step, cfg)
                loss = float(self.opt.step(self.closure_for(step)))
                self.results["train_loss"].append(loss)
                rate = (step + 1 - start_step) / (time.perf_counter() - t0)
                bar.update(job, advance=1, loss=loss, rate=rate)
                self._log(step + 1, loss, rate)
                self._maybe_eval_and_save(step + 1)

    def _loggers(self) -> list:
        """The Fabric loggers of ``--logger`` (none without a Fabric, or for ``none``)."""
        return list(getattr(self.fabric, "loggers", None) or [])

    def _log(self, done: int, loss: float, rate: float) -> None:
        """Train loss, lr, projected gradient and steps/s to the loggers every --log_every
        steps (and as a plain line when no progress bar is shown)."""
        cfg = self.cfg
        if done % cfg.log_every and done != cfg.steps:
            return
        record = self.opt.records[-1] if self.opt.records else None
        metrics = dict(train_loss=loss, lr=self.opt.param_groups[0]["lr"], steps_per_s=rate)
        if record is not None:
            metrics["projected_grad"] = record.grad
        if self._loggers():
            self.fabric.log_dict(metrics, step=done)
        if self.rank == 0 and not shows_bar(self.progress):
            print_line(done, cfg.steps, metrics)

    def _maybe_eval_and_save(self, done: int) -> None:
        cfg = self.cfg
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            self.results["evals"].append(dict(self.evaluate("dev"), step=done))  # every rank
            if self._loggers():
                numbers = {k: v for k, v in self.results["evals"][-1].items() if k != "step"}
                self.fabric.log_dict(
                    {f"dev_{k}": v for k, v in numbers.items() if isinstance(v, int | float)},
                    step=done,
                )
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            self.save("running")

    def save_model(self) -> Path:
        """The fine-tuned weights and tokenizer as a Hugging Face folder, swapped in whole."""
        target = self.output / MODEL_DIR
        try:
            with atomic_directory(target) as staged:
                staged.chmod(0o755)  # a staging folder is created 0700
                self.model.save_pretrained(staged, safe_serialization=True)
                self.tokenizer.save_pretrained(staged)
        except Exception as e:  # safetensors reports a full disk as its own error type
            raise explain_write_error(target, e) from e
        return target
