"""Loss balancing: methods that turn per-task losses into one total loss (or one gradient)."""

from ._base import Balancer, NonFiniteLossError, ReduceFn
from ._registry import available_balancers, build_balancer, get_balancer_class, register_balancer

__all__ = [
    "Balancer",
    "NonFiniteLossError",
    "ReduceFn",
    "available_balancers",
    "build_balancer",
    "get_balancer_class",
    "register_balancer",
]
