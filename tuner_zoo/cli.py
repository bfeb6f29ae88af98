"""``tuner-zoo``: list, inspect, download, register, import and publish learned ZO tuners.

    tuner-zoo list
    tuner-zoo info smollm2-135m
    tuner-zoo download opt-13b --tuner_revision v1
    tuner-zoo register my-tuner runs/tuner --overwrite
    tuner-zoo push runs/tuner me/my-tuner
    tuner-zoo import-pth llama1B_finetuner.pth --model meta-llama/Llama-3.2-1B --output out

Each subcommand's settings are a dataclass below whose field docstrings are its --help.
Exit status: 0 done, 2 an error the one-line message explains, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ArgumentParser
from rich.console import Console
from rich.table import Table

from l2l.tuner import TunerConfig
from llm.cli import (
    HelpFormatter,
    UsageError,
    add_dataclass_flags,
    dataclass_from,
    parse_flags,
    run_command,
)
from tuner_zoo.registry import get_entry, load_registry
from tuner_zoo.resolve import (
    is_cached,
    local_names,
    locate,
    register_local,
    resolve_tuner,
    unknown_tuner_error,
    zoo_dir,
)

PROG = "tuner-zoo"


@dataclass(kw_only=True)
class ListTuners:
    """All known tuners, where they live, downloaded or not."""


@dataclass(kw_only=True)
class Info:
    """The registry entry and config of one tuner."""

    name: str
    """registry or local-zoo name"""


@dataclass(kw_only=True)
class Download:
    """Fetch a tuner from the Hub into the Hugging Face cache."""

    name: str
    """registry name or Hub repo id (owner/name)"""
    tuner_revision: str | None = None
    """branch, tag or commit of the tuner's repo; none: main"""
    force_download: bool = False
    """download again even if it is cached"""


@dataclass(kw_only=True)
class Register:
    """Add a tuner folder to the local zoo under NAME."""

    name: str
    """name to resolve it by, e.g. my-opt-tuner"""
    folder: Path
    """tuner folder, e.g. one written by pretrain-tuner"""
    link: bool = False
    """symlink the folder instead of copying it"""
    overwrite: bool = False
    """replace an existing entry of that name"""


@dataclass(kw_only=True)
class Push:
    """Validate a tuner folder and upload it to the Hub."""

    folder: Path
    """tuner folder"""
    repo_id: str
    """target repo, owner/name (created if missing)"""
    private: bool = False
    """create the repo as private"""
    branch: str | None = None
    """target branch; none: main"""


@dataclass(kw_only=True)
class ImportPth:
    """Convert a ZO Fine-tuner release .pth (safely: no pickle code runs)."""

    file: Path
    """the released .pth, e.g. llama1B_finetuner.pth"""
    model: str
    """Hub id of the base model it was trained for"""
    output: Path
    """folder to write the tuner to"""
    model_config: str | None = None
    """config.json, model folder or Hub id giving the block shapes; none: --model, from the
    Hugging Face cache or the Hub"""
    model_revision: str | None = None
    """revision of the base model to record in the tuner's config"""
    register: str | None = None
    """also register it in the local zoo under this name"""


def _where(name: str) -> tuple[str, str]:
    """(where it lives, downloaded?) for the list table, without network."""
    entry = get_entry(name)
    location = locate(name)
    if location.path is not None:
        return f"{location.kind}: {location.path}", "local"
    if entry is not None and entry.on_hub:
        return f"hub: {entry.repo_id}", "yes" if is_cached(entry.repo_id) else "no"
    if entry is not None and entry.status == "importable":
        return "release .pth: import-pth", "-"
    if entry is not None and entry.status == "bundled":
        return "missing from this install", "-"
    return "-", "-"


