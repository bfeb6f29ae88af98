"""Fine-tuning helps on a classification file it has never seen.

SmolLM2-135M on a local JSONL file of the offline movie-review data (``text`` and a
``negative`` / ``positive`` label, the file's own train/dev/test split; a task the bundled tuner
was not meta-trained on): 60 MeZO steps with the classification objective, with and without the
bundled tuner, two seeds each. Test accuracy after training must beat zero-shot by more than the
spread between the seeds. The run loop is finetune's own (``FinetuneConfig`` ->
``make_optimizer`` -> ``Run.fit``), driven from Python.

Slow: four runs of a 135M model on the CPU, each about as long as the float32 run of
``benchmarks/bf16_check.py`` (the same 60 steps and 1000 test examples: 638 s on the 2-core VM
of BENCHMARKS.md). Run it with ``pytest -m slow tests/finetune/test_finetune_helps.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.run import Run, make_optimizer
from l2l.tuner import Tuner
from llm.assets import ensure_sentiment_data
from llm.models import load_model
from llm.tasks import load_task

BUNDLED_TUNER = Path(__file__).resolve().parents[2] / "tuner_zoo" / "bundled" / "smollm2-135m"
TASK = "movie-reviews"  # held out from the bundled tuner's meta-training
SEEDS = (0, 1)
SETTINGS = dict(steps=60, lr=3e-5, eps=1e-3, batch_size=16, normalize=True)  # lr: chosen on dev


def write_task_file(path: Path) -> Path:
    """The sentiment task as a user's classification file: text, label name, split."""
    folder = ensure_sentiment_data() / TASK
    with path.open("w") as out:
        for split in ("train", "dev", "test"):
            for line in (folder / f"{split}.jsonl").read_text().splitlines():
                row = json.loads(line)
                label = ["negative", "positive"][row["label"]]
                out.write(json.dumps({"text": row["text"], "label": label, "split": split}) + "\n")
    return path


@pytest.mark.slow
def test_mezo_with_and_without_the_tuner_beats_zero_shot(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    path = write_task_file(tmp_path / f"{TASK}.jsonl")
    task = load_task(path, n_train=1000, n_dev=200, n_test=1000)
    assert task.objective == "classification"
    tuner = Tuner.load_folder(BUNDLED_TUNER)
    zero_shot, after = None, {}
    for method in ("mezo", "mezo+tuner"):
        for seed in SEEDS:
            model.load_state_dict(initial)
            out = tmp_path / f"{method}-{seed}"
            cfg = FinetuneConfig(
                model="smollm2-135m", task=str(path), seed=seed, output=str(out), **SETTINGS
            )
            with torch.no_grad():
                opt = make_optimizer(cfg, model, tuner if method == "mezo+tuner" else None)
            run = Run(cfg, model, tokenizer, task, opt, out, progress=False)
            run.results["eval_before"] = zero_shot  # the same model every time: score it once
            results = run.fit()
            assert results["objective"] == "classification"
            zero_shot = results["eval_before"]
            after[method, seed] = results["eval_after"]["accuracy"]
    report = {f"{m} seed {s}": acc for (m, s), acc in after.items()}
    print(f"zero-shot {zero_shot['accuracy']:.4f} (n={zero_shot['n']}); after: {report}")
    for method in ("mezo", "mezo+tuner"):
        accs = [after[method, seed] for seed in SEEDS]
        spread = max(accs) - min(accs)
        gain = sum(accs) / len(accs) - zero_shot["accuracy"]
        assert min(accs) > zero_shot["accuracy"], f"{method}: a seed lost accuracy ({report})"
        assert gain > spread, f"{method}: gain {gain:.4f} <= seed spread {spread:.4f} ({report})"
