"""Atomic JSON Lines files and the manifest that lets a dataset build be skipped when nothing changed."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Row = dict[str, Any]
SplitRows = tuple[list[Row], list[Row]]

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "eval")


def write_text_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write ``lines`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    Readers see either the old file or the complete new one, also when several processes build the
    same dataset at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per call; open() with mode "x" applies the umask, unlike tempfile.mkstemp (0600).
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("x", encoding="utf-8", newline="\n") as handle:
            for line in lines:
                handle.write(line)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is), atomically."""
    write_text_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[Row]:
    """Read a JSON Lines file into a list of objects."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _cached_paths(directory: Path, identity: Mapping[str, Any]) -> dict[str, Path] | None:
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(key) != value for key, value in identity.items()):
        return None

    paths = {split: directory / f"{split}.jsonl" for split in SPLITS}
    rows = manifest.get("rows", {})
    for split, path in paths.items():
        if not path.is_file() or _count_lines(path) != rows.get(split):
            return None
    return paths


def build_split_files(
    directory: Path,
    identity: Mapping[str, Any],
    build_rows: Callable[[], SplitRows],
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``manifest.json`` under ``directory``.

    ``identity`` (seed, format version, source package versions, sizes) is stored in the manifest.
    When a manifest with the same identity exists and both files have the recorded row counts, the
    files are kept and ``build_rows`` is not called. The manifest is written last, so an interrupted
    build is redone on the next call.
    """
    cached = _cached_paths(directory, identity)
    if cached is not None:
        logger.info("Reusing demo dataset %s (seed %s)", directory, identity.get("seed"))
        return cached

    train_rows, eval_rows = build_rows()
    paths = {split: directory / f"{split}.jsonl" for split in SPLITS}
    write_jsonl(paths["train"], train_rows)
    write_jsonl(paths["eval"], eval_rows)

    manifest = {**identity, "rows": {"train": len(train_rows), "eval": len(eval_rows)}}
    write_text_atomic(directory / MANIFEST_NAME, [json.dumps(manifest, indent=2, sort_keys=True) + "\n"])
    logger.info("Wrote demo dataset %s: %d train rows, %d eval rows", directory, len(train_rows), len(eval_rows))
    return paths
