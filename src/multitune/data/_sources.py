"""Reading a task's data source into a :class:`datasets.Dataset`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._errors import DataError
from ._tasks import DatasetSource

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

SourceRole = Literal["train", "eval"]

# File extension -> (datasets builder, extra builder options).
_FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".tab": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".parquet": ("parquet", {}),
    ".pq": ("parquet", {}),
    ".arrow": ("arrow", {}),
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
_EVAL_SPLITS = ("validation", "valid", "dev", "test")


@dataclass(frozen=True)
class LoadedSource:
    """A source read into memory, with the description that error messages use for it."""

    dataset: datasets.Dataset
    description: str
    is_csv: bool = False


def read_source(source: Any, *, task: str, role: SourceRole) -> LoadedSource:
    """Read ``source`` (path, :class:`DatasetSource`, ``Dataset``, ``DatasetDict`` or row dicts) into a ``Dataset``.

    Files are read with the ``datasets`` builders ``csv`` (``.csv``, and ``.tsv`` or ``.tab`` with
    a tab separator), ``json`` (``.json``, ``.jsonl``, ``.ndjson``), ``parquet`` and ``arrow``.
    A compression suffix such as ``.gz`` may follow the extension. A folder path is passed to
    :func:`datasets.load_dataset` like a :class:`DatasetSource`.

    Raises:
        DataError: the file or folder does not exist, its format is unknown, loading fails, or a
            ``DatasetDict`` has no split for ``role``.
    """
    import datasets

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return _read_dataset_spec(DatasetSource(dataset=str(path)), task=task, role=role)
        return _read_file(path, task=task, role=role)
    if isinstance(source, DatasetSource):
        return _read_dataset_spec(source, task=task, role=role)
    if isinstance(source, datasets.DatasetDict):
        split = _pick_split(source, task=task, role=role, description="in-memory DatasetDict")
        return LoadedSource(source[split], f"in-memory DatasetDict (split {split!r})")
    if isinstance(source, datasets.Dataset):
        return LoadedSource(source, "in-memory Dataset")
    if isinstance(source, datasets.IterableDataset):
        raise DataError(
            f"task {task!r}: the {role} source is an IterableDataset; sizes and shuffling need a map-style "
            "Dataset, so load it without streaming=True"
        )
    if isinstance(source, Mapping):
        return _read_dataset_spec(DatasetSource.model_validate(dict(source)), task=task, role=role)
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError(f"task {task!r}: the {role} source is an empty list of rows")
        import pyarrow

        try:
            dataset = datasets.Dataset.from_list([dict(row) for row in source])
        except (pyarrow.ArrowException, TypeError, ValueError) as error:
            raise DataError(
                f"task {task!r}: the {role} rows do not convert to a table ({error}); give each column "
                "values of one type"
            ) from error
        return LoadedSource(dataset, "in-memory list of rows")
    raise DataError(f"task {task!r}: unsupported {role} source of type {type(source).__name__}")


def _read_file(path: Path, *, task: str, role: SourceRole) -> LoadedSource:
    import datasets

    if not path.exists():
        raise DataError(f"task {task!r}: {role} file '{path}' not found; check the path in the task's {role!r} field")
    builder, options = _builder_for(path, task=task, role=role)
    # NOTE: the csv builder parses with pandas defaults, so cells such as "NA", "null" or "n/a"
    # read as missing values, in text columns too.
    if path.stat().st_size == 0:
        raise DataError(f"task {task!r}: the {role} data '{path}' has no rows (the file is empty)")
    try:
        dataset = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **options)
    except (ValueError, OSError, TypeError, StopIteration, datasets.exceptions.DatasetsError) as error:
        # datasets 5.2 raises this ValueError for a file without data rows.
        if "corresponds to no data" in str(error):
            raise DataError(f"task {task!r}: the {role} data '{path}' has no rows") from error
        raise DataError(f"task {task!r}: could not read {role} file '{path}' as {builder}: {error}") from error
    logger.info("task %r: read %d %s rows from %s", task, len(dataset), role, path)
    return LoadedSource(dataset, f"'{path}'", is_csv=builder == "csv")


def _builder_for(path: Path, *, task: str, role: SourceRole) -> tuple[str, dict[str, Any]]:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    extension = suffixes[-1] if suffixes else ""
    if extension not in _FILE_BUILDERS:
        known = ", ".join(sorted(_FILE_BUILDERS))
        raise DataError(
            f"task {task!r}: {role} file '{path}' has the unknown extension {extension or '(none)'!r}; "
            f"use one of {known}, or a {{'dataset': ...}} source"
        )
    return _FILE_BUILDERS[extension]


def _read_dataset_spec(spec: DatasetSource, *, task: str, role: SourceRole) -> LoadedSource:
    import datasets

    description = _describe_spec(spec)
    try:
        loaded = datasets.load_dataset(
            spec.dataset,
            name=spec.config,
            split=spec.split,
            data_files=spec.data_files,
            data_dir=spec.data_dir,
            revision=spec.revision,
        )
    except FileNotFoundError as error:
        raise DataError(f"task {task!r}: {role} {description} not found: {error}") from error
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as error:
        raise DataError(f"task {task!r}: could not load {role} {description}: {error}") from error

    if isinstance(loaded, datasets.DatasetDict):
        split = _pick_split(loaded, task=task, role=role, description=description)
        loaded = loaded[split]
        description = _describe_spec(spec.model_copy(update={"split": split}))
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"task {task!r}: {role} {description} did not load as a Dataset (got {type(loaded).__name__})")
    logger.info("task %r: read %d %s rows from %s", task, len(loaded), role, description)
    return LoadedSource(loaded, description)


def _pick_split(splits: Mapping[str, Any], *, task: str, role: SourceRole, description: str) -> str:
    candidates = ("train",) if role == "train" else _EVAL_SPLITS
    for name in candidates:
        if name in splits:
            return name
    raise DataError(
        f"task {task!r}: {role} {description} has the splits {sorted(splits)} but none of {list(candidates)}; "
        "name the split with {'dataset': ..., 'split': ...}"
    )


def _describe_spec(spec: DatasetSource) -> str:
    details = [f"{key}={value!r}" for key, value in spec.model_dump(exclude={"dataset"}).items() if value is not None]
    suffix = f" ({', '.join(details)})" if details else ""
    return f"dataset {spec.dataset!r}{suffix}"
