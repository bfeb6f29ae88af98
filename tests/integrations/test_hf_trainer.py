"""ZOTrainer through the real transformers Trainer on a tiny random Llama (CPU, seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import same_bits, snapshot, tiny_lm

from l2l import replay
from l2l.finetuned import weights_sha256
from l2l.integrations.hf_trainer import ZOStep, ZOTrainer, ZOTrainingArguments
from l2l.integrations.objectives import candidate_accuracy
from l2l.trajectory import Trajectory

LENGTH = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is several times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CountingData(torch.utils.data.Dataset):
    """Runs of consecutive token ids below 20: a tiny model learns to favour them."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        start = torch.randint(0, 20, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(LENGTH)) % 20

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def zo_args(output: Path, **overrides) -> ZOTrainingArguments:
    settings = dict(
        output_dir=str(output),
        max_steps=12,
        learning_rate=2e-3,
        per_device_train_batch_size=8,
        logging_steps=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        zo_eps=1e-3,
        zo_seed=7,
    )
    return ZOTrainingArguments(**dict(settings, **overrides))


def make_trainer(output: Path, model=None, **overrides) -> ZOTrainer:
    model = tiny_lm() if model is None else model
    args = zo_args(output, **overrides)
    return ZOTrainer(
        model=model,
        args=args,
        train_dataset=CountingData(),
        eval_dataset=CountingData(16, seed=1),
        base_model="l2l/tiny-llama",
    )


def test_loss_falls_without_a_backward_pass(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=60, logging_steps=10, learning_rate=4e-3)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is None for p in trainer.model.parameters())
    assert isinstance(trainer.optimizer.optimizer, ZOStep)  # accelerate's wrapper around it
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("projected_grad" in h and "grad_norm" not in h for h in logged)


def test_the_trainers_lr_schedule_drives_every_step(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, lr_scheduler_type="linear", warmup_steps=4, max_steps=12)
    trainer.train()
    base, warm, total = 2e-3, 4, 12
    expected = [
        base * t / warm if t < warm else base * (total - t) / (total - warm) for t in range(total)
    ]
    recorded = [r.lr for r in trainer.zo_optimizer.records]
    assert recorded == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert recorded[0] == 0.0 and max(recorded) == pytest.approx(base)
    # the lr the step used is the lr it applied: replaying the records rebuilds the weights
    rebuilt = tiny_lm()
    replay(rebuilt, Trajectory.load(tmp_path / "trajectory.json"))
    assert same_bits(snapshot(rebuilt), snapshot(trainer.model))


@pytest.mark.parametrize("method", ["mezo", "hizoo", "lozo-m"])  # lozo-m: V, N and momentum
def test_resume_from_checkpoint_gives_the_uninterrupted_weights(tmp_path: Path, method) -> None:
    settings = dict(zo_method=method, zo_nu=2, max_steps=6, save_strategy="steps", save_steps=3)
    straight = make_trainer(tmp_path / "straight", **settings)
    straight.train()

    resumed = make_trainer(tmp_path / "resumed", **settings)
    resumed.train()  # writes checkpoint-3 and checkpoint-6 on the way
    again = make_trainer(tmp_path / "resumed", **settings)
    again.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))

    assert same_bits(snapshot(again.model), snapshot(straight.model))
    full = Trajectory.load(tmp_path / "straight" / "trajectory.json")
    after = Trajectory.load(tmp_path / "resumed" / "trajectory.json")
    assert after.to_dict() == full.to_dict()  # the whole trajectory, steps 0..5
    assert [r.step for r in after.records] == list(range(6))
    checkpoint = Trajectory.load(tmp_path / "resumed" / "checkpoint-3" / "trajectory.json")
    assert [r.step for r in checkpoint.records] == [0, 1, 2]


def test_resume_refuses_other_zo_settings(tmp_path: Path) -> None:
    make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2).train()
    other = make_trainer(tmp_path, max_steps=4, zo_eps=2e-3)
    with pytest.raises(ValueError, match="eps=0.001.*0.002"):
        other.train(resume_from_checkpoint=True)


