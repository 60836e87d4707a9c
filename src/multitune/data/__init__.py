"""Task data for multi-task runs: task specifications, loading and encoding, collation and task mixing.

A :class:`TaskSpec` names a task's sources and columns; :func:`load_task` and :func:`load_tasks`
read and encode them into :class:`TaskData`; :class:`MultiTaskLoader` mixes the tasks into
training steps following a :class:`MixingSpec` (the probabilities come from
:func:`task_probabilities`, the example indices from :class:`MultiTaskSampler`); and
:func:`eval_batches` gives ordered evaluation batches.
"""

from ._collate import TaskCollator, TaskTensors
from ._encoding import align_word_labels
from ._errors import DataError
from ._labels import IGNORE_INDEX
from ._load import TaskData, load_task, load_tasks, select_rows
from ._loader import LoaderStep, MultiTaskBatch, MultiTaskLoader, TaskBatch, eval_batches
from ._mixing import (
    STRATEGIES,
    MixingSpec,
    MixingStage,
    annealed_probabilities,
    annealing_alpha,
    proportional_probabilities,
    task_probabilities,
    temperature_probabilities,
    uniform_probabilities,
    weight_probabilities,
)
from ._sampler import HomogeneousStep, MixedStep, MultiTaskSampler
from ._tasks import TASK_KINDS, DatasetSource, TaskKind, TaskSpec

__all__ = [
    "DataError",
    "DatasetSource",
    "HomogeneousStep",
    "IGNORE_INDEX",
    "LoaderStep",
    "MixedStep",
    "MixingSpec",
    "MixingStage",
    "MultiTaskBatch",
    "MultiTaskLoader",
    "MultiTaskSampler",
    "STRATEGIES",
    "TASK_KINDS",
    "TaskBatch",
    "TaskCollator",
    "TaskData",
    "TaskKind",
    "TaskSpec",
    "TaskTensors",
    "align_word_labels",
    "annealed_probabilities",
    "annealing_alpha",
    "eval_batches",
    "load_task",
    "load_tasks",
    "proportional_probabilities",
    "select_rows",
    "task_probabilities",
    "temperature_probabilities",
    "uniform_probabilities",
    "weight_probabilities",
]
