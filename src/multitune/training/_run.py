"""Finished runs: reloading a run folder's model and tasks, re-evaluating it and predicting on new files."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitune.config import Config, load_config
from multitune.data import DataError, TaskData, eval_batches, load_task
from multitune.data._sources import read_source
from multitune.models import MultiTaskModel
from multitune.training._build import build_mlp_backbone, build_model, load_run_tasks, load_tokenizer, select_device
from multitune.training._evaluation import TaskEvaluation, constant_baseline, evaluate_task
from multitune.training._results import json_safe
from multitune.training._trainer import CONFIG_FILE, MODEL_DIR

logger = logging.getLogger(__name__)

_READERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


@dataclass
class LoadedRun:
    """A finished run: its config, tokenizer, tasks (label names fixed by the saved model) and trained model."""

    run_dir: Path
    config: Config
    tokenizer: Any
    tasks: dict[str, TaskData]
    model: MultiTaskModel
    device: torch.device


def _saved_label_names(model_dir: Path) -> dict[str, list[str]]:
    # The saved model description lists each head's label names; reusing them keeps class ids stable.
    description = model_dir / "multitune_model.json"
    if not description.is_file():
        return {}
    heads = json.loads(description.read_text(encoding="utf-8")).get("heads", {})
    return {task: head["label_names"] for task, head in heads.items() if head.get("label_names")}


def load_run(run_dir: str | Path, *, load_data: bool = True) -> LoadedRun:
    """Rebuild a finished run from its folder: ``config.yaml`` and the trained weights in ``model/``.

    Args:
        run_dir: the run folder (``training.output_dir`` of the run).
        load_data: load and encode every task's data, as evaluation needs. ``False`` rebuilds the
            model from the files in ``model/`` alone (head specs, label names and target
            statistics are saved there), so the training data need not exist; ``tasks`` is then
            empty. The tokenizer saved in ``model/`` is used when there is one.

    Raises:
        FileNotFoundError: the folder has no ``config.yaml`` or no trained model (the run has not
            finished; resume it with ``multitune train CONFIG --resume``).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    model_dir = run_dir / MODEL_DIR
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: {CONFIG_FILE} not found; is this a multitune run folder?")
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir}: no trained model in {MODEL_DIR}/; the run has not finished (resume it with --resume)")

    config = load_config(config_path, [f"training.output_dir={run_dir}"])
    device = select_device(config.training.use_cpu)
    if not load_data:
        tokenizer = _saved_tokenizer(model_dir) or load_tokenizer(config.model)
        model = _load_saved_model(config, model_dir).to(device)
        return LoadedRun(run_dir=run_dir, config=config, tokenizer=tokenizer, tasks={}, model=model, device=device)

    tokenizer = load_tokenizer(config.model)
    label_names = _saved_label_names(model_dir)
    tasks = load_run_tasks(config, tokenizer, label_names=label_names)
    model = build_model(config, tasks)
    model.load_weights(model_dir)
    model.to(device)
    return LoadedRun(run_dir=run_dir, config=config, tokenizer=tokenizer, tasks=tasks, model=model, device=device)


def _saved_tokenizer(model_dir: Path) -> Any:
    """Return the tokenizer saved next to the model, or None when the folder has none."""
    if not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _load_saved_model(config: Config, model_dir: Path) -> MultiTaskModel:
    """Restore the trained model from ``model_dir`` without the tasks' data."""
    if config.model.type != "mlp":
        return MultiTaskModel.load(model_dir)

    # The MLP backbone is not a transformers model, so it is rebuilt from the config; its input
    # width is that of the saved first layer.
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        first = weights.get_slice("backbone.0.weight") if "backbone.0.weight" in weights.keys() else None
        saved_dim = first.get_shape()[1] if first is not None else None
    if saved_dim is not None and config.model.input_dim is not None and config.model.input_dim != saved_dim:
        raise ValueError(
            f"{model_dir}: model.input_dim is {config.model.input_dim} in the run's config.yaml, but the saved MLP reads "
            f"{saved_dim} values; remove model.input_dim or set it to {saved_dim}"
        )
    input_dim = saved_dim if saved_dim is not None else config.model.input_dim
    if input_dim is None:
        raise ValueError(f"{model_dir}: the MLP's input width is unknown (no backbone.0.weight saved); set model.input_dim")
    backbone = build_mlp_backbone(input_dim, config.model.hidden_sizes, config.model.dropout)
    return MultiTaskModel.load(model_dir, backbone=backbone)


