"""The specification of one task: where its data lives, which columns it reads and what it predicts."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_serializer, field_validator, model_validator

TaskKind = Literal["classification", "multilabel", "regression", "token_classification"]
"""The four task kinds; each has its own label encoding and batch layout."""

TASK_KINDS: tuple[str, ...] = ("classification", "multilabel", "regression", "token_classification")


class DatasetSource(BaseModel):
    """A data set loaded with :func:`datasets.load_dataset`: a hub name, a local folder or a loading script.

    The fields are passed on as ``load_dataset(dataset, name=config, split=split, data_files=...,
    data_dir=..., revision=...)``. Without ``split``, a training source reads the ``train`` split
    and an evaluation source reads ``validation``, else ``test``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(min_length=1, description="Hub name, local folder or builder name such as 'csv'.")
    config: str | None = Field(default=None, description="Configuration name (load_dataset's `name`).")
    split: str | None = Field(default=None, description="Split to read, e.g. 'train' or 'train[:10%]'.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    data_dir: str | None = None
    revision: str | None = None


def _validate_source(value: Any) -> Any:
    """Accept a path, a :class:`DatasetSource` mapping, a ``datasets`` object or a sequence of row dicts."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not path.strip():
            raise ValueError("source path is empty; give a CSV, TSV, JSON Lines or Parquet file")
        return path
    if isinstance(value, DatasetSource) or _is_datasets_object(value):
        return value
    if isinstance(value, Mapping):
        if "dataset" not in value:
            raise ValueError(
                f"a source mapping needs the key 'dataset' (a hub name or local folder), got keys {sorted(value)}"
            )
        return DatasetSource.model_validate(dict(value))
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        rows = list(value)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"a source list must hold one dict per row; row {index} is a {type(row).__name__}")
        return rows
    raise ValueError(
        f"unsupported source of type {type(value).__name__}; give a file path, "
        "{'dataset': ..., 'split': ...}, a datasets.Dataset or DatasetDict, or a list of row dicts"
    )


def _is_datasets_object(value: Any) -> bool:
    # The check avoids importing `datasets` (about 1.5 s) when the value cannot be one of its objects.
    datasets_module = sys.modules.get("datasets")
    if datasets_module is None:
        return False
    return isinstance(value, (datasets_module.Dataset, datasets_module.DatasetDict))


Source = Annotated[Any, BeforeValidator(_validate_source)]
"""A file path, a :class:`DatasetSource`, a ``datasets.Dataset``/``DatasetDict`` or a list of row dicts."""


class TaskSpec(BaseModel):
    """One task of a multi-task run: its data sources, input and label columns and its encoding options.

    Exactly one of ``text_fields`` (tokenised by the run's tokenizer) and ``feature_fields``
    (numbers stacked into ``input_values``) gives the model input. Labels come from
    ``label_field``. An empty cell, ``None`` or NaN there marks the example's label as missing,
    and such examples get ``label_mask = False`` in their batch. They add no loss.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(min_length=1, description="Task name, unique in the run.")
    kind: TaskKind
    train: Source = Field(description="Training data source.")
    eval: Source = Field(default=None, description="Evaluation data source; None to hold out eval_fraction of train, or no evaluation.")
    eval_fraction: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="Fraction of train held out (seeded) as eval when eval is None."
    )
    text_fields: list[str] | None = Field(
        default=None, description="Text column(s); two columns are tokenised as a text pair."
    )
    feature_fields: list[str] | None = Field(
        default=None, description="Numeric column(s) stacked into input_values; a column may hold a list of floats."
    )
    label_field: str | list[str] = Field(
        default="label", description="Label column, or a list of columns (regression targets or multilabel 0/1 columns)."
    )
    labels: list[str] | None = Field(
        default=None, description="Fixed label list (class, label or tag names) in output order; inferred from train when unset."
    )
    label_delimiter: str | None = Field(
        default=None, description="Delimiter of multilabel or tag strings, e.g. '|'; None: the column contains lists."
    )
    max_length: int = Field(default=128, ge=2, description="Maximum number of tokens per example (longer inputs are truncated).")
    batch_size: int | None = Field(
        default=None, ge=1, description="Batch size of this task for 'all_tasks' mixing and homogeneous micro-batches."
    )
    standardize_targets: bool = Field(
        default=True, description="Regression: standardise targets with the training mean and standard deviation."
    )
    loss: dict[str, Any] | None = Field(default=None, description="Loss options, passed on to the model's task head.")
    weight: float | None = Field(default=None, ge=0.0, description="Static task weight, used by the 'weights' mixing strategy.")
    max_train_examples: int | None = Field(
        default=None, ge=1, description="Keep only the first N training rows after a seeded shuffle."
    )

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str) -> str:
        stripped = value.strip()
        if not stripped:
            raise ValueError("task name is blank")
        return stripped

    @field_validator("text_fields", "feature_fields", mode="before")
    @classmethod
    def _one_field_to_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_to_strings(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"labels must be a list of label names, got {value!r}")
        names = [label_to_name(label) for label in value]
        if not names:
            raise ValueError("labels is empty; give the label names or leave labels unset to infer them from train")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"labels has duplicates: {duplicates}")
        return names

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"weight must be a finite number >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> TaskSpec:
        has_text = bool(self.text_fields)
        has_features = bool(self.feature_fields)
        if has_text == has_features:
            found = "both" if has_text else "neither"
            raise ValueError(
                f"task {self.name!r}: set exactly one of text_fields and feature_fields, found {found}"
            )
        if has_text and len(self.text_fields) > 2:  # type: ignore[arg-type]
            raise ValueError(
                f"task {self.name!r}: text_fields takes one column or a pair of columns, got {self.text_fields}"
            )
        if self.kind == "token_classification":
            if not has_text or len(self.text_fields) != 1:  # type: ignore[arg-type]
                raise ValueError(
                    f"task {self.name!r}: token_classification needs one text field (a list of words or a "
                    f"whitespace-separated string), got text_fields={self.text_fields}"
                )
        if isinstance(self.label_field, list):
            if self.kind not in ("regression", "multilabel"):
                raise ValueError(
                    f"task {self.name!r}: label_field may list several columns only for regression or multilabel "
                    f"tasks, got {self.label_field} for kind {self.kind!r}"
                )
            if not self.label_field:
                raise ValueError(f"task {self.name!r}: label_field is an empty list")
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError(
                f"task {self.name!r}: eval and eval_fraction are both set; give an eval source or a fraction of train"
            )
        if self.labels is not None and self.kind == "regression":
            raise ValueError(f"task {self.name!r}: labels is not used by regression tasks; remove it")
        if self.label_delimiter is not None and self.kind not in ("multilabel", "token_classification"):
            raise ValueError(
                f"task {self.name!r}: label_delimiter applies to multilabel and token_classification tasks, not {self.kind!r}"
            )
        return self

    @field_serializer("train", "eval", when_used="json")
    def _serialize_source(self, source: Any) -> Any:
        # Paths, dataset specs and row dicts are JSON data already; a datasets object is not, so
        # it is written as a placeholder that names its type (it cannot be read back).
        if source is None or isinstance(source, (str, list)):
            return source
        if isinstance(source, DatasetSource):
            return source.model_dump(mode="json", exclude_none=True)
        return f"<in-memory {type(source).__name__}>"

    @property
    def target_fields(self) -> list[str]:
        """The label column(s) as a list."""
        return list(self.label_field) if isinstance(self.label_field, list) else [self.label_field]


def label_to_name(label: Any) -> str:
    """Return the string name of a label value; integral floats (``1.0`` from a CSV column with gaps) read as ``"1"``."""
    if isinstance(label, bool):
        return str(label).lower()
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label).strip()