def test_gradient_accumulation_averages_the_micro_batches_under_one_z(tmp_path: Path) -> None:
    whole = make_trainer(tmp_path / "whole", max_steps=6, per_device_train_batch_size=8)
    whole.train()
    split = make_trainer(
        tmp_path / "split",
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    split.train()
    a, b = whole.zo_optimizer.records, split.zo_optimizer.records
    assert len(a) == len(b) == 6
    assert [r.seed for r in a] == [r.seed for r in b]
    assert [r.grad for r in b] == pytest.approx(
        [r.grad for r in a], rel=1e-3, abs=2e-3
    )  # float32 sums in another order
    losses = [h["loss"] for h in split.state.log_history if "loss" in h]
    expected = [h["loss"] for h in whole.state.log_history if "loss" in h]
    assert losses == pytest.approx(expected, rel=1e-5)


def test_tensorboard_logs_are_written(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    trainer = make_trainer(tmp_path, report_to="tensorboard", logging_steps=2, max_steps=4)
    trainer.train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_eval_checkpoints_and_best_model_with_its_trajectory(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        max_steps=12,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the highest eval loss: a checkpoint before the last step
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6, 9, 12]
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert 1 <= len(checkpoints) <= 2
    assert all((tmp_path / c / "trajectory.json").is_file() for c in checkpoints)
    best = Path(trainer.state.best_model_checkpoint).name
    assert best in checkpoints and best != "checkpoint-12"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["weights_sha256"] == weights_sha256(trainer.model)
    assert results["model"] == "l2l/tiny-llama" and results["method"] == "mezo"
    assert results["steps"] == int(best.split("-")[1])
    assert "eval_loss" in results["metrics"]
    rebuilt = tiny_lm()  # the output trajectory rebuilds the best model, not the last step
    replay(rebuilt, Trajectory.load(tmp_path / "trajectory.json"))
    assert weights_sha256(rebuilt) == results["weights_sha256"]


def test_peft_model_trains_only_its_adapters(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    def lora_model():
        torch.manual_seed(0)
        config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        return peft.get_peft_model(tiny_lm(), config)

    model = lora_model()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = make_trainer(tmp_path, model=model, max_steps=6)
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    blocks = trainer.zo_optimizer.blocks.names
    assert blocks and all("lora_" in name for name in blocks)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["peft"] == "lora"
    rebuilt = lora_model()
    replay(rebuilt, Trajectory.load(tmp_path / "trajectory.json"))
    assert weights_sha256(rebuilt) == results["weights_sha256"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(max_grad_norm=1.0), "no gradient to clip"),
        (dict(zo_method="adam"), "zo_method must be one of"),
        (dict(zo_objective="f1"), "zo_objective must be one of"),
        (dict(zo_eps=0.0), "zo_eps must be > 0"),
    ],
)
def test_arguments_refuse_what_zo_cannot_do(tmp_path: Path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        zo_args(tmp_path, **overrides)


def test_plain_training_arguments_are_refused(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="ZOTrainingArguments"):
        ZOTrainer(model=tiny_lm(), args=args, train_dataset=CountingData())


class CandidateData(torch.utils.data.Dataset):
    """A prompt of 8 consecutive ids and two one-token candidates; the right one continues it."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, 20, (n,), generator=gen).tolist()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        prompt = [(self.starts[i] + t) % 20 for t in range(8)]
        right, wrong = (prompt[-1] + 1) % 20, (prompt[-1] + 7) % 20
        return {"prompt": prompt, "candidates": [right, wrong], "correct": 0}


def candidate_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """One row per (example, candidate), in the layout of l2l.integrations.objectives."""
    rows, labels, slots = [], [], []
    width = max(len(f["candidates"]) for f in features)
    correct = torch.zeros(len(features), width, dtype=torch.bool)
    for b, f in enumerate(features):
        correct[b, f["correct"]] = True
        for k, token in enumerate(f["candidates"]):
            rows.append(f["prompt"] + [token])
            labels.append([-100] * len(f["prompt"]) + [token])
            slots.append(b * width + k)
    return {
        "input_ids": torch.tensor(rows),
        "labels": torch.tensor(labels),
        "candidate_slots": torch.tensor(slots),
        "candidate_correct": correct,
    }


def candidate_trainer(output: Path, objective: str, **overrides) -> ZOTrainer:
    args = zo_args(
        output,
        zo_objective=objective,
        remove_unused_columns=False,
        label_names=["candidate_correct"],
        per_device_eval_batch_size=8,
        **overrides,
    )
    return ZOTrainer(
        model=tiny_lm(),
        args=args,
        train_dataset=CandidateData(),
        eval_dataset=CandidateData(16, seed=1),
        data_collator=candidate_collator,
        compute_metrics=candidate_accuracy,
    )


def test_classification_objective_under_accumulation(tmp_path: Path) -> None:
    whole = candidate_trainer(tmp_path / "whole", "classification", max_steps=4)
    whole.train()
    split = candidate_trainer(
        tmp_path / "split",
        "classification",
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    split.train()
    a, b = whole.zo_optimizer.records, split.zo_optimizer.records
    assert [r.grad for r in b] == pytest.approx(
        [r.grad for r in a], rel=1e-3, abs=2e-3
    )  # float32 sums in another order
    first = [h["loss"] for h in whole.state.log_history if "loss" in h][0]
    assert 0.3 < first < 3.0  # cross-entropy over two candidates, not a token-level LM loss


def test_accuracy_objective_is_a_share_of_wrong_examples(tmp_path: Path) -> None:
    trainer = candidate_trainer(tmp_path, "accuracy", max_steps=3, logging_steps=1)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3
    assert all(abs(loss * 16 - round(loss * 16)) < 1e-6 for loss in losses)  # k / 8, averaged
    metrics = trainer.evaluate()  # eval loss 1 - accuracy; compute_metrics sees the score grids
    assert metrics["eval_accuracy"] == pytest.approx(1.0 - metrics["eval_loss"])
    assert metrics["eval_accuracy"] * 16 == pytest.approx(round(metrics["eval_accuracy"] * 16))


def test_candidate_objective_names_the_missing_keys(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, zo_objective="classification", max_steps=1)
    with pytest.raises(ValueError, match="candidate_slots, candidate_correct"):
        trainer.train()


def test_resume_keeps_float32_state_of_a_bfloat16_model(tmp_path: Path) -> None:
    """LOZO-M keeps V and its momentum N in float32 next to bfloat16 weights; torch's
    Optimizer.load_state_dict alone would cast them to the weights' dtype."""
    settings = dict(zo_method="lozo-m", zo_nu=3, max_steps=4, save_strategy="steps", save_steps=2)
    straight = make_trainer(tmp_path / "a", model=tiny_lm(dtype=torch.bfloat16), **settings)
    straight.train()
    again = make_trainer(tmp_path / "a", model=tiny_lm(dtype=torch.bfloat16), **settings)
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    state = again.zo_optimizer.state
    kept = {t.dtype for s in state.values() for k, t in s.items() if k in ("v", "n")}
    assert kept == {torch.float32}
    assert same_bits(snapshot(again.model), snapshot(straight.model))


def test_a_tuner_folder_scales_every_block(tmp_path: Path) -> None:
    from l2l.blocks import ParamBlocks
    from l2l.tuner import Tuner, TunerMismatchError

    tuner = Tuner.for_blocks(ParamBlocks.from_module(tiny_lm()), "l2l/tiny-llama")
    tuner.save_pretrained(tmp_path / "tuner")
    trainer = make_trainer(tmp_path / "run", max_steps=3, zo_tuner=str(tmp_path / "tuner"))
    trainer.train()
    records = trainer.zo_optimizer.records
    assert all(
        r.scales is not None and len(r.scales) == len(tuner.config.block_names) for r in records
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tuner"]["fingerprint"] == tuner.config.fingerprint
    rebuilt = tiny_lm()
    replay(rebuilt, Trajectory.load(tmp_path / "run" / "trajectory.json"))
    assert weights_sha256(rebuilt) == results["weights_sha256"]

    other = make_trainer(tmp_path / "opt", model=tiny_lm("opt"), zo_tuner=str(tmp_path / "tuner"))
    with pytest.raises(TunerMismatchError, match="does not fit this model"):
        other.train()
