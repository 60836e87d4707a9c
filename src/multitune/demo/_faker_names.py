"""First names with their gender and languages, from the per-locale person providers of Faker."""

from __future__ import annotations

import functools
import importlib
import logging
import unicodedata
from collections import Counter
from typing import NamedTuple

from ._io import SplitRows
from ._packages import import_package
from ._split import collect_labels, make_rng, stratified_split

logger = logging.getLogger(__name__)

GENDER_DATASET = "name_gender"
LANGUAGE_DATASET = "name_language"
FAKER_DISTRIBUTION = "faker"

# Characters allowed between the Latin letters of a name: "Anna Maria", "Ann-Kathrin", "O'Neil".
_NAME_SEPARATORS = frozenset(" -'\u2018\u2019")
_GENDER_LISTS = (("first_names_female", "female"), ("first_names_male", "male"))


class FirstName(NamedTuple):
    """A first name as one Faker locale lists it, with the gender of its list."""

    name: str
    gender: str
    locale: str

    @property
    def language(self) -> str:
        """The language part of the locale: ``"de"`` for ``"de_AT"``."""
        return self.locale.split("_")[0]


def _is_latin_script(name: str) -> bool:
    has_letter = False
    for char in name:
        if char.isalpha():
            if not unicodedata.name(char, "").startswith("LATIN "):
                return False
            has_letter = True
        elif char not in _NAME_SEPARATORS and unicodedata.category(char) != "Mn":
            return False
    return has_letter


@functools.cache
def latin_first_names() -> tuple[FirstName, ...]:
    """Return the male and female first names of every Faker locale that lists both, in Latin script.

    The result is computed once per process.

    Locales come from ``faker.config.AVAILABLE_LOCALES`` in their listed order, and each locale's
    ``faker.providers.person.<locale>.Provider`` must define ``first_names_male`` and
    ``first_names_female``. Names with a letter outside the Latin script, or with characters other
    than spaces, hyphens and apostrophes between the letters, are left out. The uncased vocabulary
    of all-MiniLM-L6-v2 covers few letters of other scripts, so such names would mostly become
    unknown tokens. With Faker 40.63 this keeps 37,747 of the 49,741 list entries (before
    deduplication) and drops the Arabic, Cyrillic, Greek, Hebrew, Indic, Thai and CJK names.
    """
    faker_config = import_package("faker.config", FAKER_DISTRIBUTION, f"{GENDER_DATASET}/{LANGUAGE_DATASET}")

    names: list[FirstName] = []
    for locale in faker_config.AVAILABLE_LOCALES:
        module_name = f"faker.providers.person.{locale}"
        try:
            provider = importlib.import_module(module_name).Provider
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # locales such as "de" or "la" have no person provider of their own
        lists = [(getattr(provider, attribute, None), gender) for attribute, gender in _GENDER_LISTS]
        if any(entries is None for entries, _ in lists):
            continue
        for entries, gender in lists:
            # Some locales store the names as an OrderedDict of name -> frequency; iterating gives the names.
            names.extend(FirstName(name, gender, locale) for name in entries if _is_latin_script(name))
    return tuple(names)


def name_gender_rows(seed: int = 0, *, eval_fraction: float = 0.1) -> SplitRows:
    """Build the ``name_gender`` task: first name -> ``"female"`` or ``"male"``.

    Names come from :func:`latin_first_names`, compared uncased and without accents. A name listed
    as female in one locale and male in any other (or the same) locale is dropped, and each
    remaining name is one row. About ``eval_fraction`` of each gender goes to eval.

    Returns ``(train_rows, eval_rows)``, lists of ``{"text": str, "label": str}``.
    """
    grouped = collect_labels((entry.name, entry.gender) for entry in latin_first_names())
    unambiguous = [(text, next(iter(genders))) for text, genders in grouped.values() if len(genders) == 1]
    logger.debug("name_gender: %d distinct names, %d dropped as both female and male",
                 len(grouped), len(grouped) - len(unambiguous))

    rng = make_rng(GENDER_DATASET, seed)
    train, evaluation = stratified_split([label for _, label in unambiguous], rng, eval_fraction=eval_fraction)

    def to_row(index: int) -> dict[str, str]:
        return {"text": unambiguous[index][0], "label": unambiguous[index][1]}

    return [to_row(index) for index in train], [to_row(index) for index in evaluation]


def name_language_rows(seed: int = 0, *, num_languages: int = 12, eval_fraction: float = 0.1) -> SplitRows:
    """Build the ``name_language`` task: first name -> the languages whose locales list it (multilabel).

    A name's labels are the language codes of all Faker locales that list it (``"de"`` from
    ``"de_AT"``, ``"de_CH"`` and ``"de_DE"``), over :func:`latin_first_names` of both genders,
    compared uncased and without accents. Only the ``num_languages`` languages with the most
    distinct names are labels (ties broken by code), and names left with no label are dropped.
    The split is a seeded random sample of ``eval_fraction`` of the names.

    Returns ``(train_rows, eval_rows)``, lists of ``{"text": str, "labels": list[str]}`` with the
    labels sorted.
    """
    if num_languages < 1:
        raise ValueError(f"num_languages must be positive, got {num_languages}")
    grouped = collect_labels((entry.name, entry.language) for entry in latin_first_names())

    counts = Counter(language for _, languages in grouped.values() for language in languages)
    ranked = sorted(counts, key=lambda language: (-counts[language], language))
    if num_languages > len(ranked):
        raise ValueError(f"num_languages={num_languages} but the Faker lists cover only {len(ranked)} languages")
    chosen = set(ranked[:num_languages])

    labelled = [(text, sorted(languages & chosen)) for text, languages in grouped.values() if languages & chosen]
    logger.debug("name_language: languages %s, %d of %d names kept", sorted(chosen), len(labelled), len(grouped))

    rng = make_rng(LANGUAGE_DATASET, seed)
    train, evaluation = stratified_split(["all"] * len(labelled), rng, eval_fraction=eval_fraction)

    def to_row(index: int) -> dict[str, object]:
        return {"text": labelled[index][0], "labels": labelled[index][1]}

    return [to_row(index) for index in train], [to_row(index) for index in evaluation]
