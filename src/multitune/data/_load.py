"""Loading tasks: sources to encoded training and evaluation splits, with label names and target statistics."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._collate import PaddingSide, TaskCollator, TaskTensors
from ._encoding import Encoder, encode_split
from ._errors import DataError
from ._labels import class_label_names, infer_label_names
from ._sources import LoadedSource, read_source
from ._tasks import TaskSpec

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class TaskData:
    """One loaded task: its encoded splits and what a model head needs to know about its outputs.

    Attributes:
        spec: the task specification.
        train: the encoded training split (columns described in :mod:`multitune.data._encoding`).
        eval: the encoded evaluation split, or ``None`` when the task has no evaluation data.
        label_names: class, label or tag names in output order; ``None`` for regression.
        num_outputs: number of classes (classification), labels (multilabel), targets
            (regression) or tags (token classification).
        collator: turns a list of encoded examples into a task batch.
        target_mean: regression only, per target, the mean of the training targets
            (``0.0`` when ``standardize_targets`` is off); a prediction in data units is
            ``output * target_std + target_mean``.
        target_std: regression only, per target, the population standard deviation of the
            training targets (``1.0`` when ``standardize_targets`` is off or a target is constant).
        input_dim: length of ``input_values`` for numeric tasks, else ``None``.
        pad_token_id: padding id of ``input_ids``.
        padding_side: ``"right"`` or ``"left"``, from the tokenizer.
    """

    spec: TaskSpec
    train: datasets.Dataset
    eval: datasets.Dataset | None
    label_names: list[str] | None
    num_outputs: int
    collator: TaskCollator
    target_mean: list[float] | None = None
    target_std: list[float] | None = None
    input_dim: int | None = None
    pad_token_id: int = 0
    padding_side: PaddingSide = "right"
    _tensors: dict[str, TaskTensors] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def split(self, split: str) -> datasets.Dataset:
        """Return the encoded ``"train"`` or ``"eval"`` split."""
        if split == "train":
            return self.train
        if split == "eval":
            if self.eval is None:
                raise DataError(f"task {self.name!r} has no evaluation data; set its eval source or eval_fraction")
            return self.eval
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")

    def tensors(self, split: str = "train") -> TaskTensors:
        """Return the split as :class:`TaskTensors`, built once and cached."""
        if split not in self._tensors:
            self._tensors[split] = TaskTensors.from_dataset(
                self.split(split), self.kind, pad_token_id=self.pad_token_id, padding_side=self.padding_side
            )
        return self._tensors[split]


def load_task(
    spec: TaskSpec | Mapping[str, Any],
    tokenizer: Any = None,
    *,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
) -> TaskData:
    """Read, split and encode one task.

    The steps, in order:

    1. Read the training (and evaluation) source and check its columns.
    2. Fix the label names: ``label_names`` if given, else ``spec.labels``, else the names of
       a ``ClassLabel`` column, else every label found in the full training source, sorted.
    3. Hold out ``eval_fraction`` of the training rows as evaluation data, then keep
       ``max_train_examples`` of the rest. Both selections come from one shuffle seeded with
       ``seed`` and keep the source order.
    4. Encode both splits.
    5. For regression, compute the training mean and standard deviation of each target and
       standardise the targets with them.

    Args:
        spec: the task, as a :class:`TaskSpec` or a mapping of its fields.
        tokenizer: a Hugging Face tokenizer (a fast one for token classification); required
            for text tasks.
        seed: seed of the hold-out and truncation shuffle.
        label_names: fixed label names in output order, for example from a checkpoint.

    Raises:
        DataError: a message names the task, the source and the field for each problem found.
    """
    if not isinstance(spec, TaskSpec):
        spec = TaskSpec.model_validate(spec)
    _check_tokenizer(spec, tokenizer)

    train_source = read_source(spec.train, task=spec.name, role="train")
    eval_source = read_source(spec.eval, task=spec.name, role="eval") if spec.eval is not None else None
    _check_source(spec, train_source, "train")
    if eval_source is not None:
        _check_source(spec, eval_source, "eval")

    names = _resolve_label_names(spec, train_source, label_names)
    train_rows, eval_rows = select_rows(len(train_source.dataset), spec, seed=seed)
    input_dim = _input_dim(spec, train_source, int(train_rows[0])) if spec.feature_fields else None

    def encode(source: LoadedSource, role: str, rows: np.ndarray | None) -> datasets.Dataset:
        dataset = source.dataset if rows is None else source.dataset.select(rows)
        encoder = Encoder(
            spec=spec,
            role=role,
            source=source.description,
            is_csv=source.is_csv,
            tokenizer=tokenizer,
            label_names=names,
            class_names={name: class_label_names(source.dataset.features.get(name)) for name in spec.target_fields},
            input_dim=input_dim,
            row_numbers=rows,
        )
        return encode_split(dataset, encoder)

    train = encode(train_source, "train", train_rows)
    if eval_source is not None:
        evaluation = encode(eval_source, "eval", None)
    elif eval_rows is not None:
        evaluation = encode(train_source, "eval", eval_rows)
    else:
        evaluation = None

    target_mean = target_std = None
    if spec.kind == "regression":
        target_mean, target_std = target_statistics(train, spec)
        train = standardize(train, target_mean, target_std)
        if evaluation is not None:
            evaluation = standardize(evaluation, target_mean, target_std)

    num_outputs = len(spec.target_fields) if spec.kind == "regression" else len(names or [])
    pad_token_id, padding_side = _padding(tokenizer) if spec.text_fields else (0, "right")
    logger.info(
        "task %r (%s): %d training and %s evaluation examples, %d output(s)",
        spec.name, spec.kind, len(train), len(evaluation) if evaluation is not None else "no", num_outputs,
    )
    return TaskData(
        spec=spec,
        train=train,
        eval=evaluation,
        label_names=names,
        num_outputs=num_outputs,
        collator=TaskCollator(spec.kind, pad_token_id=pad_token_id, padding_side=padding_side),
        target_mean=target_mean,
        target_std=target_std,
        input_dim=input_dim,
        pad_token_id=pad_token_id,
        padding_side=padding_side,
    )


def load_tasks(
    specs: Sequence[TaskSpec | Mapping[str, Any]],
    tokenizer: Any = None,
    seed: int = 0,
    *,
    label_names: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, TaskData]:
    """Load every task of ``specs`` with :func:`load_task`, keyed by task name in the given order.

    ``label_names`` optionally fixes the label names of some tasks, by task name.

    Raises:
        DataError: two tasks share a name, or a task fails to load.
    """
    validated = [spec if isinstance(spec, TaskSpec) else TaskSpec.model_validate(spec) for spec in specs]
    if not validated:
        raise DataError("no tasks given; a run needs at least one task")
    names = [spec.name for spec in validated]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"duplicate task names {duplicates}; every task needs a unique name")
    fixed = dict(label_names or {})
    unknown = sorted(set(fixed) - set(names))
    if unknown:
        raise DataError(f"label_names given for unknown task(s) {unknown}; tasks: {names}")
    return {spec.name: load_task(spec, tokenizer, seed=seed, label_names=fixed.get(spec.name)) for spec in validated}


# Row selection -----------------------------------------------------------------------------


def select_rows(num_rows: int, spec: TaskSpec, *, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the source rows of the training split and of the held-out evaluation split (or ``None``).

    One permutation seeded with ``seed`` is drawn when ``eval_fraction`` or ``max_train_examples``
    is set: its first ``max(1, round(eval_fraction * num_rows))`` rows are held out for
    evaluation and the first ``max_train_examples`` of the rest are kept for training. Both
    selections are returned sorted, so they keep the source order.
    """
    rows = np.arange(num_rows)
    if spec.eval_fraction is None and spec.max_train_examples is None:
        return rows, None

    permutation = np.random.default_rng(seed).permutation(num_rows)
    eval_rows = None
    if spec.eval_fraction is not None:
        num_eval = max(1, round(spec.eval_fraction * num_rows))
        if num_eval >= num_rows:
            raise DataError(
                f"task {spec.name!r}: eval_fraction={spec.eval_fraction} of {num_rows} training rows leaves no "
                "training rows; lower eval_fraction or give more data"
            )
        eval_rows = np.sort(permutation[:num_eval])
        permutation = permutation[num_eval:]
    if spec.max_train_examples is not None:
        permutation = permutation[: spec.max_train_examples]
    return np.sort(permutation), eval_rows


