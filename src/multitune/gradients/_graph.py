"""Discovery of the leaf tensors that an autograd graph reaches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor


def graph_leaves(root: Tensor, *, stop_at: Iterable[Tensor] = (), exclude: Iterable[Tensor] = ()) -> list[Tensor]:
    """Return the leaf tensors that require grad and that ``root``'s autograd graph reaches.

    The walk does not go below the tensors in ``stop_at`` (for example the shared representation),
    so the leaves that only feed those tensors are not listed. Tensors in ``exclude`` are left out
    of the result. Leaves are returned in the order the depth-first walk first meets them, so the
    result is the same for the same graph.

    Args:
        root: a tensor with a ``grad_fn`` (a loss).
        stop_at: tensors whose own graph is not walked.
        exclude: leaves to leave out of the result (for example the shared parameters).
    """
    stop_tensors = list(stop_at)
    stop_nodes = {id(t.grad_fn) for t in stop_tensors if t.grad_fn is not None}
    excluded = {id(t) for t in exclude} | {id(t) for t in stop_tensors}

    if root.grad_fn is None:
        if root.requires_grad and id(root) not in excluded:
            return [root]
        return []

    leaves: list[Tensor] = []
    seen_nodes: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes or id(node) in stop_nodes:
            continue
        seen_nodes.add(id(node))

        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            if id(variable) not in excluded:
                excluded.add(id(variable))
                leaves.append(variable)
            continue

        # Reversed, so that the first input of a node is walked first.
        stack.extend(next_node for next_node, _ in reversed(node.next_functions))
    return leaves


def unique_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Return ``tensors`` without repeats (by identity), keeping the first occurrence's order."""
    seen: set[int] = set()
    result: list[Tensor] = []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            result.append(tensor)
    return result


def embedding_lookups(root: Tensor, inputs: Sequence[Tensor]) -> dict[int, list[Any]]:
    """Find the inputs that ``root``'s graph reads only through dense embedding lookups.

    Returns, for each such input (by position in ``inputs``), the ``EmbeddingBackward0`` nodes
    that read it. The gradient of that input is zero outside the rows those nodes looked up
    (their ``_saved_indices``), which must be read before the graph is freed. An input with any
    other consumer (a tied output projection, for example) is left out, as are inputs the graph
    does not reach.
    """
    if root.grad_fn is None:
        return {}
    positions = {id(t): i for i, t in enumerate(inputs)}
    consumers: dict[int, list[Any]] = {}
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if isinstance(variable, Tensor):
                position = positions.get(id(variable))
                if position is not None:
                    consumers.setdefault(position, []).append(node)
                continue
            stack.append(child)

    return {
        position: nodes for position, nodes in consumers.items() if all(_is_dense_embedding_lookup(node) for node in nodes)
    }


def _is_dense_embedding_lookup(node: Any) -> bool:
    return type(node).__name__ == "EmbeddingBackward0" and not getattr(node, "_saved_sparse", True)
