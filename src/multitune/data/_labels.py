"""Label values: missing-value detection, label-name inference and the per-kind label encodings."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._errors import DataError
from ._tasks import TaskSpec, label_to_name

IGNORE_INDEX = -100
"""Label of an example or token that gets no loss (the ``ignore_index`` of ``torch.nn.CrossEntropyLoss``)."""

RowDescriber = Callable[[int], str]


def is_missing(value: Any) -> bool:
    """Return whether a cell is missing: ``None``, NaN, or a blank string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def parse_float(value: Any, *, task: str, field: str, describe: RowDescriber, row: int) -> float | None:
    """Return ``value`` as a finite float, or ``None`` when it is missing.

    Raises:
        DataError: the value is text that does not parse as a number, or it is infinite.
    """
    if is_missing(value):
        return None
    if isinstance(value, (bool, int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise DataError(
                f"task {task!r}: column {field!r} contains {value!r} in {describe(row)}, which does not parse as a "
                "number; fix the value or leave the cell empty to mark it missing"
            ) from None
    else:
        raise DataError(
            f"task {task!r}: column {field!r} contains a {type(value).__name__} ({value!r}) in {describe(row)}; "
            "expected a number"
        )
    if math.isnan(number):
        return None
    if math.isinf(number):
        raise DataError(f"task {task!r}: column {field!r} contains {value!r} in {describe(row)}; values must be finite")
    return number


def split_labels(value: Any, delimiter: str | None, *, task: str, field: str, describe: RowDescriber, row: int) -> list[Any]:
    """Return the labels of one multilabel cell (a list, or a string cut at ``delimiter``)."""
    if isinstance(value, str):
        if delimiter is None:
            raise DataError(
                f"task {task!r}: column {field!r} contains the string {value!r} in {describe(row)}, but "
                "label_delimiter is not set; set label_delimiter (for example '|') or use a list-valued column"
            )
        return [part.strip() for part in value.split(delimiter) if part.strip()]
    if isinstance(value, (list, tuple)):
        return [label for label in value if not is_missing(label)]
    raise DataError(
        f"task {task!r}: column {field!r} contains a {type(value).__name__} ({value!r}) in {describe(row)}; "
        "expected a list of labels or a delimited string"
    )


def split_tags(value: Any, delimiter: str | None, *, task: str, field: str, describe: RowDescriber, row: int) -> list[Any]:
    """Return the word-level tags of one token-classification cell (a list, or a string split on whitespace or ``delimiter``)."""
    if isinstance(value, str):
        return value.split(delimiter) if delimiter is not None else value.split()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise DataError(
        f"task {task!r}: column {field!r} contains a {type(value).__name__} ({value!r}) in {describe(row)}; "
        "expected a list of tags or a whitespace-separated string"
    )


def sort_label_names(names: Iterable[str]) -> list[str]:
    """Sort label names numerically when all of them are numbers (``2`` before ``10``), else as strings."""
    unique = set(names)
    try:
        return sorted(unique, key=float)
    except ValueError:
        return sorted(unique)


def class_label_names(feature: Any) -> list[str] | None:
    """Return the names of a ``datasets.ClassLabel`` feature, or of a list of ``ClassLabel``, else ``None``."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    return None


def value_to_name(value: Any, names_by_id: Sequence[str] | None) -> str | None:
    """Return the label name of one value, through ``ClassLabel`` names when the column has them; ``None`` when missing."""
    if is_missing(value):
        return None
    if names_by_id is not None and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:  # ClassLabel stores a missing label as -1.
            return None
        return names_by_id[value]
    return label_to_name(value)


def infer_label_names(spec: TaskSpec, columns: dict[str, list[Any]], class_names: list[str] | None, *, describe: RowDescriber) -> list[str]:
    """Infer the sorted label (or tag) names of a classification, multilabel or token-classification task from train.

    ``columns`` contains the label column(s) of the full training source. A column stored as
    ``datasets.ClassLabel`` keeps its own names in their order. Multilabel tasks with several
    label columns use the column names.
    """
    if spec.kind == "multilabel" and isinstance(spec.label_field, list):
        return list(spec.label_field)
    if class_names is not None:
        return class_names

    field = spec.target_fields[0]
    names: set[str] = set()
    for row, value in enumerate(columns[field]):
        if is_missing(value):
            continue
        if spec.kind == "classification":
            names.add(label_to_name(value))
        elif spec.kind == "multilabel":
            labels = split_labels(value, spec.label_delimiter, task=spec.name, field=field, describe=describe, row=row)
            names.update(label_to_name(label) for label in labels)
        else:
            tags = split_tags(value, spec.label_delimiter, task=spec.name, field=field, describe=describe, row=row)
            names.update(label_to_name(tag) for tag in tags if not is_missing(tag))
    if not names:
        raise DataError(
            f"task {spec.name!r}: no labels found in column {field!r} of the training data "
            "(every value is missing); check label_field"
        )
    return sort_label_names(names)


def unknown_label_error(task: str, label: str, where: str, label_names: Sequence[str], *, role: str) -> DataError:
    """Build the error for a label outside the task's label names."""
    listed = ", ".join(label_names[:20]) + (", ..." if len(label_names) > 20 else "")
    if role == "eval":
        return DataError(
            f"task {task!r}: label {label!r} in {where} does not occur in the training data (labels: {listed}); "
            "fix the evaluation data or list every label in the task's labels"
        )
    return DataError(
        f"task {task!r}: label {label!r} in {where} is not one of the task's labels ({listed}); add it to labels"
    )
