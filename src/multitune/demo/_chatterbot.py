"""Chat utterances labelled with their topic, from the YAML files of the chatterbot-corpus package."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import yaml

from ._io import SplitRows
from ._packages import package_directory
from ._split import collect_labels, make_rng, stratified_split

logger = logging.getLogger(__name__)

CHAT_DATASET = "chat_topic"
CHAT_DISTRIBUTION = "chatterbot-corpus"

# English alone has about 1,860 distinct utterances, and six of its 21 topics have fewer than 30
# (health has 7). The default adds the Latin-script translations, whose files reuse the English topics.
CHAT_LANGUAGES: tuple[str, ...] = (
    "english",
    "dutch",
    "french",
    "german",
    "indonesian",
    "italian",
    "portuguese",
    "spanish",
    "swedish",
    "turkish",
)

_BASE_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)

# Files of other languages whose names differ from the English file of the same topic.
_FILE_ALIASES = {
    "IA": "ai",
    "dinero": "money",
    "emociones": "emotion",
    "perfilbot": "botprofile",
    "psicologia": "psychology",
    "sport": "sports",
    "profile": "botprofile",
    "computer": "computers",
    "emotions": "emotion",
}


def _load_yaml(path: Path) -> dict[str, object]:
    # BaseLoader keeps every scalar a string, so utterances such as "Yes" or "42" stay text.
    with path.open(encoding="utf-8") as handle:
        document = yaml.load(handle, Loader=_BASE_LOADER)  # noqa: S506 - BaseLoader builds no objects
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping with 'categories' and 'conversations'")
    return document


def _utterances(document: dict[str, object]) -> list[str]:
    conversations = document.get("conversations") or []
    if not isinstance(conversations, list):
        return []
    return [
        utterance
        for conversation in conversations
        if isinstance(conversation, list)
        for utterance in conversation
        if isinstance(utterance, str)
    ]


def _english_topics(data_directory: Path) -> dict[str, str]:
    # File stem -> topic, the first entry of the English file's 'categories'.
    topics: dict[str, str] = {}
    for path in sorted((data_directory / "english").glob("*.yml")):
        categories = _load_yaml(path).get("categories")
        if isinstance(categories, list) and categories:
            topics[path.stem] = str(categories[0])
        else:
            topics[path.stem] = path.stem
    return topics


def chat_topic_rows(
    seed: int = 0,
    *,
    languages: Sequence[str] = CHAT_LANGUAGES,
    eval_fraction: float = 0.15,
) -> SplitRows:
    """Build the ``chat_topic`` task: chat utterance -> topic (the 21 English topics).

    Every utterance of every conversation in ``chatterbot_corpus/data/<language>/<topic>.yml`` is
    a row, labelled with the first ``categories`` entry of the English file of that topic (``"AI"``,
    ``"emotion"``, ``"tech support"``...). Files of other languages are matched to English topics by
    file name, and files without an English counterpart are skipped. Texts are compared uncased and
    without accents. A text that occurs under two topics is dropped, and repeated texts are kept once.
    About ``eval_fraction`` of each topic goes to eval.

    NOTE: the translated files contain translations of English rows, so an eval utterance can have a
    translation in train. Pass ``languages=("english",)`` for an English-only task.

    Returns ``(train_rows, eval_rows)``, lists of ``{"text": str, "label": str}``.
    """
    data_directory = package_directory("chatterbot_corpus", CHAT_DISTRIBUTION, CHAT_DATASET) / "data"
    topics = _english_topics(data_directory)
    if not topics:
        raise FileNotFoundError(f"demo dataset {CHAT_DATASET!r}: no English YAML files in {data_directory / 'english'}")

    pairs: list[tuple[str, str]] = []
    for language in languages:
        language_directory = data_directory / language
        if not language_directory.is_dir():
            available = sorted(path.name for path in data_directory.iterdir() if path.is_dir())
            raise ValueError(f"chatterbot-corpus has no language {language!r}; available: {', '.join(available)}")
        for path in sorted(language_directory.glob("*.yml")):
            topic = topics.get(_FILE_ALIASES.get(path.stem, path.stem))
            if topic is None:
                logger.debug("chat_topic: skipping %s, which matches no English topic", path)
                continue
            pairs.extend((utterance, topic) for utterance in _utterances(_load_yaml(path)))

    grouped = collect_labels(pairs)
    unambiguous = [(text, next(iter(labels))) for text, labels in grouped.values() if len(labels) == 1]
    logger.debug("chat_topic: %d utterances, %d distinct, %d dropped for conflicting topics",
                 len(pairs), len(grouped), len(grouped) - len(unambiguous))

    rng = make_rng(CHAT_DATASET, seed)
    train, evaluation = stratified_split([label for _, label in unambiguous], rng, eval_fraction=eval_fraction)

    def to_row(index: int) -> dict[str, str]:
        return {"text": unambiguous[index][0], "label": unambiguous[index][1]}

    return [to_row(index) for index in train], [to_row(index) for index in evaluation]
