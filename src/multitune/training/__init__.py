"""The multi-task trainer, its checkpoints, logs and results."""

from multitune.training._build import build_model, build_run_balancer, head_spec, load_run_tasks, load_tokenizer
from multitune.training._checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from multitune.training._compare import Comparison, compare_balancers
from multitune.training._evaluation import TaskEvaluation, constant_baseline, evaluate_task
from multitune.training._logging import METRICS_FILE, MetricsLogger, read_metrics
from multitune.training._results import RESULTS_JSON, RESULTS_MD, read_results, results_markdown, write_results
from multitune.training._run import LoadedRun, evaluate_run, load_run, predict_rows
from multitune.training._trainer import CONFIG_FILE, MODEL_DIR, Trainer, TrainOutput, set_seed

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_DIR",
    "RESULTS_JSON",
    "RESULTS_MD",
    "Comparison",
    "LoadedRun",
    "MetricsLogger",
    "TaskEvaluation",
    "TrainOutput",
    "Trainer",
    "build_model",
    "build_run_balancer",
    "compare_balancers",
    "constant_baseline",
    "evaluate_run",
    "evaluate_task",
    "head_spec",
    "latest_checkpoint",
    "list_checkpoints",
    "load_run",
    "load_run_tasks",
    "load_tokenizer",
    "predict_rows",
    "read_metrics",
    "read_results",
    "results_markdown",
    "save_checkpoint",
    "set_seed",
    "write_results",
]
