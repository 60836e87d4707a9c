"""Words with their human-rated valence, from the VADER lexicon shipped in the vaderSentiment package."""

from __future__ import annotations

import logging
import re

from ._io import SplitRows
from ._packages import package_file
from ._split import make_rng

logger = logging.getLogger(__name__)

VALENCE_DATASET = "word_valence"
VALENCE_DISTRIBUTION = "vaderSentiment"

# Lowercase letters, optionally joined by single apostrophes or hyphens ("can't", "well-off").
_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def word_valence_rows(seed: int = 0, *, train_size: int = 500, eval_size: int = 300) -> SplitRows:
    """Build the ``word_valence`` task: word -> mean human valence rating (regression, -4 to 4).

    Each line of ``vaderSentiment/vader_lexicon.txt`` contains a token, the mean of ten ratings on a
    -4 (most negative) to +4 (most positive) scale, their standard deviation and the raw ratings
    (Hutto and Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social
    Media Text", ICWSM 2014). Only words are kept (about 7,200 of the 7,500 entries). Emoticons
    such as ``":-)"``, number codes such as ``"143"`` and other tokens with digits or symbols are
    dropped, because the WordPiece tokenizer of all-MiniLM-L6-v2 splits them into punctuation
    pieces that carry little of their meaning.

    A seeded sample of ``eval_size + train_size`` words is drawn without replacement, so the splits
    share no word. The training split is kept small on purpose: it is the low-resource task of the
    demo.

    Returns ``(train_rows, eval_rows)``, lists of ``{"text": str, "valence": float}``.
    """
    if train_size < 1 or eval_size < 1:
        raise ValueError(f"train_size and eval_size must be positive, got {train_size} and {eval_size}")
    path = package_file("vaderSentiment", VALENCE_DISTRIBUTION, VALENCE_DATASET, "vader_lexicon.txt")

    words: dict[str, float] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        token = fields[0].strip()
        if not _WORD.fullmatch(token) or token in words:
            continue
        try:
            words[token] = float(fields[1])
        except ValueError:
            raise ValueError(f"{path}:{line_number}: mean rating {fields[1]!r} is not a number") from None

    if train_size + eval_size > len(words):
        raise ValueError(
            f"word_valence has {len(words)} words but train_size + eval_size = {train_size + eval_size}; "
            "lower them"
        )
    logger.debug("word_valence: %d words in %s", len(words), path)

    rng = make_rng(VALENCE_DATASET, seed)
    vocabulary = sorted(words)
    sample = [vocabulary[position] for position in rng.permutation(len(vocabulary))[: eval_size + train_size]]
    evaluation = [{"text": word, "valence": words[word]} for word in sample[:eval_size]]
    train = [{"text": word, "valence": words[word]} for word in sample[eval_size:]]
    return train, evaluation
