r"""Per-task gradients of a set of tensors, summed over micro-batches, with their Gramian.

One row per task contains the gradient of that task's loss with respect to every tensor in
``inputs`` (the shared parameters, or the shared representation). The rows are kept as the
tensors that :func:`torch.autograd.grad` returns, so filling a row copies nothing. From the rows
the accumulator computes

.. math::

    G = J J^\top, \qquad G_{ij} = \sum_p \langle g_{i,p}, g_{j,p} \rangle

(the Gramian of the task Jacobian :math:`J`, one dot product per tensor :math:`p` and pair of
tasks, without building :math:`J`), the Jacobian itself when a method needs it, and the
combination :math:`\sum_i c_i g_i`, computed in place in the first row's tensors.

Embedding tables: the gradient of a weight that the graph reads only through dense embedding
lookups is zero outside the rows looked up. For such a weight the accumulator keeps only those
rows per task, read from the lookup's saved indices. The Gramian and the combination then cost
a batch's worth of rows instead of the whole table (30k rows for a BERT vocabulary). In memory,
one dense table is kept, and it becomes the combined gradient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._graph import embedding_lookups

logger = logging.getLogger(__name__)


@dataclass
class RowSlice:
    """The rows ``rows`` (sorted, unique) of a gradient that is zero elsewhere; ``values[k]`` is row ``rows[k]``.

    ``canvas``, when set, is a dense tensor of ``shape`` that is zero outside ``rows``. The
    combination writes its result into it instead of allocating and zeroing a new table.
    """

    rows: Tensor
    values: Tensor
    shape: torch.Size
    canvas: Tensor | None = None

    def dense(self) -> Tensor:
        out = self.values.new_zeros(self.shape)
        out.index_copy_(0, self.rows, self.values)
        return out

    def on_rows(self, rows: Tensor) -> Tensor:
        """Return the values on ``rows`` (a sorted superset of :attr:`rows`), zero where absent."""
        if rows is self.rows:
            return self.values
        out = self.values.new_zeros((rows.numel(),) + tuple(self.shape[1:]))
        out.index_copy_(0, torch.searchsorted(rows, self.rows), self.values)
        return out


Entry = Tensor | RowSlice | None


class GradientAccumulator:
    """Per-task gradients with respect to ``inputs``, summed until :meth:`reset`.

    Typical use, for one step whose tasks arrive in separate micro-batches::

        accumulator = GradientAccumulator(shared_parameters, num_tasks=3)
        for task, loss in micro_batch_losses:          # one autograd graph per micro-batch
            accumulator.backward(task, loss)
        gramian = accumulator.gramian()               # (k, k) for the k tasks seen
        combined = accumulator.combine(coefficients)  # one tensor (or None) per input

    A task seen in several micro-batches gets the sum of their gradients, the gradient of the
    summed loss. Tasks are identified by their index in ``range(num_tasks)``; the rows, the
    Gramian and the Jacobian list the tasks seen, in increasing index order (:attr:`tasks`).

    Args:
        inputs: tensors to differentiate with respect to, each requiring grad.
        num_tasks: number of task indices.
        embedding_rows: keep only the looked-up rows of inputs read only through dense
            embedding lookups (see the module docstring). Results are the same either way.
    """

    def __init__(self, inputs: Sequence[Tensor], num_tasks: int, *, embedding_rows: bool = True) -> None:
        self.inputs: tuple[Tensor, ...] = tuple(inputs)
        if not self.inputs:
            raise ValueError("GradientAccumulator needs at least one input tensor")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        # Only 2-D leaf tensors (weights) can be embedding tables; this skips the graph walk otherwise.
        self.embedding_rows = embedding_rows and any(t.is_leaf and t.dim() == 2 for t in self.inputs)
        self._rows: list[list[Entry] | None] = [None] * num_tasks
        # Looked-up rows by the ids of the lookup nodes; the nodes are kept so the ids stay unique.
        self._row_cache: dict[tuple[int, ...], tuple[list[Any], Tensor]] = {}
        self._canvases: set[int] = set()

    @property
    def numel(self) -> int:
        """Number of scalars in ``inputs`` (the Jacobian's column count)."""
        return sum(t.numel() for t in self.inputs)

    @property
    def tasks(self) -> list[int]:
        """Indices of the tasks with a gradient, in increasing order."""
        return [i for i, row in enumerate(self._rows) if row is not None]

    def __len__(self) -> int:
        return len(self.tasks)

    def reset(self) -> None:
        """Drop every stored gradient."""
        self._rows = [None] * self.num_tasks
        self._row_cache = {}
        self._canvases = set()

    def drop(self, task: int) -> None:
        """Drop ``task``'s gradient (for example when it is not finite)."""
        self._rows[task] = None

    # Filling -----------------------------------------------------------------------------------

    def backward(
        self,
        task: int,
        loss: Tensor,
        *,
        task_parameters: Sequence[Tensor] = (),
        retain_graph: bool = False,
    ) -> tuple[Tensor | None, ...]:
        """Differentiate ``loss`` with respect to ``inputs`` and add the result to ``task``'s row.

        ``task_parameters`` are differentiated in the same :func:`torch.autograd.grad` call, so
        their gradients cost no extra backward pass. They are returned, not stored (``None`` for
        a parameter that ``loss`` does not reach).
        """
        lookups = self._lookup_rows(loss) if self.embedding_rows else {}
        inputs = list(self.inputs) + list(task_parameters)
        gradients = _own(torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True), inputs)
        count = len(self.inputs)

        entries: list[Entry] = list(gradients[:count])
        for position, rows in lookups.items():
            gradient = entries[position]
            if gradient is None:
                continue
            # One dense gradient per table is kept as the canvas of the combined gradient.
            canvas = None
            if position not in self._canvases:
                canvas = gradient
                self._canvases.add(position)
            entries[position] = RowSlice(rows, gradient.index_select(0, rows), gradient.shape, canvas)
        self._add_entries(task, entries)
        return tuple(gradients[count:])

    def add_gradients(self, task: int, gradients: Sequence[Tensor | None]) -> None:
        """Add precomputed gradients (one per input, ``None`` for zero) to ``task``'s row.

        The first gradients a row receives are stored as they are and later ones are added in
        place, so the caller must not use the given tensors afterwards.
        """
        if len(gradients) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} gradients (one per input), got {len(gradients)}")
        self._add_entries(task, _own(gradients, self.inputs))

    def _add_entries(self, task: int, entries: list[Entry]) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task index {task} is out of range for {self.num_tasks} tasks")
        row = self._rows[task]
        if row is None:
            self._rows[task] = entries
            return
        for index, entry in enumerate(entries):
            row[index] = _sum_entries(row[index], entry)

    def _lookup_rows(self, loss: Tensor) -> dict[int, Tensor]:
        """Return the looked-up rows of each embedding input of ``loss``'s graph, before it is freed."""
        result: dict[int, Tensor] = {}
        for position, nodes in embedding_lookups(loss, self.inputs).items():
            key = tuple(sorted(id(node) for node in nodes))
            cached = self._row_cache.get(key)
            if cached is None:
                try:
                    indices = torch.cat([node._saved_indices.reshape(-1) for node in nodes])
                except RuntimeError:
                    # The saved indices were freed; the dense gradient is kept instead.
                    continue
                cached = (nodes, torch.unique(indices))
                self._row_cache[key] = cached
            result[position] = cached[1]
        return result

    # Results -----------------------------------------------------------------------------------

    def row(self, task: int) -> list[Tensor | None]:
        """Return ``task``'s gradients as dense tensors, one per input (``None`` where its loss never reached it)."""
        row = self._rows[task]
        if row is None:
            raise KeyError(f"task index {task} has no gradient")
        return [entry.dense() if isinstance(entry, RowSlice) else entry for entry in row]

    def gramian(self) -> Tensor:
        r"""Return :math:`G = J J^\top` for the tasks in :attr:`tasks`, shape (k, k).

        Each entry is a sum of per-tensor dot products, added up in float64 and returned in the
        gradients' dtype promoted to at least float32.
        """
        rows = self._present_rows()
        dtype = torch.promote_types(self.inputs[0].dtype, torch.float32)
        device = self.inputs[0].device
        k = len(rows)

        products: list[Tensor] = []
        pairs = [(i, j) for i in range(k) for j in range(i + 1)]
        for position in range(len(self.inputs)):
            column = _common_rows([row[position] for row in rows])
            for i, j in pairs:
                a, b = column[i], column[j]
                if a is not None and b is not None:
                    products.append(torch.dot(a.reshape(-1), b.reshape(-1)).to(torch.float64).reshape(1))
                else:
                    products.append(torch.zeros(1, dtype=torch.float64, device=device))

        sums = torch.cat(products).view(len(self.inputs), len(pairs)).sum(0)
        gramian = torch.empty(k, k, dtype=torch.float64, device=device)
        for (i, j), value in zip(pairs, sums):
            gramian[i, j] = value
            gramian[j, i] = value
        return gramian.to(dtype)

    def jacobian(self, out: Tensor | None = None) -> Tensor:
        """Return the (k, P) Jacobian, one flattened row per task in :attr:`tasks`.

        This copies every gradient once; methods that need only the Gramian should call
        :meth:`gramian`, which does not.
        """
        rows = self._present_rows()
        first = self.inputs[0]
        shape = (len(rows), self.numel)
        if out is None:
            out = torch.empty(shape, dtype=first.dtype, device=first.device)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")

        for row_index, row in enumerate(rows):
            offset = 0
            for tensor, entry in zip(self.inputs, row):
                size = tensor.numel()
                target = out[row_index, offset : offset + size]
                if entry is None:
                    target.zero_()
                elif isinstance(entry, RowSlice):
                    target.zero_()
                    target.view(entry.shape).index_copy_(0, entry.rows, entry.values)
                else:
                    target.copy_(entry.reshape(-1))
                offset += size
        return out

    def combine(self, coefficients: Tensor | Sequence[float]) -> list[Tensor | None]:
        r"""Return :math:`\sum_i c_i g_i` per input and empty the accumulator.

        ``coefficients`` has one entry per task in :attr:`tasks`. The sum is computed in place in
        the stored gradients, which is why the accumulator is reset afterwards. An input that no
        task reached gets ``None``.
        """
        rows = self._present_rows()
        values = _as_floats(coefficients)
        if len(values) != len(rows):
            raise ValueError(f"expected {len(rows)} coefficients (one per task with a gradient), got {len(values)}")
        self.reset()

        result: list[Tensor | None] = [None] * len(self.inputs)
        dense = [j for j in range(len(self.inputs)) if all(isinstance(row[j], Tensor) for row in rows)]
        if dense:
            total: list[Tensor] = [rows[0][j] for j in dense]  # type: ignore[misc]
            torch._foreach_mul_(total, values[0])
            for row, value in zip(rows[1:], values[1:]):
                torch._foreach_add_(total, [row[j] for j in dense], alpha=value)  # type: ignore[misc]
            for j, tensor in zip(dense, total):
                result[j] = tensor

        dense_set = set(dense)
        for j in range(len(self.inputs)):
            if j not in dense_set:
                result[j] = _combine_column([row[j] for row in rows], values)
        return result

    def _present_rows(self) -> list[list[Entry]]:
        rows = [row for row in self._rows if row is not None]
        if not rows:
            raise RuntimeError("the accumulator is empty; call backward() or add_gradients() first")
        return rows


