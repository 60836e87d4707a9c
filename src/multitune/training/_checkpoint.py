"""Crash-safe checkpoints: a run folder contains ``checkpoint-<step>`` folders that are always complete.

A checkpoint is first written as ``checkpoint-<step>.tmp``. Each file in it is written under a
temporary name, flushed, fsync'ed and renamed with :func:`os.replace`, and the folder is renamed
to ``checkpoint-<step>`` only once every file is in place. A crash at any point therefore leaves
the previous checkpoints untouched and at most one ``.tmp`` folder, which :func:`latest_checkpoint`
ignores and the next save removes.

Layout of one checkpoint folder:

- ``model.safetensors``: the model's ``state_dict`` (safetensors).
- ``trainer_state.pt``: optimizer, scheduler, balancer, loader and RNG states, read with
  :func:`torch.load` (``weights_only=False``, because the loader and RNG states hold Python
  objects such as :func:`random.getstate`'s tuple).
- ``trainer_state.json``: the step and the metrics history, readable without PyTorch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def atomic_write_bytes(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through ``write(handle)`` under a temporary name, fsync it and rename it to ``path``."""
    tmp_path = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp_path, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except Exception as error:
        # An interrupt inside torch.save leaves its zip writer half-written, and the writer's
        # cleanup then raises RuntimeError in place of the interrupt. The interrupt is re-raised.
        if isinstance(error.__context__, KeyboardInterrupt):
            raise error.__context__ from None
        raise
    os.replace(tmp_path, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def _fsync_directory(path: Path) -> None:
    # A directory fsync makes the renames inside it durable; some platforms (Windows) cannot open folders.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int | None:
    """Return the step of a complete checkpoint folder name (``checkpoint-120`` → 120), else None."""
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Return the complete checkpoint folders of ``run_dir``, sorted by step (oldest first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir() and (child / STATE_FILE).is_file() and (child / MODEL_FILE).is_file():
            found.append((step, child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Return the complete checkpoint with the highest step, or None; ``.tmp`` folders are never returned."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def rng_state() -> dict[str, Any]:
    """Return the Python, NumPy and PyTorch (CPU and CUDA) random number generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generator states returned by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors rejects tensors that share storage (tied weights); each gets its own contiguous copy.
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in seen:
            tensor = tensor.clone()
        elif pointer is not None:
            seen[pointer] = name
        tensors[name] = tensor.contiguous().cpu()
    return tensors


def save_model_weights(model: nn.Module, path: Path) -> None:
    """Write ``model.state_dict()`` to ``path`` as safetensors, atomically."""
    data = _model_tensors(model)
    tmp_path = path.with_name(path.name + TMP_SUFFIX)
    save_file(data, str(tmp_path), metadata={"format": "pt"})
    with open(tmp_path, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights written by :func:`save_model_weights` into ``model`` (strict)."""
    tensors = load_file(str(path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: the weights do not match the model (missing: {missing[:5]}, unexpected: {unexpected[:5]}); "
            "was the run's config changed after the checkpoint was written?"
        )


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    state: Mapping[str, Any],
    summary: Mapping[str, Any],
) -> Path:
    """Write ``checkpoint-<step>`` in ``run_dir`` and return its path.

    Args:
        run_dir: the run folder.
        step: optimizer step the checkpoint is taken after.
        model: module whose ``state_dict`` goes to ``model.safetensors``.
        state: everything else a resumed run needs, written with :func:`torch.save`.
        summary: JSON-serialisable facts (step, metrics history) for ``trainer_state.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = run_dir / f"{CHECKPOINT_PREFIX}{step}{TMP_SUFFIX}"
    remove_incomplete_checkpoints(run_dir)
    tmp.mkdir()

    save_model_weights(model, tmp / MODEL_FILE)
    atomic_write_bytes(tmp / STATE_FILE, lambda handle: torch.save(dict(state), handle))
    atomic_write_text(tmp / STATE_JSON, json.dumps(dict(summary), indent=2, sort_keys=True) + "\n")
    _fsync_directory(tmp)

    if final.exists():
        # The same step is saved again (for example the final save after a periodic one):
        # the old folder is renamed away first, so a complete checkpoint exists at every moment.
        old = run_dir / f"{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_directory(run_dir)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint_state(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Return the trainer state stored in checkpoint folder ``path``."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {STATE_FILE} not found")
    # weights_only=False: the state contains Python RNG tuples and loader states written by this package.
    return torch.load(state_file, map_location=map_location, weights_only=False)


def remove_incomplete_checkpoints(run_dir: Path) -> None:
    """Delete ``checkpoint-*.tmp`` and ``checkpoint-*.old`` folders left by an interrupted save."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for child in run_dir.iterdir():
        if child.name.startswith(CHECKPOINT_PREFIX) and child.name.endswith((TMP_SUFFIX, ".old")) and child.is_dir():
            logger.warning("removing incomplete checkpoint folder %s left by an interrupted save", child)
            shutil.rmtree(child, ignore_errors=True)


def rotate_checkpoints(run_dir: Path, *, save_total_limit: int | None, best: Path | None) -> list[Path]:
    """Delete the oldest checkpoints so at most ``save_total_limit`` remain, always keeping ``best``.

    The most recent checkpoint is kept too, so a run can resume. With ``save_total_limit=1`` and a
    best checkpoint that is not the latest, two folders remain (best and last), as in the Hugging
    Face ``Trainer``. Returns the deleted folders.
    """
    if save_total_limit is None:
        return []
    checkpoints = list_checkpoints(run_dir)
    if len(checkpoints) <= save_total_limit:
        return []

    keep = {path.resolve() for path in checkpoints[-save_total_limit:]} if save_total_limit > 0 else set()
    keep.add(checkpoints[-1].resolve())
    if best is not None:
        keep.add(Path(best).resolve())
    deleted = []
    for path in checkpoints:
        if path.resolve() not in keep:
            shutil.rmtree(path)
            deleted.append(path)
            logger.info("deleted checkpoint %s (save_total_limit=%d)", path, save_total_limit)
    return deleted
