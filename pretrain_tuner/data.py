"""The meta-training data: minibatches from one or several tasks of the shared task registry."""

from __future__ import annotations

import random
from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from finetune.tasks import Example, Task, load_task, loss_batch

MIXES = ("mixed", "alternating")


class _Batches(Dataset):
    """A list of example minibatches; the collate function tokenises one on demand."""

    def __init__(self, batches: list[list[Example]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[Example]:
        return self.batches[index]


def make_batches(
    tasks: Sequence[Task], batch_size: int, mix: str, seed: int
) -> list[list[Example]]:
    """``mixed``: examples of all tasks shuffled together; ``alternating``: one task per batch,
    tasks taking turns (round robin) until each has been used up."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    rng = random.Random(seed)
    if mix == "mixed":
        pool = [e for t in tasks for e in t.train]
        rng.shuffle(pool)
        return [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    per_task = []
    for task in tasks:
        pool = list(task.train)
        rng.shuffle(pool)
        per_task.append([pool[i : i + batch_size] for i in range(0, len(pool), batch_size)])
    out = []
    for turn in range(max(len(b) for b in per_task)):
        out += [b[turn] for b in per_task if turn < len(b)]
    return out


class MetaDataModule(L.LightningDataModule):
    """Training minibatches for meta-training, from the task registry (names or local files)."""

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer,
        batch_size: int = 8,
        n_train: int = 1000,
        mix: str = "mixed",
        seed: int = 0,
        max_length: int = 256,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("meta-training needs at least one task (--tasks T1,T2)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        self.task_names = list(tasks)
        self.tokenizer = tokenizer
        self.batch_size, self.n_train, self.mix = batch_size, n_train, mix
        self.seed, self.max_length = seed, max_length
        self.tasks: list[Task] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.tasks:
            self.tasks = [
                load_task(name, seed=self.seed, n_train=self.n_train, n_dev=1, n_test=1)
                for name in self.task_names
            ]

    def _collate(self, batch: list[list[Example]]):
        (examples,) = batch
        return loss_batch(examples, self.tokenizer, max_length=self.max_length)

    def train_dataloader(self) -> DataLoader:
        batches = make_batches(self.tasks, self.batch_size, self.mix, self.seed)
        # mixed: reshuffle the batches every epoch; alternating: keep the round-robin order
        return DataLoader(
            _Batches(batches),
            batch_size=1,
            shuffle=self.mix == "mixed",
            collate_fn=self._collate,
            num_workers=0,
        )