# Checks ------------------------------------------------------------------------------------


def _check_tokenizer(spec: TaskSpec, tokenizer: Any) -> None:
    if not spec.text_fields:
        return
    if tokenizer is None:
        raise DataError(
            f"task {spec.name!r}: text_fields {spec.text_fields} need a tokenizer; pass tokenizer= to load_task"
        )
    if spec.kind == "token_classification" and not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"task {spec.name!r}: token classification aligns tags with the word ids of a fast tokenizer, but "
            f"{type(tokenizer).__name__} is not fast; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def _check_source(spec: TaskSpec, source: LoadedSource, role: str) -> None:
    dataset = source.dataset
    if len(dataset) == 0:
        raise DataError(f"task {spec.name!r}: the {role} data {source.description} has no rows")
    inputs = spec.text_fields or spec.feature_fields or []
    for kind_of_field, fields in (("text_fields" if spec.text_fields else "feature_fields", inputs), ("label_field", spec.target_fields)):
        for name in fields:
            if name not in dataset.column_names:
                raise DataError(
                    f"task {spec.name!r}: column {name!r} not found in the {role} data {source.description} "
                    f"(columns: {', '.join(dataset.column_names)}); set {kind_of_field} to existing columns"
                )


def _resolve_label_names(spec: TaskSpec, source: LoadedSource, label_names: Sequence[str] | None) -> list[str] | None:
    if spec.kind == "regression":
        return None
    multilabel_columns = spec.kind == "multilabel" and isinstance(spec.label_field, list)
    fixed = list(label_names) if label_names is not None else spec.labels
    if fixed is not None:
        names = [str(name) for name in fixed]
        if multilabel_columns and names != spec.target_fields:
            raise DataError(
                f"task {spec.name!r}: the label names {names} differ from the label columns {spec.target_fields}; "
                "with several label columns the labels are the column names"
            )
        return names

    field_name = spec.target_fields[0]
    columns = {} if multilabel_columns else {field_name: source.dataset[field_name]}
    class_names = None if multilabel_columns else class_label_names(source.dataset.features.get(field_name))

    def describe(row: int) -> str:
        return f"row {row + 1} of the train data {source.description}"

    return infer_label_names(spec, columns, class_names, describe=describe)


