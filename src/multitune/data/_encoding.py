"""Encoding raw rows into model columns: tokenised text or numeric features, labels and label masks.

Encoding runs once per example through :meth:`datasets.Dataset.map`, so it is cached by
``datasets`` and never repeated per epoch. The encoded columns are

- ``input_ids`` (and ``token_type_ids`` when the tokenizer returns them), unpadded, for text
  tasks, or ``input_values`` (float32, one vector per example) for numeric tasks;
- ``labels``: a class index (``-100`` when missing) for classification, a multi-hot float
  vector for multilabel, and a float vector of targets for regression. Token classification
  gets one tag index per sub-word token, with ``-100`` on special tokens, on every sub-word
  after the first of a word and on words without a tag;
- ``label_mask``: ``False`` when the example's label is missing;
- ``target_mask`` (regression only): ``True`` for each target present in the row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import DataError, describe_row
from ._labels import (
    IGNORE_INDEX,
    is_missing,
    parse_float,
    split_labels,
    split_tags,
    unknown_label_error,
    value_to_name,
)
from ._tasks import TaskSpec

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

ENCODE_BATCH_SIZE = 1000


@dataclass
class Encoder:
    """The :meth:`datasets.Dataset.map` function that encodes one split of one task.

    Attributes:
        spec: the task.
        role: ``"train"`` or ``"eval"``, for messages.
        source: description of the source, for messages.
        is_csv: whether ``source`` is a CSV/TSV file (messages then give the file line).
        tokenizer: a Hugging Face tokenizer for text tasks, else ``None``.
        label_names: class, label or tag names in output order (``None`` for regression).
        class_names: per label column, the names of its ``ClassLabel`` feature, if any.
        input_dim: length of ``input_values`` for numeric tasks.
        row_numbers: source row of each dataset row, when the dataset is a selection of the source.
    """

    spec: TaskSpec
    role: str
    source: str
    is_csv: bool
    tokenizer: Any = None
    label_names: list[str] | None = None
    class_names: dict[str, list[str] | None] = field(default_factory=dict)
    input_dim: int | None = None
    row_numbers: np.ndarray | None = None
    missing_texts: int = 0

    def __post_init__(self) -> None:
        self._label_index = {name: i for i, name in enumerate(self.label_names or [])}

    # map() entry point ---------------------------------------------------------------------

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [int(self.row_numbers[i]) for i in indices] if self.row_numbers is not None else list(indices)
        if self.spec.kind == "token_classification":
            return self._encode_tokens(batch, rows)

        output: dict[str, list[Any]] = {}
        if self.spec.text_fields:
            output.update(self._encode_text(batch, rows))
        else:
            output["input_values"] = self._encode_features(batch, rows)

        if self.spec.kind == "classification":
            output.update(self._encode_classes(batch, rows))
        elif self.spec.kind == "multilabel":
            output.update(self._encode_multilabel(batch, rows))
        else:
            output.update(self._encode_targets(batch, rows))
        return output

    def describe(self, row: int) -> str:
        return describe_row(row, f"the {self.role} data {self.source}", is_csv=self.is_csv)

    # Inputs --------------------------------------------------------------------------------

    def _texts(self, batch: dict[str, list[Any]], field_name: str) -> list[str]:
        texts = []
        missing = 0
        for value in batch[field_name]:
            if is_missing(value):
                missing += 1
                texts.append("")
            else:
                texts.append(value if isinstance(value, str) else str(value))
        self.missing_texts += missing
        return texts

    def _encode_text(self, batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
        fields = self.spec.text_fields or []
        first = self._texts(batch, fields[0])
        second = self._texts(batch, fields[1]) if len(fields) == 2 else None
        encoding = self.tokenizer(
            first, second, truncation=True, max_length=self.spec.max_length, return_attention_mask=False
        )
        output = {"input_ids": encoding["input_ids"]}
        if "token_type_ids" in encoding:
            output["token_type_ids"] = encoding["token_type_ids"]
        return output

    def _encode_features(self, batch: dict[str, list[Any]], rows: list[int]) -> list[list[float]]:
        fields = self.spec.feature_fields or []
        vectors = []
        for position, row in enumerate(rows):
            vector: list[float] = []
            for field_name in fields:
                vector.extend(self._feature_values(batch[field_name][position], field_name, row))
            if len(vector) != self.input_dim:
                raise DataError(
                    f"task {self.spec.name!r}: the feature columns {fields} give {len(vector)} values in "
                    f"{self.describe(row)}, but {self.input_dim} in the first training row; every row needs "
                    "the same number of features"
                )
            vectors.append(vector)
        return vectors

    def _feature_values(self, value: Any, field_name: str, row: int) -> list[float]:
        values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
        parsed = []
        for item in values:
            number = parse_float(item, task=self.spec.name, field=field_name, describe=self.describe, row=row)
            if number is None:
                raise DataError(
                    f"task {self.spec.name!r}: feature column {field_name!r} is missing a value in "
                    f"{self.describe(row)}; fill it in or drop the row, because models cannot take missing inputs"
                )
            parsed.append(number)
        return parsed

    # Labels --------------------------------------------------------------------------------

    def _label_id(self, name: str, row: int) -> int:
        try:
            return self._label_index[name]
        except KeyError:
            raise unknown_label_error(
                self.spec.name, name, self.describe(row), self.label_names or [], role=self.role
            ) from None

    def _encode_classes(self, batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
        field_name = self.spec.target_fields[0]
        names_by_id = self.class_names.get(field_name)
        labels, mask = [], []
        for value, row in zip(batch[field_name], rows):
            name = value_to_name(value, names_by_id)
            labels.append(IGNORE_INDEX if name is None else self._label_id(name, row))
            mask.append(name is not None)
        return {"labels": labels, "label_mask": mask}

    def _encode_multilabel(self, batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
        if isinstance(self.spec.label_field, list):
            return self._encode_multilabel_columns(batch, rows)

        field_name = self.spec.label_field
        names_by_id = self.class_names.get(field_name)
        size = len(self.label_names or [])
        labels, mask = [], []
        for value, row in zip(batch[field_name], rows):
            vector = [0.0] * size
            if is_missing(value):
                labels.append(vector)
                mask.append(False)
                continue
            parts = split_labels(
                value, self.spec.label_delimiter, task=self.spec.name, field=field_name, describe=self.describe, row=row
            )
            for part in parts:
                name = value_to_name(part, names_by_id)
                if name is not None:
                    vector[self._label_id(name, row)] = 1.0
            labels.append(vector)
            mask.append(True)
        return {"labels": labels, "label_mask": mask}

    def _encode_multilabel_columns(self, batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
        fields = self.spec.target_fields
        labels, mask = [], []
        for position, row in enumerate(rows):
            vector: list[float] = []
            complete = True
            for field_name in fields:
                flag = _parse_flag(batch[field_name][position], task=self.spec.name, field=field_name, where=self.describe(row))
                complete = complete and flag is not None
                vector.append(flag or 0.0)
            labels.append(vector if complete else [0.0] * len(fields))
            mask.append(complete)
        return {"labels": labels, "label_mask": mask}

    def _encode_targets(self, batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
        fields = self.spec.target_fields
        labels, target_mask, mask = [], [], []
        for position, row in enumerate(rows):
            values = [
                parse_float(batch[name][position], task=self.spec.name, field=name, describe=self.describe, row=row)
                for name in fields
            ]
            present = [value is not None for value in values]
            labels.append([0.0 if value is None else value for value in values])
            target_mask.append(present)
            mask.append(any(present))
        return {"labels": labels, "target_mask": target_mask, "label_mask": mask}

    # Token classification ------------------------------------------------------------------

    def _encode_tokens(self, batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
        text_field = (self.spec.text_fields or [])[0]
        tag_field = self.spec.target_fields[0]
        names_by_id = self.class_names.get(tag_field)

        words_batch = [self._words(value) for value in batch[text_field]]
        encoding = self.tokenizer(
            words_batch,
            is_split_into_words=True,
            truncation=True,
            max_length=self.spec.max_length,
            return_attention_mask=False,
        )

        output: dict[str, list[Any]] = {"input_ids": encoding["input_ids"], "labels": [], "label_mask": []}
        if "token_type_ids" in encoding:
            output["token_type_ids"] = encoding["token_type_ids"]
        for position, (words, value, row) in enumerate(zip(words_batch, batch[tag_field], rows)):
            word_ids = encoding.word_ids(position)
            if is_missing(value):
                output["labels"].append([IGNORE_INDEX] * len(word_ids))
                output["label_mask"].append(False)
                continue
            tags = split_tags(
                value, self.spec.label_delimiter, task=self.spec.name, field=tag_field, describe=self.describe, row=row
            )
            if len(tags) != len(words):
                raise DataError(
                    f"task {self.spec.name!r}: {self.describe(row)} has {len(words)} words in column {text_field!r} "
                    f"but {len(tags)} tags in column {tag_field!r}; give one tag per word"
                )
            tag_ids = []
            for tag in tags:
                name = value_to_name(tag, names_by_id)
                tag_ids.append(IGNORE_INDEX if name is None else self._label_id(name, row))
            output["labels"].append(align_word_labels(word_ids, tag_ids))
            output["label_mask"].append(True)
        return output

    def _words(self, value: Any) -> list[str]:
        if is_missing(value):
            self.missing_texts += 1
            return []
        if isinstance(value, str):
            return value.split()
        return [str(word) for word in value]

    # Output schema -------------------------------------------------------------------------

    def features(self, with_token_type_ids: bool) -> datasets.Features:
        """Return the Arrow schema of the encoded columns."""
        import datasets

        columns: dict[str, Any] = {}
        if self.spec.text_fields:
            columns["input_ids"] = datasets.List(datasets.Value("int32"))
            if with_token_type_ids:
                columns["token_type_ids"] = datasets.List(datasets.Value("int8"))
        else:
            columns["input_values"] = datasets.List(datasets.Value("float32"))

        if self.spec.kind in ("classification",):
            columns["labels"] = datasets.Value("int64")
        elif self.spec.kind == "token_classification":
            columns["labels"] = datasets.List(datasets.Value("int32"))
        else:
            columns["labels"] = datasets.List(datasets.Value("float32"))
        if self.spec.kind == "regression":
            columns["target_mask"] = datasets.List(datasets.Value("bool"))
        columns["label_mask"] = datasets.Value("bool")
        return datasets.Features(columns)


def align_word_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Give each sub-word token its word's label on the first sub-word and ``-100`` elsewhere.

    ``word_ids`` is the fast tokenizer's map from token to word index (``None`` for special tokens).
    """
    aligned = []
    previous = None
    for word_id in word_ids:
        if word_id is None or word_id == previous:
            aligned.append(IGNORE_INDEX)
        else:
            aligned.append(word_labels[word_id])
        previous = word_id
    return aligned


