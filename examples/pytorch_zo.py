"""Zeroth-order fine-tuning in a plain PyTorch loop: two forwards a step, no backward pass.

python examples/pytorch_zo.py            # tiny-llama on the offline tweets task, CPU
"""

import torch

from l2l import MeZO, Trajectory
from llm.models import load_model
from llm.tasks import load_task, loss_batch


def main(steps: int = 20, batch_size: int = 8, output: str = "runs/pytorch_zo.json"):
    model, tokenizer = load_model("tiny-llama")
    train = load_task("tweets", n_train=steps * batch_size, n_dev=1, n_test=1).train
    opt = MeZO(model, lr=1e-3, eps=1e-3, record=True)  # a torch.optim.Optimizer
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)  # any scheduler
    for step in range(steps):
        batch = loss_batch(train[step * batch_size : (step + 1) * batch_size], tokenizer, 64)
        # the closure runs at theta + eps z and theta - eps z, then the update is applied
        loss = opt.step(lambda: model(**batch).loss)  # noqa: B023 (called right here)
        schedule.step()
        print(f"step {step:3d}  loss {loss:.4f}  lr {opt.param_groups[0]['lr']:.2e}")
    Trajectory.from_optimizer(opt).save(output)  # the whole fine-tune: a seed + scalar a step
    return model


if __name__ == "__main__":
    main()