def _common_rows(entries: list[Entry]) -> list[Tensor | None]:
    """Return the entries as tensors that line up element by element (row slices on one row set)."""
    slices = [e for e in entries if isinstance(e, RowSlice)]
    if not slices:
        return entries  # type: ignore[return-value]
    if any(isinstance(e, Tensor) for e in entries):
        return [e.dense() if isinstance(e, RowSlice) else e for e in entries]
    rows = _union_rows([s.rows for s in slices])
    return [None if e is None else e.on_rows(rows) for e in entries]  # type: ignore[union-attr]


def _combine_column(entries: list[Entry], values: list[float]) -> Tensor | None:
    """Return ``sum_i values[i] * entries[i]`` as a dense tensor, ``None`` when every entry is ``None``."""
    aligned = _common_rows(entries)
    total: Tensor | None = None
    for tensor, value in zip(aligned, values):
        if tensor is None:
            continue
        total = tensor.mul_(value) if total is None else total.add_(tensor, alpha=value)
    if total is None:
        return None
    slices = [e for e in entries if isinstance(e, RowSlice)]
    if slices and not any(isinstance(e, Tensor) for e in entries):
        rows = _union_rows([s.rows for s in slices])
        canvases = [s.canvas for s in slices if s.canvas is not None]
        if not canvases:
            return RowSlice(rows, total, slices[0].shape).dense()
        # The canvas is zero outside its own rows, which are a subset of `rows`.
        return canvases[0].index_copy_(0, rows, total)
    return total