def _parse_flag(value: Any, *, task: str, field: str, where: str) -> float | None:
    if is_missing(value):
        return None
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "1.0", "true", "yes"):
            return 1.0
        if lowered in ("0", "0.0", "false", "no"):
            return 0.0
    elif isinstance(value, (bool, int, float)) and float(value) in (0.0, 1.0):
        return float(value)
    raise DataError(
        f"task {task!r}: multilabel column {field!r} contains {value!r} in {where}; expected 0 or 1 (or true/false)"
    )


def encode_split(
    dataset: datasets.Dataset,
    encoder: Encoder,
) -> datasets.Dataset:
    """Encode every row of ``dataset`` with ``encoder`` (one cached :meth:`~datasets.Dataset.map` pass)."""
    with_token_type_ids = False
    if encoder.spec.text_fields:
        with_token_type_ids = "token_type_ids" in encoder.tokenizer("a", return_attention_mask=False)
    encoded = dataset.map(
        encoder,
        batched=True,
        batch_size=ENCODE_BATCH_SIZE,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=encoder.features(with_token_type_ids),
        new_fingerprint=encoding_fingerprint(dataset, encoder),
        desc=f"Encoding task {encoder.spec.name!r} ({encoder.role})",
    )
    if encoder.missing_texts:
        logger.warning(
            "task %r: %d empty or missing text value(s) in the %s data %s are encoded as empty text",
            encoder.spec.name, encoder.missing_texts, encoder.role, encoder.source,
        )
    return encoded


