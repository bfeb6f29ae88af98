"""``tuner-zoo``: list, inspect, download, register, import and publish learned ZO tuners."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from l2l.tuner import TunerConfig, TunerFormatError, TunerMismatchError, TunerNotFoundError
from tuner_zoo.import_pth import ReleaseFormatError
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

EXPECTED_ERRORS = (
    TunerNotFoundError,
    TunerFormatError,
    TunerMismatchError,
    ReleaseFormatError,
    FileExistsError,
    FileNotFoundError,
    ValueError,
)


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


def cmd_list(args: argparse.Namespace, console: Console) -> int:
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
    return 0


def cmd_info(args: argparse.Namespace, console: Console) -> int:
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
    return 0


def cmd_download(args: argparse.Namespace, console: Console) -> int:
    folder = resolve_tuner(
        args.name, offline=False, revision=args.revision, force_download=args.force
    )
    console.print(f"{args.name}: {folder}")
    return 0


def cmd_register(args: argparse.Namespace, console: Console) -> int:
    target = register_local(args.name, args.folder, link=args.link, overwrite=args.force)
    console.print(f"registered {args.name!r} at {target}")
    return 0


def cmd_push(args: argparse.Namespace, console: Console) -> int:
    from tuner_zoo.publish import push_folder

    url = push_folder(args.folder, args.repo_id, private=args.private or None, branch=args.branch)
    console.print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def cmd_import_pth(args: argparse.Namespace, console: Console) -> int:
    from tuner_zoo.import_pth import blocks_for_model, convert_release

    blocks, model_type = blocks_for_model(args.model_config or args.base_model)
    tuner = convert_release(
        args.file, blocks, args.base_model, revision=args.revision, model_type=model_type
    )
    tuner.save_pretrained(args.output)
    console.print(f"converted {args.file} ({tuner.num_blocks} blocks) to {args.output}")
    if args.register:
        console.print(
            f"registered as {args.register!r} at {register_local(args.register, args.output)}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuner-zoo",
        description="Find, download, register, import and publish learned zeroth-order tuners "
        "(one per base LLM). A tuner is a folder: config.json + model.safetensors + README.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="all known tuners, where they live, downloaded or not")
    info = sub.add_parser("info", help="registry entry and config of one tuner")
    info.add_argument("name", help="registry or local-zoo name")
    download = sub.add_parser("download", help="fetch a tuner from the Hub into the HF cache")
    download.add_argument("name", help="registry name or Hub repo id (owner/name)")
    download.add_argument("--revision", help="branch, tag or commit (default: main)")
    download.add_argument("--force", action="store_true", help="re-download even if cached")
    register = sub.add_parser("register", help="add a tuner folder to the local zoo under NAME")
    register.add_argument("name", help="name to resolve it by, e.g. my-opt-tuner")
    register.add_argument("folder", type=Path, help="folder written by pretrain-tuner")
    register.add_argument("--link", action="store_true", help="symlink instead of copying")
    register.add_argument("--force", action="store_true", help="replace an existing entry")
    push = sub.add_parser("push", help="validate a tuner folder and upload it to the Hub")
    push.add_argument("folder", type=Path, help="tuner folder")
    push.add_argument("repo_id", help="target repo, owner/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--branch", help="target branch (default: main)")
    imp = sub.add_parser(
        "import-pth", help="convert a ZO Fine-tuner release .pth (safely, no pickle code runs)"
    )
    imp.add_argument("file", type=Path, help="the released .pth, e.g. llama1B_finetuner.pth")
    imp.add_argument("--base-model", required=True, help="Hub id of the model it was trained for")
    imp.add_argument("--output", required=True, type=Path, help="folder to write the tuner to")
    imp.add_argument(
        "--model-config",
        help="config.json, model folder or Hub id giving the block shapes "
        "(default: --base-model, from the HF cache or the Hub)",
    )
    imp.add_argument("--revision", help="revision of the base model to record")
    imp.add_argument("--register", metavar="NAME", help="also register it in the local zoo")
    return parser


COMMANDS = {
    "list": cmd_list,
    "info": cmd_info,
    "download": cmd_download,
    "register": cmd_register,
    "push": cmd_push,
    "import-pth": cmd_import_pth,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)
    try:
        return COMMANDS[args.command](args, console)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