def _sum_entries(old: Entry, new: Entry) -> Entry:
    """Return ``old + new``, in place in ``old`` where possible."""
    if new is None:
        return old
    if old is None:
        return new
    if isinstance(old, Tensor) and isinstance(new, Tensor):
        return old.add_(new)
    if isinstance(old, RowSlice) and isinstance(new, RowSlice):
        rows = _union_rows([old.rows, new.rows])
        values = old.on_rows(rows)  # the stored values themselves when the row set is unchanged
        values.index_add_(0, torch.searchsorted(rows, new.rows), new.values)
        return RowSlice(rows, values, old.shape, old.canvas if old.canvas is not None else new.canvas)
    dense = old.dense() if isinstance(old, RowSlice) else old
    return dense.add_(new.dense() if isinstance(new, RowSlice) else new)


def _union_rows(row_sets: list[Tensor]) -> Tensor:
    first = row_sets[0]
    if all(rows is first for rows in row_sets):
        return first
    return torch.unique(torch.cat(row_sets))


def _own(gradients: Sequence[Tensor | None], inputs: Sequence[Tensor]) -> list[Tensor | None]:
    """Return the gradients in a form that later in-place updates may modify.

    :func:`torch.autograd.grad` may return the same tensor for two inputs (``a + b``), an
    expanded view, a sparse tensor or a tensor in another layout. Such gradients are copied into
    dense contiguous tensors, and the rest are kept as they are.
    """
    owned: list[Tensor | None] = []
    pointers: set[int] = set()
    for gradient, tensor in zip(gradients, inputs):
        if gradient is None:
            owned.append(None)
            continue
        if gradient.layout != torch.strided:
            gradient = gradient.to_dense()
        pointer = gradient.data_ptr()
        if not gradient.is_contiguous() or pointer in pointers or gradient.shape != tensor.shape:
            gradient = gradient.reshape(tensor.shape).clone(memory_format=torch.contiguous_format)
            pointer = gradient.data_ptr()
        pointers.add(pointer)
        owned.append(gradient)
    return owned


def _as_floats(coefficients: Tensor | Sequence[float]) -> list[float]:
    if isinstance(coefficients, Tensor):
        return [float(v) for v in coefficients.detach().reshape(-1).tolist()]
    return [float(v) for v in coefficients]
