"""finetune: zeroth-order fine-tuning of a causal LM on a task, with a learned tuner.

    finetune --tuner smollm2-135m --task movie-reviews --steps 100
    finetune --model facebook/opt-13b --tuner opt-13b --task sst2 --method lozo
    finetune --model tiny-llama --task data.jsonl --tuner none --method hizoo --output out
    finetune --config recipe.yaml            (a file written by --print_config)
    finetune --list_tasks                    (the task names, then exit)

--model defaults to the tuner's base model; --lr, --eps and --normalize default to the tuner's
(results.json says which values were used and where each came from). Results go to --output;
a run there is only continued with --resume or replaced with --overwrite.

Data parallel on N devices (same step seed everywhere, a few bytes of losses all-reduced per
step; results identical to one process on the same global --batch_size):

    finetune --model tiny-llama --task tweets --strategy ddp --devices 2 --accelerator cpu

A model too big for one GPU: --device_map auto splits its layers over the visible GPUs (one
process; every weight must sit on a GPU, nothing offloaded):

    finetune --model facebook/opt-66b --task sst2 --dtype bfloat16 --device_map auto

Exit status: 0 done, 2 an error the message explains (nothing written is left half-written),
130 interrupted by SIGINT or SIGTERM (the last completed step is saved; continue with --resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from jsonargparse import ActionConfigFile, ArgumentParser

from finetune.config import (
    DeviceArgs,
    FinetuneConfig,
    ModelArgs,
    OptimArgs,
    OutputArgs,
    allowed,
    resolve,
)
from finetune.metrics import make_loggers
from l2l.z import GENERATOR
from llm.cli import (
    HelpFormatter,
    UsageError,
    add_dataclass_flags,
    dataclass_from,
    parse_flags,
    run_command,
)

PROG = "finetune"
GROUPS = (ModelArgs, OptimArgs, OutputArgs, DeviceArgs)
PTH_SUFFIXES = (".pth", ".pt", ".bin", ".pkl")


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag help as :class:`llm.cli.HelpFormatter` writes it; the description as written."""


