"""Loss balancing: methods that turn per-task losses into one total loss (or one gradient)."""

from ._base import Balancer, NonFiniteLossError, ReduceFn
from ._registry import available_balancers, build_balancer, get_balancer_class, register_balancer
from ._aligned_mtl import AlignedMTL
from ._cagrad import CAGrad
from ._dwa import DWA
from ._famo import FAMO
from ._gls import GeometricMean
from ._graddrop import GradDrop
from ._gradient_base import GradientBalancer
from ._gradnorm import GradNorm
from ._gradvac import GradVac
from ._imtl_g import IMTLG
from ._imtl_l import IMTLL
from ._mgda import MGDA, MGDAUB
from ._nash_mtl import NashMTL
from ._pcgrad import PCGrad
from ._rlw import RLW
from ._scale_invariant import ScaleInvariant
from ._task_normalization import TaskNormalization
from ._uncertainty import UncertaintyWeighting
from ._upgrad import UPGrad
from ._weighting import EqualWeighting, StaticWeighting

__all__ = [
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "DWA",
    "EqualWeighting",
    "FAMO",
    "GeometricMean",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientBalancer",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "MGDAUB",
    "NashMTL",
    "NonFiniteLossError",
    "PCGrad",
    "RLW",
    "ReduceFn",
    "ScaleInvariant",
    "StaticWeighting",
    "TaskNormalization",
    "UPGrad",
    "UncertaintyWeighting",
    "available_balancers",
    "build_balancer",
    "get_balancer_class",
    "register_balancer",
]
