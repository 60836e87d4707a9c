"""Files of a saved multi-task model: safetensors weights and a JSON description, written atomically.

A saved folder holds:

* ``model.safetensors``: every tensor of the model's ``state_dict`` (backbone and heads);
* ``multitune_model.json``: the head specs, pooling, LoRA spec, last shared layer and backbone source;
* ``config.json``: the Hugging Face configuration of the backbone, when it is a transformers model,
  so the backbone can be rebuilt offline.

Each file is written under a temporary name in the same folder, then moved into place with
``os.replace``, so a crash never leaves a truncated file under the final name. The JSON description is
written last: a folder that has it has complete weights.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from multitune.models._heads import HeadSpec

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
DESCRIPTION_NAME = "multitune_model.json"
BACKBONE_CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` with a temporary path next to ``path``, then move the result onto ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def save_weights(module: nn.Module, path: Path) -> None:
    """Write the ``state_dict`` of ``module`` to the safetensors file ``path`` atomically."""
    from safetensors.torch import save_model

    atomic_write(path, lambda temporary: save_model(module, str(temporary), metadata={"format": "pt"}, force_contiguous=True))


def load_weights(module: nn.Module, path: Path, *, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load the safetensors file ``path`` into ``module``; return the missing and unexpected keys."""
    from safetensors.torch import load_model

    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found; save the model with save_pretrained first")
    missing, unexpected = load_model(module, str(path), strict=strict)
    return list(missing), list(unexpected)


def is_saved_model(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is a folder written by :meth:`MultiTaskModel.save_pretrained`."""
    return (Path(path) / DESCRIPTION_NAME).is_file()


def head_spec_to_json(spec: HeadSpec) -> dict[str, Any]:
    """Return the JSON form of ``spec``; a callable loss is stored by its qualified name only."""
    data = spec.model_dump(mode="json", exclude_unset=True, exclude={"loss"})
    if isinstance(spec.loss, str):
        data["loss"] = spec.loss
    elif callable(spec.loss):
        data["custom_loss"] = f"{getattr(spec.loss, '__module__', '?')}.{getattr(spec.loss, '__qualname__', type(spec.loss).__name__)}"
    return data


def head_spec_from_json(task: str, data: Mapping[str, Any]) -> HeadSpec:
    """Rebuild a head spec from :func:`head_spec_to_json`; a custom loss falls back to the kind's default with a warning."""
    data = dict(data)
    custom_loss = data.pop("custom_loss", None)
    spec = HeadSpec.model_validate(data)
    if custom_loss is not None:
        logger.warning(
            "task %r was saved with the custom loss %s, which cannot be stored; it now uses %r. Pass heads={%r: HeadSpec(..., loss=...)} to restore it",
            task,
            custom_loss,
            spec.loss_name,
            task,
        )
    return spec


def write_description(directory: Path, description: Mapping[str, Any]) -> None:
    atomic_write_text(directory / DESCRIPTION_NAME, json.dumps(description, indent=2) + "\n")


def read_description(directory: Path) -> dict[str, Any]:
    path = directory / DESCRIPTION_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {directory} is not a folder written by MultiTaskModel.save_pretrained")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); save the model again with MultiTaskModel.save_pretrained") from None
    if not isinstance(description, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(description).__name__}")
    version = description.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}, but this multitune reads version {FORMAT_VERSION}; save it again with a matching version")
    return description
