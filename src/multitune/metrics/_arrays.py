"""Conversion of predictions and labels (tensors, arrays or lists) to NumPy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100
"""Label value that marks a missing class label or an ignored token, as in PyTorch's cross-entropy."""


def to_numpy(values: Any, *, name: str) -> np.ndarray:
    """Return ``values`` (a tensor, an array or a nested list) as a NumPy array.

    Tensors are detached and moved to the CPU. Half-precision tensors are cast to float32 first,
    because NumPy has no bfloat16.
    """
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        tensor = values.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()
        return tensor.numpy()

    try:
        return np.asarray(values)
    except ValueError as error:
        raise ValueError(f"{name} could not be converted to an array ({error}); pass a tensor, an array or a rectangular list") from error
