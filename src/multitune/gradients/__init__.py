"""Per-task gradient engine: task Jacobians, Gramians and gradient norms for gradient-based balancing."""

from ._accumulator import GradientAccumulator
from ._engine import accumulate_grads, task_gradient_norms, task_gramian, task_jacobian
from ._graph import graph_leaves

__all__ = [
    "GradientAccumulator",
    "accumulate_grads",
    "graph_leaves",
    "task_gradient_norms",
    "task_gramian",
    "task_jacobian",
]