def _input_dim(spec: TaskSpec, source: LoadedSource, row: int) -> int:
    example = source.dataset[row]
    size = 0
    for name in spec.feature_fields or []:
        value = example[name]
        size += len(value) if isinstance(value, (list, tuple)) else 1
    if size == 0:
        raise DataError(f"task {spec.name!r}: the feature columns {spec.feature_fields} hold no values in row {row + 1}")
    return size


def _padding(tokenizer: Any) -> tuple[int, PaddingSide]:
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has no padding token; set tokenizer.pad_token "
            "(for example to tokenizer.eos_token) before loading tasks"
        )
    side = getattr(tokenizer, "padding_side", "right")
    return int(pad_token_id), "left" if side == "left" else "right"


# Regression targets ------------------------------------------------------------------------


def target_statistics(train: datasets.Dataset, spec: TaskSpec) -> tuple[list[float], list[float]]:
    """Return the per-target mean and population standard deviation of the present training targets.

    With ``standardize_targets`` off, the mean is 0 and the standard deviation 1, so that
    standardising changes nothing. A constant target gets a standard deviation of 1.

    Raises:
        DataError: a target has no value in the training data.
    """
    fields = spec.target_fields
    if not spec.standardize_targets:
        return [0.0] * len(fields), [1.0] * len(fields)

    table = train.with_format("arrow")[:]
    labels = _list_column(table, "labels").astype(np.float64).reshape(len(train), len(fields))
    present = _list_column(table, "target_mask").astype(bool).reshape(len(train), len(fields))
    means, stds = [], []
    for column, name in enumerate(fields):
        values = labels[present[:, column], column]
        if values.size == 0:
            raise DataError(
                f"task {spec.name!r}: regression target {name!r} has no value in the training data; "
                "check label_field"
            )
        mean, std = float(values.mean()), float(values.std())
        if std == 0.0:
            logger.warning("task %r: target %r is constant (%s) in the training data; it is centred but not scaled", spec.name, name, mean)
            std = 1.0
        means.append(mean)
        stds.append(std)
    return means, stds


def _list_column(table: Any, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class _Standardizer:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        labels = np.asarray(batch["labels"], dtype=np.float64)
        present = np.asarray(batch["target_mask"], dtype=bool)
        scaled = (labels - np.asarray(self.mean)) / np.asarray(self.std)
        return {"labels": np.where(present, scaled, 0.0).astype(np.float32).tolist()}


def standardize(dataset: datasets.Dataset, mean: Sequence[float], std: Sequence[float]) -> datasets.Dataset:
    """Replace the present targets ``y`` with ``(y - mean) / std``; missing targets stay 0."""
    if all(m == 0.0 for m in mean) and all(s == 1.0 for s in std):
        return dataset
    return dataset.map(
        _Standardizer(tuple(mean), tuple(std)),
        batched=True,
        features=dataset.features,
        desc="Standardising regression targets",
    )
