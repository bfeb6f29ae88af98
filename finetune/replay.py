"""``l2l replay``: rebuild a fine-tune's weights from its trajectory and its base model.

    l2l replay test-user/sst2-mezo --output fine-tuned/     # a fine-tune pushed to the Hub
    l2l replay runs/finetune --output fine-tuned/           # a local finetune/ZOTrainer output

The base model recorded with the fine-tune is loaded (a built-in name, local folder or Hub id,
in the recorded dtype), the trajectory is replayed onto it, and the weights are checked against
the sha256 recorded in the card before anything is written: a mismatch (another base model or
revision, another device type's random stream) is refused. ``--output`` receives the model as
safetensors, its tokenizer and the fine-tune's files.

Exit status: 0 done, 2 an error the message explains, 130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ArgumentParser

from llm.cli import (
    HelpFormatter,
    UsageError,
    add_dataclass_flags,
    dataclass_from,
    parse_flags,
    run_command,
)

PROG = "l2l"


@dataclass
class ReplayArgs:
    """Replay a fine-tune"""

    source: str
    """Hub repo id of a pushed fine-tune, or a local fine-tune folder (trajectory.json with its
    README.md card or results.json)"""
    output: Path
    """folder for the rebuilt model (safetensors), its tokenizer and the fine-tune's files"""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the fine-tune repo"""
    device: str = "cpu"
    """where to replay: the device type the run used (torch's CPU and CUDA streams differ)"""
    verify: bool = True
    """check the rebuilt weights against the recorded sha256 (--no_verify only for a run that
    recorded none)"""
    overwrite: bool = False
    """replace an existing --output folder"""
    force_download: bool = False
    """fetch the fine-tune's files from the Hub again even when they are cached"""


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag help as :class:`llm.cli.HelpFormatter` writes it; the description as written."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, description=__doc__, exit_on_error=False, formatter_class=_Formatter
    )
    commands = parser.add_subcommands(dest="command", required=True)
    replay = ArgumentParser(description=__doc__, exit_on_error=False, formatter_class=_Formatter)
    add_dataclass_flags(replay, ReplayArgs, positional=("source",), group=False)
    commands.add_subcommand("replay", replay, help="rebuild a fine-tune's weights and verify them")
    return parser


def replay(args: ReplayArgs) -> Path:
    """Fetch, replay, verify and write the fine-tune of ``args``; returns the output folder."""
    from l2l.finetuned import FINETUNE_FILES, fetch_finetuned, finetune_info, load_finetuned
    from l2l.io import atomic_directory
    from llm.ids import offline_name
    from llm.models import load_model

    output = args.output.expanduser()
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"--output {output} exists and is not empty; pass --overwrite")
    folder = fetch_finetuned(
        args.source, revision=args.revision, force_download=args.force_download
    )
    info = finetune_info(folder)
    if info.base_model_revision:
        print(
            f"{PROG}: note: the run used {info.base_model} at revision "
            f"{info.base_model_revision}; the weights check below tells if the one loaded differs",
            file=sys.stderr,
        )
    model, tokenizer = load_model(
        offline_name(info.base_model), dtype=info.dtype or "float32", device=args.device
    )
    model = load_finetuned(folder, model=model, verify=args.verify)
    with atomic_directory(output) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        for name in FINETUNE_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staged / name)
    checked = f"sha256 {info.weights_sha256[:16]}... verified" if args.verify else "not verified"
    print(f"rebuilt {info.steps} {info.method} steps on {info.base_model} ({checked}): {output}")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        namespace = parse_flags(build_parser(), argv)
        replay(dataclass_from(ReplayArgs, namespace.replay))
        return 0

    return run_command(PROG, body, lambda: "interrupted: nothing was written")


if __name__ == "__main__":
    sys.exit(main())
