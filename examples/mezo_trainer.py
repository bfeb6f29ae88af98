"""A MeZO recipe through transformers' Trainer and HfArgumentParser, with l2l's ZOTrainer.

Prompt-based classification trained as classification over the label words (MeZO's
``--train_as_classification``): each example is scored by the mean log-probability of every
candidate continuation, and the loss is the cross-entropy of the gold one. MeZO's SST-2 settings
on a real model::

    python examples/mezo_trainer.py --model facebook/opt-13b --task sst2 --output_dir runs/mezo \\
        --max_steps 20000 --learning_rate 1e-7 --zo_eps 1e-3 --per_device_train_batch_size 16 \\
        --lr_scheduler_type constant --eval_strategy steps --eval_steps 4000 \\
        --save_strategy steps --save_steps 4000 --load_best_model_at_end \\
        --metric_for_best_model accuracy --bf16

and a one-minute run on the CPU: ``--model tiny-llama --task tweets --max_steps 50``.
``--zo_method lozo``, ``--zo_tuner FOLDER_OR_REPO``, ``--zo_objective accuracy`` (MeZO's
``--non_diff``) and every TrainingArguments flag work as usual; ``--resume_from_checkpoint``
continues exactly. The output folder ends with ``trajectory.json`` + ``results.json``:
``l2l.push_finetuned(output_dir, repo_id)`` shares the run as kilobytes.

The one change from a MeZO-style Trainer script is the import line below.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import HfArgumentParser

from l2l.integrations.hf_trainer import ZOTrainer, ZOTrainingArguments
from l2l.integrations.objectives import candidate_accuracy
from llm.ids import base_model_id
from llm.models import load_model
from llm.tasks import load_task


@dataclass
class RecipeArguments:
    model: str = field(default="tiny-llama", metadata={"help": "Hub id, folder or built-in"})
    task: str = field(default="tweets", metadata={"help": "a classification task of llm.tasks"})
    n_train: int = field(default=1000, metadata={"help": "training examples"})
    n_dev: int = field(default=500, metadata={"help": "dev (evaluation) examples"})
    max_length: int = field(default=256, metadata={"help": "tokens per candidate row"})


def encode(example, tokenizer, max_length: int) -> dict:
    """Token ids of the prompt and of each candidate; the prompt loses tokens on the left."""
    candidates = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in example.candidates]
    prompt = tokenizer(example.prompt)["input_ids"]
    prompt = prompt[-(max_length - max(len(c) for c in candidates)) :]
    return {
        "prompt": prompt,
        "candidates": candidates,
        "correct": example.correct,  # every candidate that counts as right
        "answer": example.answer,  # the gold one (the lm objective's target)
    }


def collate(features: list[dict], pad_id: int, objective: str) -> dict[str, torch.Tensor]:
    """Rows (prompt + candidate), right-padded; labels on the candidate tokens only.

    ``classification``/``accuracy``: one row per candidate plus the grid keys of
    ``l2l.integrations.objectives``; ``lm``: one row per example, its gold candidate.
    """
    rows, slots = [], []
    width = max(len(f["candidates"]) for f in features)
    correct = torch.zeros(len(features), width, dtype=torch.bool)
    for b, f in enumerate(features):
        correct[b, f["correct"]] = True
        for k, cand in enumerate(f["candidates"]):
            if objective == "lm" and k != f["answer"]:
                continue
            rows.append((f["prompt"] + cand, len(f["prompt"])))
            slots.append(b * width + k)
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, start : len(ids)] = torch.tensor(ids[start:])
        mask[r, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if objective == "lm":
        return batch
    return dict(batch, candidate_slots=torch.tensor(slots), candidate_correct=correct)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((RecipeArguments, ZOTrainingArguments))
    parser.set_defaults(zo_objective="classification")  # MeZO's --train_as_classification
    recipe, args = parser.parse_args_into_dataclasses(args=argv)
    args.remove_unused_columns = False  # the collator reads prompt/candidates/correct
    if args.zo_objective != "lm":
        args.label_names = ["candidate_correct"]  # compute_metrics gets (scores, correct)
    task = load_task(
        recipe.task, seed=args.seed, n_train=recipe.n_train, n_dev=recipe.n_dev, n_test=1
    )
    model, tokenizer = load_model(recipe.model)
    data = {
        split: [encode(e, tokenizer, recipe.max_length) for e in task.split(split)]
        for split in ("train", "dev")
    }
    trainer = ZOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["dev"],
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id, objective=args.zo_objective),
        compute_metrics=candidate_accuracy if args.zo_objective != "lm" else None,
        base_model=base_model_id(recipe.model, model),
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    print(metrics)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