ENCODING_VERSION = 1
"""Version of the encoded columns; part of the cache fingerprint, so a change of encoding invalidates old caches."""


def encoding_fingerprint(dataset: datasets.Dataset, encoder: Encoder) -> str | None:
    """Return the ``datasets`` cache fingerprint of encoding ``dataset`` with ``encoder``.

    ``datasets`` would otherwise hash the encoder by pickling the whole tokenizer (about 0.3 s per
    split for MiniLM). A fast tokenizer is identified here by the SHA-256 of its serialised
    ``tokenizers`` JSON instead. Slow tokenizers return ``None``, which lets ``datasets`` hash
    the encoder itself.
    """
    import hashlib

    from datasets.fingerprint import Hasher

    tokenizer_digest = None
    if encoder.tokenizer is not None:
        backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        tokenizer_digest = (
            type(encoder.tokenizer).__name__,
            hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest(),
            getattr(encoder.tokenizer, "truncation_side", "right"),
        )
    spec = encoder.spec
    key = (
        ENCODING_VERSION,
        dataset._fingerprint,
        spec.kind,
        spec.text_fields,
        spec.feature_fields,
        spec.label_field,
        spec.label_delimiter,
        spec.max_length,
        encoder.role,
        encoder.source,
        encoder.is_csv,
        encoder.label_names,
        encoder.class_names,
        encoder.input_dim,
        encoder.row_numbers,
        tokenizer_digest,
    )
    return Hasher.hash(key)
