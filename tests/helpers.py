"""Shared builders for the engine tests: quadratics and tiny random causal LMs."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llm.models import tiny_config

VOCAB = 300


def tiny_lm(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The built-in tiny model of ``arch`` (llama: tied embeddings; opt: untied), with a
    ``VOCAB``-token vocabulary and weights from ``seed``, in eval mode."""
    if arch not in ("llama", "opt"):
        raise ValueError(arch)
    cfg = tiny_config(f"tiny-{arch}", vocab_size=VOCAB)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def lm_closure(model, batch: int = 4, length: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen).to(model.device)
    return lambda: model(input_ids=ids, labels=ids).loss


class Quadratic(torch.nn.Module):
    """L(x, W) = 1/2 x^T A x + 1/2 ||W - W*||^2 with A diagonal; gradient and Hessian known."""

    def __init__(self, n: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.diag = torch.linspace(1.0, 4.0, n)
        self.x = torch.nn.Parameter(torch.randn(n, generator=gen))
        self.w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
        self.w_star = torch.randn(6, 5, generator=gen)

    def forward(self):
        return (
            0.5 * (self.diag * self.x.square()).sum() + 0.5 * (self.w - self.w_star).square().sum()
        )

    def gradient(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.diag * self.x, (self.w - self.w_star).reshape(-1)])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- l2l home

#: Real offline assets (PyPI downloads, prepared data, the converted SmolLM2) are fetched once
#: per checkout into this folder, never into the user's ``~/.cache/l2l``.
ASSET_HOME = Path(__file__).resolve().parents[1] / ".cache" / "test-home"
_SHARED = ("downloads", "data", "models")


def isolated_home(folder: Path) -> Path:
    """An empty ``L2L_HOME`` at ``folder`` (own zoo and registry) that sees the shared assets."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in _SHARED:
        (ASSET_HOME / name).mkdir(parents=True, exist_ok=True)
        link = folder / name
        if not link.exists():
            link.symlink_to(ASSET_HOME / name, target_is_directory=True)
    return folder


# --------------------------------------------------------------------------- finetune runs


def write_classification_task(path: Path, n: int = 60, labels: tuple[str, ...] = ("bad", "good")):
    """A classification task as JSONL (text/label columns), the labels taking turns."""
    import json

    words = {"good": "great fun", "bad": "a dull mess"}
    with path.open("w") as f:
        for i in range(n):
            label = labels[i % len(labels)]
            text = f"Review {i}: it was {words.get(label, label)}."
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def finetune_argv(task: Path | str, out: Path, *extra: str, steps: int = 3) -> list[str]:
    """``finetune`` flags for a seconds-long CPU run on a tiny model (``extra`` adds the model)."""
    return [
        "--task", str(task),
        "--output", str(out),
        "--steps", str(steps),
        "--batch_size", "4",
        "--n_train", "32",
        "--n_dev", "4",
        "--n_test", "6",
        "--eval_examples", "4",
        "--lr", "1e-3",
        "--checkpoint_every", "2",
        "--accelerator", "cpu",
        "--no_progress",
        *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as a module, with ``benchmarks/`` on ``sys.path`` while
    it is used (a process pool's spawned workers get the parent's ``sys.path`` and can import the
    module their initializer lives in)."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(folder)
        sys.modules.pop(name, None)
