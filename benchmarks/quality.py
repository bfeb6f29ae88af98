"""Does the learned tuner beat MeZO, HiZOO and LOZO on tasks it never saw?

A small-scale replica of the ZO Fine-tuner evaluation on SmolLM2-135M, offline:

    python benchmarks/quality.py --out runs/quality                        # protocol: CPU, a day
    python benchmarks/quality.py --budget full --out runs/quality-full      # GPU: 20k steps
    python benchmarks/quality.py --out runs/quality --summarise             # tables of what ran

Methods: MeZO, HiZOO and LOZO, each plain and with the learned tuner, and MeZO with a hand-made
per-block scale (``--tuner weight-rms``: each block perturbed in proportion to its weights' RMS),
so the table shows what learning adds over a heuristic. Every run trains the task's default
objective (cross-entropy over the candidates for these classification tasks).

1. Learning rate per method: each method runs the budget's full step count on the first task
   with every lr of the grid (seed 0); the lr with the best *dev* accuracy (ties: lower final
   train loss) is kept. The test split is never used to choose. The selection run at the chosen
   lr is that method's seed-0 run on the first task.
2. Every (task, method, seed) then runs ``--steps`` steps at its chosen lr; every method sees
   the same batches (the batch order depends on the seed only).
3. Zero-shot accuracy (every run's "before", on the same test examples as its "after") and a
   first-order AdamW row per task for context.
Every run (zero-shot, selection, final, AdamW) runs in a fresh process, so its peak memory (peak
RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is its own. ``--jobs N`` runs N of them at
once with ``cpus // N`` torch threads each: on CPU that finishes sooner (``torch``'s Gaussian
sampler is single-threaded, so two 1-thread runs draw twice as fast as one 2-thread run), but
the s/step column then reflects runs sharing the machine; use ``benchmarks/step_cost.py`` for speed.
The zero-shot test accuracy of a task is computed once and shared by its runs (the test subset
is fixed; only train/dev depend on the seed).
Each run writes one JSON (``runs/<name>.json``, skipped when present, so the script resumes;
``--seeds 0`` then ``--seeds 0,1`` ... reuses every finished run and summarises what is there);
the summary is ``summary.md`` (table + the paper's headline statistics) and ``loss_curves.png``.
``--dev-every-run`` scores every run on its dev split too (not only the selection runs), so that
tuners or recipes can be compared on a dev task over all seeds without looking at its test split.
The tuner is the one given by ``--tuner`` (default: the bundled ``smollm2-135m``), which was
meta-trained on tasks that are not evaluated here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BUDGETS = {
    # steps, selection steps, lr grid (selection order: the middle first, so that a partial
    # run has every method at the same lrs), seeds, batch, dev examples scored, test examples
    "small": dict(
        steps=40,
        select_steps=20,
        lrs=[1e-5, 3e-5, 1e-4],
        seeds=[0, 1, 2],
        batch=8,
        n_eval=100,
        n_test=100,
    ),
    "protocol": dict(
        steps=200,
        select_steps=200,
        lrs=[3e-6, 1e-5, 3e-5, 1e-4, 3e-4],
        seeds=[0, 1, 2],
        batch=8,
        n_eval=200,
        n_test=500,
    ),
    "full": dict(
        steps=20000,
        select_steps=20000,
        lrs=[1e-7, 3e-7, 1e-6, 3e-6, 1e-5],
        seeds=[0, 1, 2],
        batch=16,
        n_eval=500,
        n_test=1000,
    ),
}
#: (method, block scale): "none" (plain), "tuner" (the learned tuner), "weight-rms" (heuristic)
METHODS = [
    ("mezo", "none"),
    ("mezo", "tuner"),
    ("mezo", "weight-rms"),
    ("hizoo", "none"),
    ("hizoo", "tuner"),
    ("lozo", "none"),
    ("lozo", "tuner"),
]


def label_of(method: str, scale: str) -> str:
    """``mezo``, ``mezo+tuner``, ``mezo+weight-rms``."""
    return method if scale == "none" else f"{method}+{scale}"


def parse_label(label: str) -> tuple[str, str]:
    method, _, scale = label.partition("+")
    return method, scale or "none"


def center_out(values: list) -> list:
    """``[a, b, c, d, e] -> [c, d, b, e, a]``: the middle of a grid first."""
    mid = (len(values) - 1) // 2
    order = sorted(range(len(values)), key=lambda i: (abs(i - mid), -i))
    return [values[i] for i in order]


@dataclass
class Spec:
    task: str
    method: str
    scale: str  # "none", "tuner" or "weight-rms"
    lr: float
    seed: int
    steps: int

    @property
    def label(self) -> str:
        return label_of(self.method, self.scale)

    @property
    def name(self) -> str:
        return f"{self.task}.{self.label}.lr{self.lr:g}.s{self.seed}.n{self.steps}"


def provenance() -> dict:
    """When and where a run ran: date, machine, torch and its threads."""
    import datetime

    import torch

    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {platform.node()}, {os.cpu_count()} CPUs",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )


def zero_shot_path(task_name: str, args, budget: dict) -> Path:
    return args.out / "runs" / f"{task_name}.zero-shot.n{budget['n_test']}.json"


def run_path(spec: Spec, args) -> Path:
    return args.out / "runs" / f"{spec.name}.json"


def first_order_path(task_name: str, args, budget: dict, lr: float = 1e-5) -> Path:
    return args.out / "runs" / f"{task_name}.adamw.lr{lr:g}.s0.n{budget['steps']}.json"


def zero_shot(task_name: str, args, budget: dict, model=None, tok=None) -> dict:
    """Zero-shot test metrics of ``task_name`` (cached: every run of the task shares them)."""
    path = zero_shot_path(task_name, args, budget)
    if path.exists():
        return json.loads(path.read_text())
    from llm.models import load_model
    from llm.tasks import evaluate, load_task

    if model is None:
        model, tok = load_model(args.model)
    test = load_task(task_name, seed=0, n_test=budget["n_test"]).test
    metrics = dict(evaluate(model, tok, test, progress=args.progress), split="test")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return metrics


_TUNER_DIGESTS: dict[str, str] = {}


def tuner_digest(spec: str) -> str:
    """SHA-256 of the weights ``--tuner spec`` resolves to (what a run records)."""
    if spec not in _TUNER_DIGESTS:
        from finetune.checkpoint import tensors_digest
        from l2l.tuner import Tuner
        from tuner_zoo.resolve import resolve_tuner

        _TUNER_DIGESTS[spec] = tensors_digest(Tuner.load_folder(resolve_tuner(spec)))
    return _TUNER_DIGESTS[spec]


def check_same_tuner(results: dict, args, path: Path) -> None:
    """A finished +tuner run is reused only if it ran with the tuner ``--tuner`` gives now."""
    recorded = (results.get("tuner") or {}).get("weights_sha256")
    current = tuner_digest(args.tuner)
    if recorded != current:
        raise SystemExit(
            f"{path} was made with another tuner (weights sha256 {recorded or 'not recorded'}; "
            f"--tuner {args.tuner} has {current}): its results would be mixed with this "
            "tuner's. Use another --out for this tuner, or delete that file to rerun it."
        )


def reuse(path: Path, call: tuple) -> dict:
    """The results in ``path`` of the job ``call = (fn, *fn_args)``, checked to be this job's: a
    +tuner run must have run with the tuner ``--tuner`` resolves to now."""
    results = json.loads(path.read_text())
    if call[0] is run_one and call[1].scale == "tuner":
        check_same_tuner(results, call[2], path)
    if call[0] is run_one and "eval_dev" not in results:
        if len(call) > 4 and call[4]:
            raise SystemExit(
                f"{path} has no dev accuracy (it ran under --lr without dev scoring), so it "
                "cannot take part in the lr selection: summarise it with --lr, or delete it to "
                "rerun it as a selection run."
            )
        if getattr(call[2], "dev_every_run", False) and not getattr(call[2], "summarise", False):
            raise SystemExit(
                f"{path} has no dev accuracy (it ran without --dev-every-run): delete it to "
                "rerun it with dev scoring, or leave out --dev-every-run."
            )
    return results


def run_one(spec: Spec, args, budget: dict, select: bool = False) -> dict:
    """One fine-tuning run through the same code path as the ``finetune`` CLI.

    ``select``: a learning-rate selection run, which is also scored on the dev split. A run with
    a selection run's shape (seed 0, the selection step count) is scored on dev even when it runs
    under ``--lr``, so that a later protocol without ``--lr`` can select with it; with
    ``--dev-every-run`` every run is.
    """
    path = run_path(spec, args)
    if path.exists():
        return reuse(path, (run_one, spec, args))
    before = zero_shot(spec.task, args, budget)
    from finetune.cli import parse, setup

    argv = [
        "--model",
        args.model,
        "--task",
        spec.task,
        "--method",
        spec.method,
        "--tuner",
        args.tuner if spec.scale == "tuner" else spec.scale,
        "--lr",
        str(spec.lr),
        "--steps",
        str(spec.steps),
        "--seed",
        str(spec.seed),
        "--batch_size",
        str(budget["batch"]),
        "--eval_examples",
        str(budget["n_eval"]),
        "--n_test",
        str(budget["n_test"]),
        "--output",
        str(args.out / "work" / spec.name),
        "--checkpoint_every",
        "0",
        "--overwrite",  # a work folder left by an interrupted run
        "--accelerator",
        args.accelerator,
    ]
    if not args.progress:
        argv.append("--no_progress")
    run = setup(parse(argv))
    run.results["eval_before"] = before
    results = run.fit(run.begin())
    if (
        select
        or getattr(args, "dev_every_run", False)
        or (spec.seed == 0 and spec.steps == budget["select_steps"])
    ):
        results["eval_dev"] = run.evaluate("dev")
    results["spec"] = spec.__dict__
    results["provenance"] = provenance()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return results


def first_order_run(task_name: str, args, budget: dict, lr: float = 1e-5) -> dict:
    """AdamW fine-tuning of all weights for context (backprop: activations + 2 moments)."""
    path = first_order_path(task_name, args, budget, lr)
    if path.exists():
        return json.loads(path.read_text())
    import torch

    from finetune.run import batch_indices, peak_memory_bytes
    from llm.models import load_model
    from llm.tasks import evaluate, load_task, objective_batch, objective_loss

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    task = load_task(task_name, seed=0, n_test=budget["n_test"])
    test = task.test
    before = zero_shot(task_name, args, budget, model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, start = [], time.perf_counter()
    for step in range(budget["steps"]):
        idx = batch_indices(step, len(task.train), budget["batch"], 0)
        batch = objective_batch([task.train[i] for i in idx], tok, task.objective, task.max_length)
        loss = objective_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    wall = time.perf_counter() - start
    results = dict(
        config=dict(lr=lr, method="adamw", objective=task.objective),
        train_loss=losses,
        eval_before=before,
        eval_after=evaluate(model, tok, test, progress=args.progress),
        wall_time_s=wall,
        peak_memory_bytes=peak_memory_bytes(next(model.parameters()).device),
        provenance=provenance(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return results


def final_loss(results: dict) -> float:
    losses = results["train_loss"]
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def steps_to_reach(results: dict, target: float) -> int | None:
    """First step whose 10-step running mean of the train loss is <= target."""
    losses = results["train_loss"]
    for i in range(len(losses)):
        window = losses[max(0, i - 9) : i + 1]
        if sum(window) / len(window) <= target:
            return i + 1
    return None


def selection_specs(task: str, method: str, scale: str, budget) -> list[Spec]:
    return [Spec(task, method, scale, lr, 0, budget["select_steps"]) for lr in budget["lrs"]]


def best_lr(runs: list[dict]) -> float:
    """The selection run with the best dev accuracy (ties: lower final train loss)."""
    best = min(runs, key=lambda r: (-r["eval_dev"]["accuracy"], final_loss(r)))
    return best["spec"]["lr"]


def threads_per_job(jobs: int, threads: int | None = None) -> int:
    """torch threads each of ``jobs`` concurrent runs gets (``threads``: as given)."""
    return threads or max(1, (os.cpu_count() or 1) // jobs)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_all(jobs: list[tuple], args, what: str) -> list[dict]:
    """Run ``jobs`` = ``[(json_path, fn, *fn_args), ...]``, each in a fresh process, ``args.jobs``
    at a time, and return their results in order. A job whose JSON exists is read, not rerun. A
    failed job does not stop the others (their JSONs are kept); the phase then exits with the
    failures, and rerunning resumes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

    results: list = [None] * len(jobs)
    todo = []
    for i, (path, *call) in enumerate(jobs):
        if path.exists():
            results[i] = reuse(path, call)
        else:
            todo.append((i, call))
    args.ran = getattr(args, "ran", 0) + len(todo)
    if not todo:
        return results
    failures = []
    columns = (*Progress.get_default_columns()[:2], MofNCompleteColumn(), TimeElapsedColumn())
    with (
        ProcessPoolExecutor(
            args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads_per_job(args.jobs, getattr(args, "threads", None)),),
            max_tasks_per_child=1,
        ) as pool,
        Progress(*columns, disable=not sys.stderr.isatty()) as bar,
    ):
        task = bar.add_task(f"{what} ({args.jobs} at a time)", total=len(todo))
        futures = {pool.submit(fn, *fn_args): i for i, (fn, *fn_args) in todo}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as exc:  # reported below; the other runs go on
                failures.append(f"{jobs[i][0].name}: {type(exc).__name__}: {exc}")
            bar.advance(task)
            print(f"[{what}] done {jobs[i][0].stem}", file=sys.stderr, flush=True)
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))
    return results


