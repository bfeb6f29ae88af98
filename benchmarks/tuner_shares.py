"""Where a tuner puts the perturbation: each block's share of its squared norm at a run's start.

For each tuner (a folder, a zoo name, or a hand-made heuristic such as ``weight-rms``) the block
scales of the first step of a fine-tuning run (the pretrained weights' statistics, previous
losses 0, previous sigma 1) give the perturbation ``u_b = nf sigma_b z_b``, whose expected
squared norm in block ``b`` is ``n_b (nf sigma_b)^2``. It prints, per tuner, the blocks with the
largest shares, the share of the embedding (tied to the LM head in SmolLM2), and the effective
number of blocks ``1 / sum share^2``; ``mezo`` (every sigma 1) is the reference, whose shares
are the blocks' parameter counts:

    python benchmarks/tuner_shares.py --model smollm2-135m \\
        --tuners mezo,weight-rms,smollm2-135m,benchmarks/results/tuners/smollm2-135m-rms-500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def start_scales(spec: str, blocks) -> torch.Tensor:
    """(B,) float64 sigma of the first step for ``spec`` (``mezo``, a heuristic, a tuner)."""
    from l2l.scales import HEURISTICS, block_features
    from l2l.tuner import Tuner
    from tuner_zoo.resolve import resolve_tuner

    features = block_features(blocks, (0.0, 0.0), torch.ones(len(blocks)))
    if spec == "mezo":
        return torch.ones(len(blocks), dtype=torch.float64)
    if spec in HEURISTICS:
        return HEURISTICS[spec](features).double()
    tuner = Tuner.from_pretrained(resolve_tuner(spec))
    tuner.check_compatible(blocks)
    with torch.no_grad():
        return tuner(features).double()


def shares(sigma: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Each block's share of ``E||u||^2`` (the normalisation ``nf`` cancels)."""
    energy = numels.double() * sigma.square()
    return energy / energy.sum()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tuners", default="mezo,weight-rms,smollm2-135m")
    parser.add_argument("--top", type=int, default=3, help="blocks listed per tuner")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)

    from l2l.blocks import ParamBlocks
    from llm.models import load_model

    model, _ = load_model(args.model)
    blocks = ParamBlocks.from_module(model)
    numels = blocks.numels
    embed = next(i for i, n in enumerate(blocks.names) if "embed" in n)
    results = {}
    for spec in (s.strip() for s in args.tuners.split(",") if s.strip()):
        share = shares(start_scales(spec, blocks), numels)
        top = share.argsort(descending=True)[: args.top]
        results[spec] = {
            "embedding_share": float(share[embed]),
            "effective_blocks": float(1 / share.square().sum()),
            "top": [[blocks.names[i], float(share[i])] for i in top.tolist()],
        }
        listed = ", ".join(f"{name} {value:.1%}" for name, value in results[spec]["top"])
        print(
            f"{spec}: embedding {results[spec]['embedding_share']:.1%}, effective blocks "
            f"{results[spec]['effective_blocks']:.1f} of {len(blocks)}; largest: {listed}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": args.model, "blocks": len(blocks), "tuners": results}
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