def cmd_list(args: ListTuners, console: Console) -> None:
    table = Table(title="learned ZO tuners", show_lines=False)
    table.add_column("name", no_wrap=True)
    table.add_column("base model", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("where", overflow="fold")
    table.add_column("downloaded", no_wrap=True)
    registry = load_registry()
    for name, entry in registry.items():
        where, downloaded = _where(name)
        table.add_row(name, entry.base_model, entry.status.split(":")[0], where, downloaded)
    for name in local_names():
        if name not in registry:
            config = TunerConfig.load(zoo_dir() / name / "config.json")
            table.add_row(name, config.base_model, "local", _where(name)[0], "local")
    console.print(table)


def cmd_info(args: Info, console: Console) -> None:
    entry = get_entry(args.name)
    location = locate(args.name)
    info: dict[str, object] = {"name": args.name, "location": location.kind}
    if location.path is not None:
        info["path"] = str(location.path)
    if entry is not None:
        info.update({k: v for k, v in vars(entry).items() if v not in (None, "", {}, [])})
    if location.path is not None or location.kind == "hf cache":
        config = TunerConfig.load(resolve_tuner(args.name, offline=True) / "config.json")
        info["config"] = {
            k: v for k, v in config.to_dict().items() if k not in ("block_names", "block_shapes")
        }
        info["config"]["num_blocks"] = config.num_blocks
    elif entry is None:
        raise unknown_tuner_error(args.name)
    console.print_json(json.dumps(info, default=str))


def cmd_download(args: Download, console: Console) -> None:
    folder = resolve_tuner(
        args.name,
        offline=False,
        revision=args.tuner_revision,
        force_download=args.force_download,
    )
    console.print(f"{args.name}: {folder}")


def _register(name: str, folder: Path, *, link: bool = False, overwrite: bool = False) -> Path:
    try:
        return register_local(name, folder, link=link, overwrite=overwrite)
    except FileExistsError:
        raise UsageError(
            f"the local zoo already has a tuner called {name!r} ({zoo_dir() / name}): pass "
            "--overwrite to replace it, or choose another name"
        ) from None


def cmd_register(args: Register, console: Console) -> None:
    target = _register(args.name, args.folder, link=args.link, overwrite=args.overwrite)
    console.print(f"registered {args.name!r} at {target}")


def cmd_push(args: Push, console: Console) -> None:
    from tuner_zoo.publish import push_folder

    url = push_folder(args.folder, args.repo_id, private=args.private or None, branch=args.branch)
    console.print(f"pushed {args.folder} to {args.repo_id}: {url}")


def cmd_import_pth(args: ImportPth, console: Console) -> None:
    from tuner_zoo.import_pth import blocks_for_model, convert_release

    taken = zoo_dir() / args.register if args.register else None
    if taken is not None and (taken.exists() or taken.is_symlink()):
        raise UsageError(
            f"--register {args.register}: the local zoo already has a tuner of that name "
            f"({taken}); choose another name, or replace it afterwards with tuner-zoo register "
            f"{args.register} {args.output} --overwrite"
        )
    blocks, model_type = blocks_for_model(args.model_config or args.model)
    tuner = convert_release(
        args.file, blocks, args.model, revision=args.model_revision, model_type=model_type
    )
    tuner.save_pretrained(args.output)
    console.print(f"converted {args.file} ({tuner.num_blocks} blocks) to {args.output}")
    if args.register:
        where = _register(args.register, args.output)
        console.print(f"registered as {args.register!r} at {where}")


COMMANDS: dict[str, tuple[type, Callable, tuple[str, ...]]] = {
    "list": (ListTuners, cmd_list, ()),
    "info": (Info, cmd_info, ("name",)),
    "download": (Download, cmd_download, ("name",)),
    "register": (Register, cmd_register, ("name", "folder")),
    "push": (Push, cmd_push, ("folder", "repo_id")),
    "import-pth": (ImportPth, cmd_import_pth, ("file",)),
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Find, download, register, import and publish learned zeroth-order tuners "
        "(one per base LLM). A tuner is a folder: config.json + model.safetensors + README.md.",
        exit_on_error=False,
        formatter_class=HelpFormatter,
    )
    subcommands = parser.add_subcommands(required=True, dest="command")
    for name, (settings, _, positional) in COMMANDS.items():
        summary = settings.__doc__.strip().splitlines()[0]
        sub = ArgumentParser(
            description=summary, exit_on_error=False, formatter_class=HelpFormatter
        )
        add_dataclass_flags(sub, settings, positional=positional, group=False)
        subcommands.add_subcommand(name, sub, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 a user error (one line), 130 interrupted."""

    def body() -> None:
        namespace = parse_flags(build_parser(), argv)
        settings, command, _ = COMMANDS[namespace.command]
        command(dataclass_from(settings, namespace[namespace.command]), Console(soft_wrap=True))

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