def run_conditions(runs: list[dict | None]) -> str:
    """Where and when the given runs ran, from their recorded provenance."""
    recorded = [r["provenance"] for r in runs if r and "provenance" in r]
    if not recorded:
        return "no provenance recorded"
    machines = sorted({p["machine"] for p in recorded})
    threads = sorted({p["threads"] for p in recorded})
    dates = sorted(p["date"][:10] for p in recorded)
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return (
        f"{len(recorded)} run(s) on {'; '.join(machines)}, torch {', '.join(sorted({p['torch'] for p in recorded}))}, "
        f"{'/'.join(map(str, threads))} torch thread(s) per run, {span}"
    )


def summarise(all_runs: dict, args, budget, wall: float, read_runs: list | None = None) -> str:
    """The per-(task, method) table over the seeds and the headline statistics.

    ``all_runs[(task, label)]`` lists one run per seed, in the order of ``budget["seeds"]``.
    """
    seeds = budget["seeds"]
    lines = [
        f"# Quality benchmark ({args.budget} budget)",
        "",
        f"model {args.model}; tuner {args.tuner}; tasks {', '.join(args.tasks)}; "
        f"{budget['steps']} steps, batch {budget['batch']}, seeds {seeds}; "
        + (
            f"machine {platform.machine()} {platform.node()}, {os.cpu_count()} CPUs, "
            f"{args.jobs} run(s) at a time with "
            f"{threads_per_job(args.jobs, getattr(args, 'threads', None))} torch "
            "thread(s) each, every run in a fresh process; "
            f"wall time of this invocation {wall / 60:.1f} min"
            if getattr(args, "ran", 1)
            else "every run read from its JSON (none ran in this invocation): "
            + run_conditions(read_runs or [r for rs in all_runs.values() for r in rs])
        )
        + ", sum of the runs below "
        f"{sum(r['wall_time_s'] for rs in all_runs.values() for r in rs) / 60:.1f} min",
        "",
        "| task | method | lr | final train loss | test acc (before -> after) | vs MeZO (points) "
        "| steps to MeZO's final loss | s/step | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    wins_loss = wins_acc = pairs = 0
    for task in args.tasks:
        mezo = all_runs.get((task, "mezo"))
        target = statistics.mean(final_loss(r) for r in mezo) if mezo else None
        for label, runs in ((lbl, rs) for (t, lbl), rs in all_runs.items() if t == task):
            fl = [final_loss(r) for r in runs]
            acc0 = statistics.mean(r["eval_before"]["accuracy"] for r in runs)
            acc = [r["eval_after"]["accuracy"] for r in runs]
            if mezo:
                diff = [a - m["eval_after"]["accuracy"] for a, m in zip(acc, mezo, strict=True)]
                vs = f"{100 * statistics.mean(diff):+.1f}"
                reach = [steps_to_reach(r, target) for r in runs]
                reach_s = "/".join("-" if s is None else str(s) for s in reach)
            else:
                vs = reach_s = "-"
            sps = statistics.mean(r["wall_time_s"] / max(1, len(r["train_loss"])) for r in runs)
            mem = max(r.get("peak_memory_bytes", 0) for r in runs) / 2**20
            lines.append(
                f"| {task} | {label} | {runs[0]['config']['lr']:g} | {statistics.mean(fl):.4f} ± {statistics.pstdev(fl):.4f} | "
                f"{acc0:.3f} -> {statistics.mean(acc):.3f} ± {statistics.pstdev(acc):.3f} | {vs} | {reach_s} | {sps:.2f} | {mem:.0f} |"
            )
        labels = [lbl for t, lbl in all_runs if t == task]
        # the share is a comparison: it needs a tuner variant and at least one method without
        if not any(lbl.endswith("+tuner") for lbl in labels) or all(
            lbl.endswith("+tuner") for lbl in labels
        ):
            continue
        for i in range(len(seeds)):
            runs_i = {lbl: all_runs[(task, lbl)][i] for lbl in labels}
            pairs += 1
            wins_loss += min(runs_i, key=lambda k: final_loss(runs_i[k])).endswith("+tuner")
            best_acc = max(r["eval_after"]["accuracy"] for r in runs_i.values())
            wins_acc += any(
                k.endswith("+tuner") and r["eval_after"]["accuracy"] == best_acc
                for k, r in runs_i.items()
            )
    lines += [
        "",
        "*vs MeZO*: mean over the seeds of the test-accuracy difference to plain MeZO (each at "
        "its own lr) on the same task and seed.",
    ]
    dev_rows = (
        [
            f"| {task} | {label} | "
            + " / ".join(f"{r['eval_dev']['accuracy']:.3f}" for r in runs)
            + f" | {statistics.mean(r['eval_dev']['accuracy'] for r in runs):.3f} |"
            for (task, label), runs in all_runs.items()
            if all("eval_dev" in r for r in runs)
        ]
        if getattr(args, "dev_every_run", False)
        else []
    )
    if dev_rows:
        lines += [
            "",
            f"Dev accuracy (--dev-every-run; seeds {seeds}; n = {budget.get('n_eval', '?')} per "
            "seed)"
            + (
                ":"
                if getattr(args, "lr", None)
                else f"; seed 0 of {args.tasks[0]} is its lr-selection run, whose dev accuracy "
                "chose the lr, so that cell is the best of the grid:"
            ),
            "",
            "| task | method | dev acc per seed | mean |",
            "|---|---|---|---|",
            *dev_rows,
        ]
    if pairs:
        lines += [
            "",
            f"A tuner variant has the lowest final loss of all methods in {wins_loss}/{pairs} (task, "
            f"seed) pairs ({100 * wins_loss / max(1, pairs):.1f}%; paper: 82.1%), and the best test "
            f"accuracy (ties included) in {wins_acc}/{pairs} ({100 * wins_acc / max(1, pairs):.1f}%).",
        ]
    for base in dict.fromkeys(lbl for _, lbl in all_runs if "+" not in lbl):
        both = [t for t in args.tasks if (t, base + "+tuner") in all_runs and (t, base) in all_runs]
        if not both:
            continue
        pairs_m = [
            (all_runs[(t, base + "+tuner")][i], all_runs[(t, base)][i])
            for t in both
            for i in range(len(seeds))
        ]
        lower = sum(final_loss(a) < final_loss(b) for a, b in pairs_m)
        diff = statistics.mean(
            a["eval_after"]["accuracy"] - b["eval_after"]["accuracy"] for a, b in pairs_m
        )
        lines.append(
            f"{base}+tuner vs {base}: lower final loss in {lower}/{len(pairs_m)} (task, seed) "
            f"pairs; mean test-accuracy difference {100 * diff:+.1f} points"
            + (" (paper, MeZO: +2.5)." if base == "mezo" else ".")
        )
    return "\n".join(lines)


def selection_table(selection: dict, lrs: dict, args, budget) -> str:
    """Dev accuracy and final train loss of every lr-selection run, the chosen lr in bold."""
    grid = budget["lrs"]
    lines = [
        f"Learning-rate selection ({args.tasks[0]}, seed 0, {budget['select_steps']} steps; "
        "dev accuracy / final train loss; chosen in bold):",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for key, runs in selection.items():
        cells = []
        for r in runs:
            if r is None:  # not run yet (a partial summary)
                cells.append("-")
                continue
            cell = f"{r['eval_dev']['accuracy']:.3f} / {final_loss(r):.3f}"
            cells.append(f"**{cell}**" if r["spec"]["lr"] == lrs.get(key) else cell)
        lines.append(f"| {label_of(*key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(all_runs: dict, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(args.tasks), figsize=(6 * len(args.tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], args.tasks, strict=True):
        for (t, label), runs in all_runs.items():
            if t != task:
                continue
            n = min(len(r["train_loss"]) for r in runs)
            mean = [statistics.mean(r["train_loss"][i] for r in runs) for i in range(n)]
            ax.plot(
                range(1, n + 1), mean, label=label, linestyle="--" if "+tuner" in label else "-"
            )
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (mean over seeds)")
        ax.set_yscale("log")  # a diverging run would flatten every other curve
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "loss_curves.png", dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--budget", choices=sorted(BUDGETS), default="protocol")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tuner", default="smollm2-135m")
    p.add_argument(
        "--tasks", default="movie-reviews,amazon-reviews", help="tasks the tuner never saw"
    )
    p.add_argument("--methods", default=",".join(label_of(*m) for m in METHODS))
    p.add_argument("--seeds", help="override the budget's seeds, e.g. 0,1")
    p.add_argument("--steps", type=int, help="override the budget's steps (and selection steps)")
    p.add_argument("--lr", type=float, help="skip the selection and use this lr for every method")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--progress", action="store_true", help="progress bars inside each run")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each in its own process (see above)"
    )
    p.add_argument(
        "--threads", type=int, help="torch threads per run (default: the CPUs over --jobs)"
    )
    p.add_argument(
        "--no-first-order",
        dest="first_order",
        action="store_false",
        help="skip the AdamW context rows",
    )
    p.add_argument(
        "--dev-every-run",
        action="store_true",
        help="score the dev split after every run, not only the selection runs (about a "
        "minute per run on CPU); the summary then has a dev table over the seeds, for choosing "
        "between tuners or recipes on a dev task without looking at its test split",
    )
    p.add_argument(
        "--summarise",
        action="store_true",
        help="run nothing: the tables of the runs whose JSONs are there (a partial protocol "
        "shows its selection grid so far and every (task, method) whose seeds all finished)",
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    args.tasks = args.tasks.split(",")
    budget = dict(BUDGETS[args.budget])
    if args.seeds:
        budget["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.steps:
        budget["steps"] = budget["select_steps"] = args.steps
    methods = [parse_label(m) for m in args.methods.split(",")]
    unknown = [label_of(*m) for m in methods if m not in METHODS]
    if unknown:
        p.error(
            f"unknown method(s) {', '.join(unknown)}; known: {', '.join(label_of(*m) for m in METHODS)}"
        )
    start = time.perf_counter()
    fetch = (
        (lambda jobs, what: [reuse(p, call) if p.exists() else None for p, *call in jobs])
        if args.summarise
        else (lambda jobs, what: run_all(jobs, args, what))
    )
    if args.summarise:
        args.ran = 0
    # 0: zero-shot accuracy per task, shared by that task's runs
    fetch(
        [(zero_shot_path(t, args, budget), zero_shot, t, args, budget) for t in args.tasks],
        "zero-shot",
    )
    # 1: lr selection on the first task's dev split, the middle of the grid first
    selection, lrs = {}, {}
    if args.lr:
        lrs = {m: args.lr for m in methods}
    else:
        select = {m: selection_specs(args.tasks[0], *m, budget) for m in methods}
        by_lr = {lr: i for i, lr in enumerate(center_out(budget["lrs"]))}
        order = sorted((s for ss in select.values() for s in ss), key=lambda s: by_lr[s.lr])
        jobs = [(run_path(s, args), run_one, s, args, budget, True) for s in order]
        done = dict(zip((s.name for s in order), fetch(jobs, "lr selection"), strict=True))
        selection = {m: [done[s.name] for s in ss] for m, ss in select.items()}
        lrs = {m: best_lr(rs) for m, rs in selection.items() if None not in rs}
    # 2: every (task, method, seed) at its chosen lr, and the first-order context rows
    specs = {
        (task, label_of(*m)): [
            Spec(task, *m, lrs[m], seed, budget["steps"]) for seed in budget["seeds"]
        ]
        for m in methods
        if m in lrs
        for task in args.tasks
    }
    jobs = [(run_path(s, args), run_one, s, args, budget) for ss in specs.values() for s in ss]
    if args.first_order:
        jobs += [
            (first_order_path(t, args, budget), first_order_run, t, args, budget)
            for t in args.tasks
        ]
    done = iter(fetch(jobs, "runs"))
    all_runs = {key: [next(done) for _ in ss] for key, ss in specs.items()}
    all_runs = {key: rs for key, rs in all_runs.items() if None not in rs}
    first_order = list(done)
    read = [r for rs in selection.values() for r in rs] + [
        r for rs in all_runs.values() for r in rs
    ]
    text = summarise(all_runs, args, budget, time.perf_counter() - start, read)
    if selection:
        text += "\n\n" + selection_table(selection, lrs, args, budget)
    if args.first_order and any(first_order):
        rows = [
            "",
            "First-order context (AdamW, all weights, seed 0; backprop keeps activations and "
            "two moments per weight):",
            "",
            "| task | method | lr | final train loss | test acc (before -> after) | s/step | peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, r in zip(args.tasks, first_order, strict=True):
            if r is None:
                continue
            rows.append(
                f"| {task} | adamw | {r['config']['lr']:g} | {final_loss(r):.4f} | "
                f"{r['eval_before']['accuracy']:.3f} -> {r['eval_after']['accuracy']:.3f} | "
                f"{r['wall_time_s'] / len(r['train_loss']):.2f} | {r['peak_memory_bytes'] / 2**20:.0f} |"
            )
        text += "\n" + "\n".join(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text + "\n")
    if all_runs:
        plot(all_runs, args)
    print(text)


if __name__ == "__main__":
    main()
