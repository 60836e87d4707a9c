"""ICD-10-CM diagnosis descriptions labelled with their chapter, from the simple-icd-10-cm package."""

from __future__ import annotations

import logging

from ._io import SplitRows
from ._packages import import_package
from ._split import collect_labels, make_rng, stratified_split, text_key

logger = logging.getLogger(__name__)

ICD10_DATASET = "icd10_chapter"
ICD10_DISTRIBUTION = "simple-icd-10-cm"


def icd10_chapter_rows(seed: int = 0, *, eval_fraction: float = 0.05) -> SplitRows:
    """Build the ``icd10_chapter`` task: diagnosis description -> chapter title (22 classes).

    Rows are the categories and subcategories of the ICD-10-CM tabular list shipped with
    simple-icd-10-cm (46,920 codes and 46,144 distinct descriptions in version 1.5.0, the April 2026
    release). The 51,305 codes that the library generates by appending a 7th character are left
    out: each repeats its parent's description with a suffix such as ", initial encounter", and 80%
    of them are in the injury chapter.

    The label is the chapter's description, e.g. ``"Diseases of the circulatory system (I00-I99)"``.
    Descriptions that occur under two chapters are dropped, and repeated descriptions are kept once.
    The split keeps all codes of one three-character category on the same side, so the eval split
    contains no sibling of a training description. About ``eval_fraction`` of each chapter goes to eval.

    Returns ``(train_rows, eval_rows)``, lists of ``{"text": str, "label": str, "code": str}``
    where ``code`` is the first code with that description (e.g. ``"I10"``).
    """
    icd = import_package("simple_icd_10_cm", ICD10_DISTRIBUTION, ICD10_DATASET)

    pairs: list[tuple[str, str]] = []
    code_of_key: dict[str, str] = {}
    for code in icd.get_all_codes(with_dots=True):
        if not icd.is_category_or_subcategory(code) or icd.is_extended_subcategory(code):
            continue
        chapter = icd.get_ancestors(code)[-1]
        description = icd.get_description(code)
        pairs.append((description, icd.get_description(chapter)))
        code_of_key.setdefault(text_key(description), code)

    grouped = collect_labels(pairs)
    conflicts = sum(1 for _, chapters in grouped.values() if len(chapters) > 1)
    unique = [(key, text, next(iter(chapters))) for key, (text, chapters) in grouped.items() if len(chapters) == 1]
    logger.debug("icd10_chapter: %d codes, %d distinct descriptions, %d dropped for conflicting chapters",
                 len(pairs), len(grouped), conflicts)

    rng = make_rng(ICD10_DATASET, seed)
    labels = [label for _, _, label in unique]
    codes = [code_of_key[key] for key, _, _ in unique]
    groups = [code[:3] for code in codes]
    train, evaluation = stratified_split(labels, rng, eval_fraction=eval_fraction, groups=groups)

    def to_row(index: int) -> dict[str, str]:
        return {"text": unique[index][1], "label": unique[index][2], "code": codes[index]}

    return [to_row(index) for index in train], [to_row(index) for index in evaluation]
