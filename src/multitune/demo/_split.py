"""Deduplication keys, seeded random generators and train/eval splits for the demo datasets."""

from __future__ import annotations

import unicodedata
import zlib
from collections.abc import Hashable, Iterable, Sequence

import numpy as np


def normalize_text(text: str) -> str:
    """Return ``text`` with runs of whitespace collapsed to one space and the ends stripped."""
    return " ".join(text.split())


def text_key(text: str) -> str:
    """Return the form of ``text`` that an uncased WordPiece tokenizer reads.

    The uncased BERT tokenizer of all-MiniLM-L6-v2 lowercases, decomposes to NFD and drops combining
    marks, so "José" and "jose" are the same model input. Deduplication and the train/eval overlap
    check compare texts by this key.
    """
    lowered = text.lower()
    if lowered.isascii():
        return normalize_text(lowered)
    decomposed = unicodedata.normalize("NFD", lowered)
    without_accents = "".join(char for char in decomposed if unicodedata.category(char) != "Mn")
    return normalize_text(without_accents)


def collect_labels(pairs: Iterable[tuple[str, str]]) -> dict[str, tuple[str, set[str]]]:
    """Group ``(text, label)`` pairs by :func:`text_key`.

    Returns ``{key: (text, labels)}`` where ``text`` is the first spelling seen (whitespace
    normalized) and ``labels`` is the set of all labels given to that key.
    """
    grouped: dict[str, tuple[str, set[str]]] = {}
    for text, label in pairs:
        text = normalize_text(text)
        if not text:
            continue
        key = text_key(text)
        if key not in grouped:
            grouped[key] = (text, set())
        grouped[key][1].add(label)
    return grouped


def make_rng(dataset: str, seed: int) -> np.random.Generator:
    """Return a generator seeded from ``seed`` and the dataset name, so datasets draw independent streams."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode("utf-8"))])


def stratified_split(
    labels: Sequence[Hashable],
    rng: np.random.Generator,
    *,
    eval_fraction: float,
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[int], list[int]]:
    """Split row indices into shuffled train and eval lists, label by label.

    Each label sends about ``eval_fraction`` of its rows to eval. Rows that share a group (for
    example ICD-10-CM codes of one three-character category) go to the same side, so near-duplicate
    siblings do not leak from train into eval. A label with at least two groups gets at least one
    group on each side. A label with one group stays in train. The eval share of a label overshoots
    ``eval_fraction`` by at most its last group.

    NOTE: a group that spans several labels is placed by the first label (in sorted order) that
    draws it, and counts towards the other labels' shares where it landed.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    row_groups: Sequence[Hashable] = groups if groups is not None else range(len(labels))
    if len(row_groups) != len(labels):
        raise ValueError(f"groups has {len(row_groups)} entries but labels has {len(labels)}")

    rows_by_label: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        rows_by_label.setdefault(label, []).append(index)

    rows_by_group: dict[Hashable, list[int]] = {}
    for index, group in enumerate(row_groups):
        rows_by_group.setdefault(group, []).append(index)

    group_in_eval: dict[Hashable, bool] = {}
    for label in sorted(rows_by_label, key=repr):
        _assign_label_groups(rows_by_label[label], row_groups, rows_by_group, group_in_eval, rng, eval_fraction)

    train = [index for index, group in enumerate(row_groups) if not group_in_eval.get(group, False)]
    evaluation = [index for index, group in enumerate(row_groups) if group_in_eval.get(group, False)]
    return _shuffled(train, rng), _shuffled(evaluation, rng)


def _assign_label_groups(
    label_rows: list[int],
    row_groups: Sequence[Hashable],
    rows_by_group: dict[Hashable, list[int]],
    group_in_eval: dict[Hashable, bool],
    rng: np.random.Generator,
    eval_fraction: float,
) -> None:
    # Groups in order of first appearance, which is deterministic for a deterministic row order.
    label_groups = list(dict.fromkeys(row_groups[index] for index in label_rows))
    if len(label_groups) < 2:
        for group in label_groups:
            group_in_eval.setdefault(group, False)
        return

    target = min(max(1, round(eval_fraction * len(label_rows))), len(label_rows) - 1)
    eval_count = sum(len(rows_by_group[group]) for group in label_groups if group_in_eval.get(group, False))
    undecided = [group for group in label_groups if group not in group_in_eval]
    train_groups_left = sum(1 for group in label_groups if group_in_eval.get(group) is False) + len(undecided)

    for position in rng.permutation(len(undecided)):
        group = undecided[position]
        if eval_count < target and train_groups_left > 1:
            group_in_eval[group] = True
            eval_count += len(rows_by_group[group])
            train_groups_left -= 1
        else:
            group_in_eval[group] = False


def _shuffled(indices: list[int], rng: np.random.Generator) -> list[int]:
    return [indices[position] for position in rng.permutation(len(indices))]
