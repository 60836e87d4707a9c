"""MultiDigits: pairs of scikit-learn's 8x8 digit images side by side, with four targets per pair."""

from __future__ import annotations

import gzip
import logging

import numpy as np

from ._io import Row, SplitRows
from ._packages import package_file
from ._split import make_rng, stratified_split

logger = logging.getLogger(__name__)

MULTIDIGITS_DATASET = "multidigits"
SKLEARN_DISTRIBUTION = "scikit-learn"
IMAGE_SIZE = 8
MAX_PIXEL = 16.0
NUM_FEATURES = IMAGE_SIZE * 2 * IMAGE_SIZE


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's bundled digits as ``(images, targets)``.

    ``images`` is float64 ``[1797, 8, 8]`` with pixel intensities 0 to 16 and ``targets`` is int64
    ``[1797]``, in the order of ``sklearn.datasets.load_digits``. The file
    ``sklearn/datasets/data/digits.csv.gz`` is read directly, so scikit-learn is not imported.
    """
    path = package_file("sklearn", SKLEARN_DISTRIBUTION, MULTIDIGITS_DATASET, "datasets/data/digits.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        table = np.loadtxt(handle, delimiter=",", ndmin=2)
    if table.shape[1] != IMAGE_SIZE * IMAGE_SIZE + 1:
        raise ValueError(f"{path}: expected {IMAGE_SIZE * IMAGE_SIZE + 1} columns per row, found {table.shape[1]}")
    images = table[:, :-1].reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    targets = table[:, -1].astype(np.int64)
    return images, targets


def _pair_rows(
    pool: list[int],
    size: int,
    images: np.ndarray,
    targets: np.ndarray,
    rng: np.random.Generator,
) -> list[Row]:
    # Each pair (left, right) of pool images is drawn at most once.
    if size > len(pool) ** 2:
        raise ValueError(f"cannot draw {size} distinct pairs from {len(pool)} images; lower the size")
    codes = rng.choice(len(pool) ** 2, size=size, replace=False)

    rows: list[Row] = []
    for code in codes.tolist():
        left_index, right_index = pool[code // len(pool)], pool[code % len(pool)]
        left, right = int(targets[left_index]), int(targets[right_index])
        pixels = np.concatenate([images[left_index], images[right_index]], axis=1) / MAX_PIXEL
        rows.append({
            "pixels": pixels.ravel().tolist(),
            "left": left,
            "right": right,
            "sum": left + right,
            "digits": sorted({str(left), str(right)}),
            "source_images": [left_index, right_index],
        })
    return rows


def multidigits_rows(
    seed: int = 0,
    *,
    train_size: int = 3000,
    eval_size: int = 600,
    eval_image_fraction: float = 0.2,
) -> SplitRows:
    """Build MultiDigits: two digit images side by side, with four targets.

    The 1,797 8x8 images of ``sklearn.datasets.load_digits`` are split per digit class into
    training and eval images (``eval_image_fraction`` of each class to eval), and each split draws
    distinct ordered pairs from its own images only. A pair becomes an 8x16 image, left digit in
    columns 0-7 and right digit in columns 8-15, flattened row by row to 128 floats in [0, 1]
    (``pixel / 16``), so ``pixels[r * 16 + c]`` is row ``r``, column ``c``.

    Each row has ``pixels``, ``left`` and ``right`` (int class 0-9), ``sum`` (int, 0-18),
    ``digits`` (sorted list of the distinct digits as strings, e.g. ``["3", "7"]``) and
    ``source_images`` (the two indices into ``load_digits``).

    Returns ``(train_rows, eval_rows)``.
    """
    if train_size < 1 or eval_size < 1:
        raise ValueError(f"train_size and eval_size must be positive, got {train_size} and {eval_size}")
    images, targets = load_digit_images()

    rng = make_rng(MULTIDIGITS_DATASET, seed)
    train_images, eval_images = stratified_split(targets.tolist(), rng, eval_fraction=eval_image_fraction)
    logger.debug("multidigits: %d training images, %d eval images", len(train_images), len(eval_images))

    train = _pair_rows(train_images, train_size, images, targets, rng)
    evaluation = _pair_rows(eval_images, eval_size, images, targets, rng)
    return train, evaluation
