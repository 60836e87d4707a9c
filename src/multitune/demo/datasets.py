"""Real datasets for the built-in demo, built offline from files that pip packages ship.

The five text tasks of the default demo, all read by one shared all-MiniLM-L6-v2 encoder:

========================  ==============  ==============================================  =========
task                      kind            source package                                  rows
========================  ==============  ==============================================  =========
``icd10_chapter``         classification  simple-icd-10-cm (diagnosis -> chapter, 22)     46,144
``chat_topic``            classification  chatterbot-corpus (utterance -> topic, 21)      5,697
``word_valence``          regression      vaderSentiment lexicon (word -> valence)        500 + 300
``name_gender``           classification  faker first names (name -> female/male)         18,912
``name_language``         multilabel      faker first names (name -> languages, 12)       17,388
========================  ==============  ==============================================  =========

MultiDigits (:func:`build_multidigits`) is a numeric-feature dataset with four tasks on pairs of
scikit-learn's 8x8 digit images. The row counts above (train + eval) were measured with
simple-icd-10-cm 1.5.0, chatterbot-corpus 1.3.3, vaderSentiment 3.3.2 and Faker 40.63.0.

Every dataset is written as ``<output_dir>/<dataset>/train.jsonl`` and ``eval.jsonl`` (one JSON
object per line) next to a ``manifest.json`` that records the seed, the format version and the
source package versions. All draws use a generator seeded from the seed and the dataset name, so
the same seed and package versions give the same files.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._chatterbot import CHAT_DATASET, CHAT_DISTRIBUTION, CHAT_LANGUAGES, chat_topic_rows
from ._faker_names import (
    FAKER_DISTRIBUTION,
    GENDER_DATASET,
    LANGUAGE_DATASET,
    latin_first_names,
    name_gender_rows,
    name_language_rows,
)
from ._icd10 import ICD10_DATASET, ICD10_DISTRIBUTION, icd10_chapter_rows
from ._io import SplitRows, build_split_files, read_jsonl
from ._multidigits import (
    MULTIDIGITS_DATASET,
    NUM_FEATURES,
    SKLEARN_DISTRIBUTION,
    load_digit_images,
    multidigits_rows,
)
from ._packages import INSTALL_HINT, distribution_version
from ._split import text_key
from ._vader import VALENCE_DATASET, VALENCE_DISTRIBUTION, word_valence_rows

__all__ = [
    "CHAT_LANGUAGES",
    "DEMO_TASKS",
    "FORMAT_VERSION",
    "INSTALL_HINT",
    "MULTIDIGITS_TASKS",
    "DemoTask",
    "build_demo_data",
    "build_multidigits",
    "chat_topic_rows",
    "icd10_chapter_rows",
    "latin_first_names",
    "load_digit_images",
    "multidigits_rows",
    "name_gender_rows",
    "name_language_rows",
    "read_jsonl",
    "text_key",
    "word_valence_rows",
]

logger = logging.getLogger(__name__)

# Stored in every manifest. Bump it when a builder changes its output, so that cached files are rebuilt.
FORMAT_VERSION = 1

TaskKind = Literal["classification", "multilabel", "regression", "token_classification"]


@dataclass(frozen=True)
class DemoTask:
    """Description of one demo task: its dataset's JSON Lines files, kind and fields.

    Attributes:
        dataset: folder under the output directory that contains ``train.jsonl`` and ``eval.jsonl``.
        kind: task kind, one of the kinds the data layer supports.
        label_field: field with the target: a class name or int (classification), a list of class
            names (multilabel) or a number (regression).
        num_labels: number of classes (classification, multilabel) or of regression targets.
        text_field: field with the input text, or None for numeric-feature tasks.
        features_field: field with the input feature vector, or None for text tasks.
        num_features: length of the feature vector, or None for text tasks.
    """

    dataset: str
    kind: TaskKind
    label_field: str
    num_labels: int
    text_field: str | None = "text"
    features_field: str | None = None
    num_features: int | None = None


DEMO_TASKS: dict[str, DemoTask] = {
    ICD10_DATASET: DemoTask(ICD10_DATASET, "classification", "label", 22),
    CHAT_DATASET: DemoTask(CHAT_DATASET, "classification", "label", 21),
    VALENCE_DATASET: DemoTask(VALENCE_DATASET, "regression", "valence", 1),
    GENDER_DATASET: DemoTask(GENDER_DATASET, "classification", "label", 2),
    LANGUAGE_DATASET: DemoTask(LANGUAGE_DATASET, "multilabel", "labels", 12),
}
"""The five text tasks of the default demo, by task name (each task has its own dataset folder)."""


def _multidigits_task(kind: TaskKind, label_field: str, num_labels: int) -> DemoTask:
    return DemoTask(
        MULTIDIGITS_DATASET,
        kind,
        label_field,
        num_labels,
        text_field=None,
        features_field="pixels",
        num_features=NUM_FEATURES,
    )


MULTIDIGITS_TASKS: dict[str, DemoTask] = {
    "left": _multidigits_task("classification", "left", 10),
    "right": _multidigits_task("classification", "right", 10),
    "sum": _multidigits_task("regression", "sum", 1),
    "digits": _multidigits_task("multilabel", "digits", 10),
}
"""The four MultiDigits tasks, which all read the ``multidigits`` dataset folder."""

_TEXT_BUILDERS: dict[str, tuple[Callable[[int], SplitRows], str]] = {
    ICD10_DATASET: (icd10_chapter_rows, ICD10_DISTRIBUTION),
    CHAT_DATASET: (chat_topic_rows, CHAT_DISTRIBUTION),
    VALENCE_DATASET: (word_valence_rows, VALENCE_DISTRIBUTION),
    GENDER_DATASET: (name_gender_rows, FAKER_DISTRIBUTION),
    LANGUAGE_DATASET: (name_language_rows, FAKER_DISTRIBUTION),
}


def _identity(dataset: str, seed: int, distribution: str, **parameters: int) -> dict[str, object]:
    return {
        "dataset": dataset,
        "seed": seed,
        "format_version": FORMAT_VERSION,
        "sources": {distribution: distribution_version(distribution)},
        "parameters": parameters,
    }


def build_demo_data(
    output_dir: str | Path,
    *,
    seed: int = 0,
    tasks: Iterable[str] | None = None,
) -> dict[str, dict[str, Path]]:
    """Write the train and eval files of the demo text tasks under ``output_dir``.

    Each task gets ``<output_dir>/<task>/train.jsonl``, ``eval.jsonl`` and ``manifest.json``, written
    atomically (temporary file, then ``os.replace``). A task whose manifest matches ``seed``,
    :data:`FORMAT_VERSION` and the installed source package version, and whose files have the
    recorded row counts, is not rebuilt.

    Args:
        output_dir: directory to write into; created if missing.
        seed: seed of the train/eval splits and samples.
        tasks: names from :data:`DEMO_TASKS` to build; default all five.

    Returns:
        ``{task: {"train": path, "eval": path}}`` in the order of ``tasks``.

    Raises:
        ModuleNotFoundError: a source package is not installed (the message names it and the
            ``pip install "multitune[demo]"`` command).
        ValueError: an unknown task name.
    """
    names = list(DEMO_TASKS) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in _TEXT_BUILDERS]
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; available: {', '.join(DEMO_TASKS)}")

    root = Path(output_dir)
    paths: dict[str, dict[str, Path]] = {}
    for name in names:
        builder, distribution = _TEXT_BUILDERS[name]
        paths[name] = build_split_files(
            root / name,
            _identity(name, seed, distribution),
            functools.partial(builder, seed),
        )
    return paths


def build_multidigits(
    output_dir: str | Path,
    *,
    seed: int = 0,
    train_size: int = 3000,
    eval_size: int = 600,
) -> dict[str, Path]:
    """Write MultiDigits (:func:`multidigits_rows`) as ``<output_dir>/multidigits/{train,eval}.jsonl``.

    The files are reused, like in :func:`build_demo_data`, when the manifest matches ``seed``,
    the sizes, :data:`FORMAT_VERSION` and the installed scikit-learn version.

    Returns:
        ``{"train": path, "eval": path}``.
    """
    return build_split_files(
        Path(output_dir) / MULTIDIGITS_DATASET,
        _identity(MULTIDIGITS_DATASET, seed, SKLEARN_DISTRIBUTION, train_size=train_size, eval_size=eval_size),
        lambda: multidigits_rows(seed, train_size=train_size, eval_size=eval_size),
    )

