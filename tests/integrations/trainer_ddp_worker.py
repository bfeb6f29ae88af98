"""One rank of the data-parallel ZOTrainer test (``torchrun --nproc_per_node 2 <this> OUT``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from test_hf_trainer import make_trainer  # on PYTHONPATH, set by test_hf_trainer_ddp

from l2l.finetuned import weights_sha256


def main(output: Path) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(output, max_steps=4, per_device_train_batch_size=4)
    trainer.train()
    rank = trainer.args.process_index
    result = dict(
        world=trainer.args.world_size,
        grads=[r.grad for r in trainer.zo_optimizer.records],
        seeds=[r.seed for r in trainer.zo_optimizer.records],
        weights=weights_sha256(trainer.model),
    )
    (output / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