class _ListTasks(argparse.Action):
    """``--list_tasks``: print the registered tasks and exit (no other flag is needed)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from llm.tasks import describe_tasks

        for name, description in describe_tasks().items():
            print(f"{name:16s} {description}")
        print("\nor a local .jsonl/.csv file (text+label or prompt+answer columns)")
        parser.exit(0)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, description=__doc__, exit_on_error=False, formatter_class=_Formatter
    )
    parser.add_argument("--config", action=ActionConfigFile, help="read settings from a YAML file")
    parser.add_argument("--list_tasks", action=_ListTasks, help="print the known tasks and exit")
    for group in GROUPS:
        add_dataclass_flags(parser, group)
    return parser


def parse(argv: Sequence[str] | None = None) -> FinetuneConfig:
    """The settings from ``argv`` (and any ``--config`` file), validated."""
    namespace = parse_flags(build_parser(), argv, allowed=allowed)
    return dataclass_from(FinetuneConfig, namespace).validate()


# ---------------------------------------------------------------------------------- setup


def _load_tuner(cfg: FinetuneConfig):
    """(tuner, folder, registry defaults) for ``--tuner``; a release .pth is pointed to
    ``tuner-zoo import-pth`` instead of being looked up on the Hub."""
    from pathlib import Path

    from l2l.tuner import Tuner
    from tuner_zoo.registry import get_entry
    from tuner_zoo.resolve import resolve_tuner

    path = Path(cfg.tuner).expanduser()
    if path.suffix.lower() in PTH_SUFFIXES or path.is_file():
        raise UsageError(
            f"--tuner {cfg.tuner} names a file; a tuner is a folder with config.json and "
            f"model.safetensors. A ZO Fine-tuner release .pth converts to one (no pickle code "
            f"runs) with `tuner-zoo import-pth {cfg.tuner} ...` (see tuner-zoo import-pth "
            "--help); pass the folder it writes to --tuner"
        )
    folder = resolve_tuner(
        cfg.tuner, revision=cfg.tuner_revision, force_download=cfg.force_download
    )
    tuner = Tuner.load_folder(folder)
    entry = get_entry(cfg.tuner)
    return tuner, folder, dict(entry.method_defaults) if entry else {}


def _fabric(cfg: FinetuneConfig):
    import lightning as L

    devices = int(cfg.devices) if str(cfg.devices).lstrip("-").isdigit() else cfg.devices
    fabric = L.Fabric(
        accelerator=cfg.accelerator,
        devices=devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision="32-true",
        loggers=make_loggers(cfg),
    )
    fabric.launch()
    return fabric


def _apply_peft(model, r: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a declared extra
        raise ImportError("--peft lora needs the peft package: pip install 'l2l-zo[peft]'") from e
    return get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM")
    )


def _on_rank0_verdict(fabric, check) -> None:
    """Run ``check`` on rank 0 (it raises on a problem); every rank learns the verdict."""
    from finetune.io import OutputError

    message = None
    if fabric.global_rank == 0:
        try:
            check()
        except OSError as e:
            message = str(e)
    if fabric.world_size > 1:
        message = fabric.broadcast(message, src=0)
    if message:
        raise OutputError(message)


def _load_data(cfg: FinetuneConfig, world_size: int):
    """The task, with the checks on its training set that need the data."""
    from llm.tasks import load_task

    prompt = {k: v for k, v in (("template", cfg.template), ("label_words", cfg.label_words)) if v}
    task = load_task(
        cfg.task, seed=cfg.seed, n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=cfg.n_test, **prompt
    )
    n = len(task.train)
    if cfg.batch_size > n:
        raise UsageError(
            f"--batch_size {cfg.batch_size} is larger than the training set ({n} examples of "
            f"{task.name}): use --batch_size {n} or less, or more data (--n_train)"
        )
    if cfg.batch_size < world_size:
        raise UsageError(
            f"--batch_size {cfg.batch_size} is the global batch: it needs at least one example "
            f"per rank ({world_size} ranks)"
        )
    return task


def data_warnings(task) -> list[str]:
    """What about the training data may make the run look better than it is."""
    if task.kind != "classification":
        return []
    golds = {e.target for e in task.train}
    if len(golds) == 1:
        return [
            f"every training example of {task.name} has the answer {golds.pop()!r}: always "
            "answering it reaches accuracy 1.0 on such data, whatever the model learns"
        ]
    return []


def setup(cfg: FinetuneConfig):
    """Resolve tuner, model, task and optimizer; returns a ready :class:`finetune.run.Run`."""
    import torch

    from finetune.checkpoint import data_digest, tensors_digest
    from finetune.io import check_free_space, check_output, check_writable
    from finetune.parallel import LossAllReduce
    from finetune.run import Run, make_optimizer
    from llm.ids import offline_name
    from llm.models import load_model

    cfg.validate()
    tuner, tuner_info, registry = None, None, {}
    if cfg.uses_tuner:
        tuner, folder, registry = _load_tuner(cfg)
        tuner_info = dict(
            spec=cfg.tuner,
            folder=str(folder),
            base_model=tuner.config.base_model,
            fingerprint=tuner.config.fingerprint,
            weights_sha256=tensors_digest(tuner),
        )
    block_scale = tuner
    if cfg.heuristic_scale:
        from l2l.scales import HEURISTICS

        block_scale = HEURISTICS[cfg.heuristic_scale]
        tuner_info = dict(spec=cfg.heuristic_scale, heuristic=True)
    model_name = cfg.model or (offline_name(tuner.config.base_model) if tuner else None)
    if model_name is None:
        raise UsageError("pass --model (or a --tuner, whose base model is then used)")
    cfg, resolved = resolve(replace(cfg, model=model_name), tuner and tuner.config, registry)
    output = cfg.output_dir
    check_output(output, resume=cfg.resume, overwrite=cfg.overwrite)
    fabric = _fabric(cfg)
    task = _load_data(cfg, fabric.world_size)
    _on_rank0_verdict(fabric, lambda: check_writable(output))  # before the model loads
    model, tokenizer = load_model(
        model_name, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
        device_map=cfg.device_map,
    )  # fmt: skip
    if cfg.save_model:
        need = sum(p.numel() * p.element_size() for p in model.parameters())
        _on_rank0_verdict(fabric, lambda: check_free_space(output, int(1.1 * need), "--save_model"))
    if cfg.peft:
        model = _apply_peft(model, cfg.lora_r)
    if cfg.device_map is None:
        model = model.to(fabric.device)
    if tuner is not None:
        from l2l.blocks import ParamBlocks

        tuner.check_compatible(ParamBlocks.from_module(model), model_id=model_name)
        tuner = tuner.to(fabric.device)
    reduce = LossAllReduce(fabric) if fabric.world_size > 1 else None
    with torch.no_grad():
        opt = make_optimizer(cfg, model, block_scale, loss_reduce=reduce)
    identity = dict(
        tuner_sha256=tensors_digest(tuner) if tuner is not None else cfg.heuristic_scale,
        data_sha256=data_digest(task),
        z_generator=GENERATOR,
    )
    run = Run(
        cfg, model, tokenizer, task, opt, output, fabric=fabric, progress=cfg.progress,
        tuner_info=tuner_info, resolved=resolved, identity=identity,
    )  # fmt: skip
    run.results["warnings"] = data_warnings(task)
    return run


# ---------------------------------------------------------------------------------- main


def _report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['config']['method']} on {results['config']['task']}")
    table.add_column("metric")
    table.add_column("before (zero-shot)")
    table.add_column("after")
    before, after = results["eval_before"] or {}, results["eval_after"] or {}
    for key in ("accuracy", "f1", "exact_match"):
        if key in before:
            table.add_row(key, f"{before[key]:.4f}", f"{after.get(key, float('nan')):.4f}")
    losses = results["train_loss"]
    if losses:
        tail = losses[-max(1, len(losses) // 10) :]
        table.add_row(
            "train loss (first / mean of last 10%)",
            f"{losses[0]:.4f}",
            f"{sum(tail) / len(tail):.4f}",
        )
    table.add_row("wall time (s)", "", f"{results['wall_time_s']:.1f}")
    Console().print(table)


def _push(cfg: FinetuneConfig, results: dict) -> None:
    """Upload the finished run (trajectory, results, card) to ``--push_to_hub``."""
    from l2l.finetuned import push_finetuned

    try:
        url = push_finetuned(
            cfg.output_dir, cfg.push_to_hub, weights_sha256=results["weights_sha256"]
        )
    except Exception as err:  # unreachable Hub (an httpx error), no token, no permission, ...
        text = str(err).strip().splitlines()
        first = f"{type(err).__name__}: {text[0] if text else ''}"
        raise UsageError(
            f"the run finished and is saved in {cfg.output_dir}, but --push_to_hub "
            f"{cfg.push_to_hub} failed ({first}); push it later with "
            f"l2l.finetuned.push_finetuned({str(cfg.output_dir)!r}, {cfg.push_to_hub!r})"
        ) from err
    print(f"pushed to {url}")


def interrupt_line(run, cfg: FinetuneConfig | None) -> str:
    """What an interrupt leaves in --output, truthfully."""
    where = cfg.output_dir if cfg else "--output"
    if run is None or run.saved_steps is None:
        if cfg is not None and cfg.resume:
            return f"interrupted before the run continued: the saved run in {where} is unchanged"
        return "interrupted before the first step: nothing was saved"
    n = run.saved_steps
    if run.phase == "final evaluation":
        return (
            f"interrupted during the final evaluation: all {n} steps are saved in {where}; "
            "--resume runs the evaluation"
        )
    if run.phase == "model":
        return f"interrupted while writing model/: {n} steps are saved in {where}; --resume"
    return f"interrupted: {n} steps are saved in {where}; continue with --resume"


def main(argv: Sequence[str] | None = None) -> int:
    from l2l import NonFiniteLossError

    state: dict = {"cfg": None, "run": None}

    def body() -> int:
        state["cfg"] = cfg = parse(argv)
        state["run"] = run = setup(cfg)
        for warning in run.results["warnings"]:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        try:
            results = run.fit(run.begin())
        except NonFiniteLossError as e:
            raise UsageError(
                f"{e} Progress up to the failed step is saved in {cfg.output_dir} "
                "(see --on_nonfinite)."
            ) from e
        if run.rank == 0:
            _report(results)
            print(f"results in {cfg.output_dir / 'results.json'}")
            if cfg.push_to_hub:
                _push(cfg, results)
        return 0

    return run_command(PROG, body, lambda: interrupt_line(state["run"], state["cfg"]))


if __name__ == "__main__":
    sys.exit(main())