def evaluate_run(run: LoadedRun) -> dict[str, tuple[TaskEvaluation, dict[str, float]]]:
    """Score every task with an eval split; return ``{task: (evaluation, constant baseline metrics)}``."""
    results = {}
    for name, task in run.tasks.items():
        if task.eval is None:
            continue
        evaluation = evaluate_task(run.model, task, batch_size=run.config.training.per_device_eval_batch_size, device=run.device)
        results[name] = (evaluation, constant_baseline(task))
    return results


def _read_rows(path: Path, task: str) -> Any:
    """Read a prediction input file with the data layer's reader (same formats and errors as training data)."""
    rows = read_source(path, task=task, role="eval").dataset
    if len(rows) == 0:
        raise DataError(f"{path}: the file has no rows to predict")
    return rows


def predict_rows(run: LoadedRun, task_name: str, path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield each row of ``path`` with the model's ``prediction`` for ``task_name`` added.

    Predictions are label names (classification), lists of label names (multilabel), numbers or
    lists of numbers in data units (regression), or one tag per word (token classification). The
    file needs the task's input columns. Its label column, when present, is kept in the output
    rows and not used. Works on a run loaded with ``load_data=False``.
    """
    if task_name not in run.config.tasks:
        raise KeyError(f"unknown task {task_name!r}; the run has tasks {list(run.config.tasks)}")
    spec = run.config.tasks[task_name]
    label_names = run.model.head_specs[task_name].label_names
    rows = _read_rows(Path(path), task_name)
    originals = rows.to_list()
    # The file's label columns, when present, go to the output rows unchanged but are never read:
    # a label value the run has not seen would otherwise fail to encode.
    rows = rows.remove_columns([field for field in spec.target_fields if field in rows.column_names])
    for field in spec.target_fields:
        rows = rows.add_column(field, [None] * len(rows))
    predict_spec = spec.model_copy(
        update={"train": rows, "eval": None, "eval_fraction": None, "max_train_examples": None, "standardize_targets": False}
    )
    task = load_task(predict_spec, run.tokenizer, label_names=label_names)
    _check_input_width(run.model, task, Path(path))

    run.model.eval()
    position = 0
    with torch.no_grad():
        for batch in eval_batches(task, run.config.training.per_device_eval_batch_size, split="train"):
            inputs = {key: value.to(run.device) for key, value in batch.items() if key not in ("labels", "label_mask", "target_mask")}
            outputs = run.model(inputs, task_name)
            predicted = run.model.predict(task_name, outputs.float()).cpu().numpy()
            for index, prediction in enumerate(predicted):
                row = dict(originals[position])
                row["prediction"] = _decode(task, prediction, batch, index, run.tokenizer, row)
                position += 1
                yield row


def _check_input_width(model: MultiTaskModel, task: TaskData, path: Path) -> None:
    """Raise a DataError when numeric inputs do not have the width of the model's first layer."""
    backbone = model.backbone
    first = backbone[0] if isinstance(backbone, torch.nn.Sequential) and len(backbone) > 0 else None
    if task.input_dim is None or not isinstance(first, torch.nn.Linear):
        return
    if task.input_dim != first.in_features:
        raise DataError(
            f"{path}: task {task.name!r} rows have {task.input_dim} input values, but the model reads {first.in_features}; "
            f"give each row the {first.in_features} values of the task's feature_fields"
        )


def _decode(task: TaskData, prediction: np.ndarray, batch: dict[str, torch.Tensor], index: int, tokenizer: Any, row: dict[str, Any]) -> Any:
    names = task.label_names or []
    if task.kind == "classification":
        return names[int(prediction)]
    if task.kind == "multilabel":
        return [names[i] for i, flag in enumerate(prediction.tolist()) if flag]
    if task.kind == "regression":
        values = [float(value) for value in np.atleast_1d(prediction)]
        return values[0] if len(values) == 1 else values
    # Token classification: the tag of each word's first sub-word token.
    words = row[task.spec.text_fields[0]]  # type: ignore[index]
    if isinstance(words, str):
        words = words.split()
    encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=task.spec.max_length)
    tags: list[str | None] = [None] * len(words)
    seen: set[int] = set()
    for position, word in enumerate(encoding.word_ids()):
        if word is None or word in seen or position >= len(prediction):
            continue
        seen.add(word)
        tags[word] = names[int(prediction[position])]
    return tags


def json_line(row: Mapping[str, Any]) -> str:
    """Return ``row`` as one line of strict JSON: NaN and infinite floats become null, NumPy values plain ones."""
    return json.dumps(json_safe(row), default=json_default, ensure_ascii=False, allow_nan=False)


def json_default(value: Any) -> Any:
    """Convert NumPy scalars and arrays for :func:`json.dumps`; NaN becomes null."""
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
