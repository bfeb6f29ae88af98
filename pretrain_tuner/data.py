"""The meta-training data: minibatches from one or several tasks of the shared task registry.

The minibatch of global step ``t`` on rank ``r`` is a pure function of ``(seed, t, r)``, so a run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen, whatever
Lightning makes of the epoch it restarts in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from l2l.z import mix_seed
from llm.tasks import Example, Task, load_task, objective_batch, resolve_objective
from llm.tasks.objective import DIFFERENTIABLE

MIXES = ("mixed", "alternating")


class StepBatches(IterableDataset):
    """The stream of minibatches from global step ``start()`` on, for rank ``rank`` of ``world``.

    An epoch is ``len(self)`` steps of ``world`` batches each (the last step wraps around to the
    first batches when ``world`` does not divide the number of batches, as ``DistributedSampler``
    pads). Step ``t`` is in epoch ``e = t // len(self)`` at position ``p = t % len(self)``, and
    rank ``r`` gets batch ``order_e[(p * world + r) % N]``: ``order_e`` is a permutation seeded by
    ``(seed, e)`` when ``shuffle``, the given order otherwise.

    ``start`` is read when iteration begins (the trainer's global step, restored on resume).
    """

    def __init__(
        self,
        batches: list[list[Example]],
        *,
        shuffle: bool,
        seed: int,
        start: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not batches:
            raise ValueError("no training batches: the tasks have no training examples")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.batches, self.shuffle, self.seed = batches, shuffle, seed
        self.start, self.rank, self.world = start, rank, world
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, order): drawn once an epoch

    def __len__(self) -> int:
        """Steps per epoch."""
        return math.ceil(len(self.batches) / self.world)

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            n = len(self.batches)
            if self.shuffle:
                gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
                self._order = (epoch, torch.randperm(n, generator=gen).tolist())
            else:
                self._order = (epoch, list(range(n)))
        return self._order[1]

    def batch_index(self, step: int) -> int:
        epoch, position = divmod(step, len(self))
        return self.order(epoch)[(position * self.world + self.rank) % len(self.batches)]

    def __iter__(self) -> Iterator[list[Example]]:
        step = self.start()
        while True:  # the trainer stops at the end of its epoch or at max_steps
            yield self.batches[self.batch_index(step)]
            step += 1


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
    """Training minibatches for meta-training, from the task registry (names or local files).

    Each batch is an :data:`llm.tasks.ObjectiveBatch` for ``objective`` (``auto``: the tasks'
    default, resolved in :meth:`setup`); the meta-step needs a differentiable one.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer,
        batch_size: int = 8,
        n_train: int = 1000,
        mix: str = "mixed",
        seed: int = 0,
        max_length: int = 256,
        objective: str = "auto",
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("meta-training needs at least one task (--task T, or --task [T1,T2])")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        if objective not in ("auto", *DIFFERENTIABLE):
            raise ValueError(
                f"objective {objective!r} cannot train a tuner: the meta-step backpropagates "
                f"through the loss; use auto or one of {', '.join(DIFFERENTIABLE)}"
            )
        self.objective = objective
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
            self.objective = resolve_objective(self.objective, self.tasks)

    def _collate(self, batch: list[list[Example]]):
        (examples,) = batch
        return objective_batch(examples, self.tokenizer, self.objective, self.max_length)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        where = {}  # without a trainer: one process from step 0 (StepBatches' defaults)
        if trainer is not None:
            where = dict(
                start=lambda: trainer.global_step,
                rank=trainer.global_rank,
                world=trainer.world_size,
            )
        stream = StepBatches(
            make_batches(self.tasks, self.batch_size, self.mix, self.seed),
            # mixed: a new batch order every epoch; alternating: keep the round-robin order
            shuffle=self.mix == "mixed",
            seed=self.seed,
            **where,
        )
        # one process reads the stream: it must see the trainer's global step when it starts
        return DataLoader(stream, batch_size=1, collate_fn=self._collate, num_workers=0)
