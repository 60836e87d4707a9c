"""Collation: encoded examples to one padded task batch.

A task batch follows the batch convention of multitune: ``input_ids``, ``attention_mask`` and,
when the tokenizer makes them, ``token_type_ids`` (long ``[B, L]``, padded to the longest
example of the batch) for text, or ``input_values`` (float32 ``[B, D]``) for numeric inputs;
``labels`` (long ``[B]`` for classification, float32 ``[B, C]`` multi-hot for multilabel,
float32 ``[B, K]`` for regression, long ``[B, L]`` for token classification, where ``-100``
marks a missing or ignored label); ``label_mask`` (bool ``[B]``); and for regression
``target_mask`` (bool ``[B, K]``, ``False`` for a missing target, whose ``labels`` entry is 0).

:class:`TaskTensors` holds a whole encoded split as tensors (token sequences packed end to end
with their offsets), so a batch costs a few index operations however large the split is.
:class:`TaskCollator` applies the same code to a list of examples, for use as the
``collate_fn`` of a :class:`torch.utils.data.DataLoader`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import torch
from torch import Tensor

from ._labels import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets

PaddingSide = Literal["right", "left"]
ArrayLike = Union[np.ndarray, Tensor]

# Columns with one value per token, padded at batch time, and their padding values (None: the pad token id).
_TOKEN_COLUMNS: dict[str, int | None] = {"input_ids": None, "token_type_ids": 0, "labels": IGNORE_INDEX}
_FLOAT_COLUMNS = ("input_values",)


class TaskTensors:
    """One encoded split of one task, held as arrays for fast batching.

    The columns are NumPy arrays: a NumPy index operation on a few rows costs about a
    microsecond, several times less than the dispatch of a PyTorch operation, and the batch
    becomes tensors once at the end without a copy (``torch.from_numpy``).

    Args:
        kind: the task kind; it fixes the dtype of ``labels``.
        columns: encoded columns by name. Token columns (``input_ids``, ``token_type_ids`` and
            the ``labels`` of token classification) are ``(values, offsets)`` pairs, where row
            ``i`` is ``values[offsets[i]:offsets[i + 1]]``; the other columns are arrays or
            tensors with one row per example.
        pad_token_id: the tokenizer's padding id for ``input_ids``.
        padding_side: ``"right"`` (default) or ``"left"``, as the tokenizer's ``padding_side``.
    """

    def __init__(
        self,
        kind: str,
        columns: Mapping[str, ArrayLike | tuple[ArrayLike, ArrayLike]],
        *,
        pad_token_id: int = 0,
        padding_side: PaddingSide = "right",
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.kind = kind
        self.pad_token_id = int(pad_token_id)
        self.padding_side: PaddingSide = padding_side
        self._packed: dict[str, np.ndarray] = {}
        self._dense: dict[str, np.ndarray] = {}
        self._starts: np.ndarray | None = None
        self._lengths: np.ndarray | None = None
        self._positions = np.arange(0)
        self.num_rows = -1

        for name, column in columns.items():
            if isinstance(column, tuple):
                self._add_packed(name, _as_array(column[0]), _as_array(column[1]))
            else:
                self._add_dense(name, _as_array(column))
        if self.num_rows < 0:
            raise ValueError("TaskTensors needs at least one column")

    def _add_packed(self, name: str, values: np.ndarray, offsets: np.ndarray) -> None:
        offsets = offsets.astype(np.int64)
        starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]
        if self._lengths is None:
            self._starts, self._lengths = starts, lengths
            self._positions = np.arange(int(lengths.max()) if len(lengths) else 0)
        elif not np.array_equal(lengths, self._lengths) or not np.array_equal(starts, self._starts):
            raise ValueError(f"token column {name!r} is not aligned with the other token columns")
        # int32 halves the memory of int64 ids; batches are widened to int64 (torch.long) at the end.
        self._packed[name] = values.astype(np.int32)
        self._set_num_rows(name, len(lengths))

    def _add_dense(self, name: str, column: np.ndarray) -> None:
        self._dense[name] = column
        self._set_num_rows(name, column.shape[0])

    def _set_num_rows(self, name: str, rows: int) -> None:
        if self.num_rows >= 0 and rows != self.num_rows:
            raise ValueError(f"column {name!r} has {rows} rows, the others {self.num_rows}")
        self.num_rows = rows

    def __len__(self) -> int:
        return self.num_rows

    @property
    def columns(self) -> list[str]:
        return [*self._packed, *self._dense]

    # Construction --------------------------------------------------------------------------

    @classmethod
    def from_dataset(
        cls, dataset: datasets.Dataset, kind: str, *, pad_token_id: int = 0, padding_side: PaddingSide = "right"
    ) -> TaskTensors:
        """Read the encoded columns of ``dataset`` through Arrow, without a per-row Python loop."""
        table = dataset.with_format("arrow")[:]
        columns: dict[str, ArrayLike | tuple[ArrayLike, ArrayLike]] = {}
        for name in table.column_names:
            array = table.column(name).combine_chunks()
            if _is_token_column(name, kind):
                offsets = np.asarray(array.offsets.to_numpy(), dtype=np.int64)
                values = array.flatten().to_numpy(zero_copy_only=False)
                columns[name] = (values, offsets - offsets[0])
            elif hasattr(array, "flatten") and hasattr(array, "offsets"):
                flat = array.flatten().to_numpy(zero_copy_only=False)
                columns[name] = _dense_array(name, kind, flat.reshape(len(array), -1) if len(array) else flat.reshape(0, 0))
            else:
                columns[name] = _dense_array(name, kind, array.to_numpy(zero_copy_only=False))
        return cls(kind, columns, pad_token_id=pad_token_id, padding_side=padding_side)

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[Mapping[str, Any]],
        kind: str,
        *,
        pad_token_id: int = 0,
        padding_side: PaddingSide = "right",
    ) -> TaskTensors:
        """Build from a list of encoded examples (dicts of Python values or tensors); unknown keys are ignored."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        columns: dict[str, ArrayLike | tuple[ArrayLike, ArrayLike]] = {}
        for name in examples[0]:
            if name not in _KNOWN_COLUMNS:
                continue
            values = [_to_python(example[name]) for example in examples]
            if _is_token_column(name, kind):
                lengths = np.array([len(row) for row in values], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                flat = np.fromiter(chain.from_iterable(values), dtype=np.int64, count=int(offsets[-1]))
                columns[name] = (flat, offsets)
            else:
                columns[name] = _dense_array(name, kind, np.asarray(values))
        return cls(kind, columns, pad_token_id=pad_token_id, padding_side=padding_side)

    # Batching ------------------------------------------------------------------------------

    def batch(self, indices: Sequence[int] | np.ndarray | Tensor) -> dict[str, Tensor]:
        """Return the padded batch of the examples at ``indices``, in that order."""
        index = indices.numpy() if isinstance(indices, Tensor) else np.asarray(indices, dtype=np.int64)
        if index.ndim != 1 or index.size == 0:
            raise ValueError(f"batch indices must be a non-empty 1-D sequence, got shape {tuple(index.shape)}")

        batch: dict[str, Tensor] = {}
        if self._packed:
            batch.update(self._gather_tokens(index))
        for name, column in self._dense.items():
            batch[name] = torch.from_numpy(column[index])
        return batch

    def _gather_tokens(self, index: np.ndarray) -> dict[str, Tensor]:
        assert self._lengths is not None and self._starts is not None
        lengths = self._lengths[index]
        width = int(lengths.max())
        positions = self._positions[:width]
        if self.padding_side == "right":
            valid = positions < lengths[:, None]
            source = self._starts[index][:, None] + positions
        else:
            padding = (width - lengths)[:, None]
            valid = positions >= padding
            source = self._starts[index][:, None] + positions - padding
        invalid = ~valid
        source[invalid] = 0

        batch = {}
        for name, values in self._packed.items():
            pad_value = _TOKEN_COLUMNS[name]
            gathered = values[source].astype(np.int64)
            gathered[invalid] = self.pad_token_id if pad_value is None else pad_value
            batch[name] = torch.from_numpy(gathered)
        batch["attention_mask"] = torch.from_numpy(valid.astype(np.int64))
        return batch


class TaskCollator:
    """Collate a list of encoded examples of one task into a padded batch; usable as a ``collate_fn``.

    Args:
        kind: the task kind.
        pad_token_id: padding id of ``input_ids`` (the tokenizer's ``pad_token_id``).
        padding_side: ``"right"`` or ``"left"``.
    """

    def __init__(self, kind: str, *, pad_token_id: int = 0, padding_side: PaddingSide = "right") -> None:
        self.kind = kind
        self.pad_token_id = pad_token_id
        self.padding_side: PaddingSide = padding_side

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        tensors = TaskTensors.from_examples(
            examples, self.kind, pad_token_id=self.pad_token_id, padding_side=self.padding_side
        )
        return tensors.batch(np.arange(len(examples)))

    def __repr__(self) -> str:
        return f"TaskCollator(kind={self.kind!r}, pad_token_id={self.pad_token_id}, padding_side={self.padding_side!r})"


_KNOWN_COLUMNS = frozenset({"input_ids", "token_type_ids", "input_values", "labels", "label_mask", "target_mask"})


def _is_token_column(name: str, kind: str) -> bool:
    if name == "labels":
        return kind == "token_classification"
    return name in _TOKEN_COLUMNS


def _dense_array(name: str, kind: str, values: np.ndarray) -> np.ndarray:
    # np.array copies, so no array shares a read-only Arrow buffer (torch.from_numpy warns on those).
    if name in ("label_mask", "target_mask"):
        return np.array(values, dtype=np.bool_)
    if name in _FLOAT_COLUMNS or (name == "labels" and kind in ("multilabel", "regression")):
        return np.array(values, dtype=np.float32)
    return np.array(values, dtype=np.int64)


def _as_array(values: ArrayLike) -> np.ndarray:
    return values.numpy() if isinstance(values, Tensor) else np.asarray(values)


def _to_python(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    return value
