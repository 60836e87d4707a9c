"""Lookup of balancer classes by their registry name, for configs and ``multitune compare``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ._base import Balancer

_REGISTRY: dict[str, type[Balancer]] = {}


def register_balancer(cls: type[Balancer]) -> type[Balancer]:
    """Add ``cls`` to the registry under ``cls.name``; usable as a class decorator."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name; set the class attribute 'name'")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"balancer name {cls.name!r} is already used by {existing.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_balancers() -> list[str]:
    """Return the registry names of all balancers, sorted."""
    return sorted(_REGISTRY)


def get_balancer_class(name: str) -> type[Balancer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown balancer {name!r}; available: {', '.join(available_balancers())}") from None


def build_balancer(
    name: str,
    task_names: Sequence[str],
    *,
    shared_parameters: Iterable[nn.Parameter] | None = None,
    **hyperparameters: Any,
) -> Balancer:
    """Build the balancer registered as ``name``.

    ``shared_parameters`` is passed only to methods that need it (``requires_shared_parameters``).
    """
    cls = get_balancer_class(name)
    if cls.requires_shared_parameters:
        if shared_parameters is None:
            raise ValueError(f"balancer {name!r} needs the model's shared parameters; pass shared_parameters=")
        return cls(task_names, shared_parameters=shared_parameters, **hyperparameters)
    return cls(task_names, **hyperparameters)
