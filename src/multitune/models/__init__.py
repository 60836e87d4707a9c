"""The multi-task model: a shared backbone, task heads, pooling, LoRA and the last shared layer."""

from multitune.models._backbones import LoraSpec
from multitune.models._heads import (
    ClassificationHead,
    HeadSpec,
    MultilabelHead,
    RegressionHead,
    TaskHead,
    TokenClassificationHead,
    build_head,
)
from multitune.models._model import MultiTaskModel, TaskHeads
from multitune.models._pooling import POOLING_MODES, Features, Pooling, cls_pool, mean_pool, pool
from multitune.models._serialization import is_saved_model
from multitune.models._shared_layers import detect_last_shared_parameters

__all__ = [
    "POOLING_MODES",
    "ClassificationHead",
    "Features",
    "HeadSpec",
    "LoraSpec",
    "MultiTaskModel",
    "MultilabelHead",
    "Pooling",
    "RegressionHead",
    "TaskHead",
    "TaskHeads",
    "TokenClassificationHead",
    "build_head",
    "cls_pool",
    "detect_last_shared_parameters",
    "is_saved_model",
    "mean_pool",
    "pool",
]
