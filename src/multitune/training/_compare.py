"""Comparison of balancers: the same config trained with each balancer and seed, then one table.

Δm% reference (lower is better): when the config has ``baselines``, each run's Δm% is computed
against them. Otherwise each run is compared, on every task's primary metric, with the run of the
``equal`` balancer that has the same seed (or of the first listed balancer when ``equal`` is not
listed). The reference balancer itself then scores 0.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitune.config import BalancerConfig, Config, check_balancer_builds
from multitune.data import TaskData
from multitune.metrics import delta_m
from multitune.training._trainer import Trainer

logger = logging.getLogger(__name__)

COMPARE_DIR = "compare"
REFERENCE_BALANCER = "equal"


@dataclass
class Comparison:
    """Results of :func:`compare_balancers`: per-run results, Δm% per run and the output folder."""

    output_dir: Path
    runs: dict[str, dict[int, dict[str, Any]]]
    delta_m: dict[str, dict[int, float | None]]
    reference: str


def run_config(config: Config, balancer: str, seed: int, run_dir: Path) -> Config:
    """Return ``config`` with ``balancer`` (keeping its hyper-parameters only when the name matches), ``seed`` and ``run_dir``."""
    hyperparameters = config.balancer.hyperparameters if balancer == config.balancer.name else {}
    balancer_config = BalancerConfig(name=balancer, **hyperparameters)
    check_balancer_builds(balancer_config, list(config.tasks))
    training = config.training.model_copy(update={"seed": seed, "output_dir": str(run_dir)})
    return config.model_copy(update={"balancer": balancer_config, "training": training})


def _primary_values(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    values, directions = {}, {}
    for task, info in results["tasks"].items():
        if "primary_metric" not in info:
            continue
        key = f"{task}/{info['primary_metric']}"
        values[key] = info["metrics"][info["primary_metric"]]
        directions[key] = info["higher_is_better"]
    return values, directions


def relative_delta_m(results: Mapping[str, Any], reference: Mapping[str, Any]) -> float | None:
    """Return Δm% of ``results`` against ``reference`` over every task's primary metric (None when undefined)."""
    values, directions = _primary_values(results)
    references, _ = _primary_values(reference)
    try:
        return delta_m(values, references, directions)
    except (KeyError, ValueError) as error:
        logger.warning("Δm%% is undefined for this run: %s", error)
        return None


def compare_balancers(
    config: Config,
    balancers: Sequence[str],
    seeds: Sequence[int],
    *,
    show_progress: bool = False,
) -> Comparison:
    """Train ``config`` once per balancer and seed under ``<output_dir>/compare/<balancer>-seed<k>``.

    The tasks are loaded once per seed and shared by that seed's runs. An existing run folder of
    the same name is replaced.
    """
    if not balancers:
        raise ValueError("--balancers is empty; give at least one balancer name")
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed")
    root = Path(config.training.output_dir) / COMPARE_DIR
    # Validate every name before the first (possibly long) run.
    configs = {(name, seed): run_config(config, name, seed, root / f"{name}-seed{seed}") for seed in seeds for name in balancers}

    runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in balancers}
    for seed in seeds:
        tasks: dict[str, TaskData] | None = None
        for name in balancers:
            run_conf = configs[(name, seed)]
            run_dir = Path(run_conf.training.output_dir)
            if run_dir.exists():
                shutil.rmtree(run_dir)
            logger.info("compare: training %s with seed %d in %s", name, seed, run_dir)
            trainer = Trainer(run_conf, tasks=tasks, show_progress=show_progress)
            tasks = trainer.tasks
            runs[name][seed] = trainer.train().results

    if config.baselines:
        reference = "the configured baselines"
        deltas = {name: {seed: results.get("delta_m") for seed, results in by_seed.items()} for name, by_seed in runs.items()}
    else:
        reference_name = REFERENCE_BALANCER if REFERENCE_BALANCER in balancers else balancers[0]
        reference = f"the '{reference_name}' run of the same seed"
        deltas = {
            name: {seed: relative_delta_m(results, runs[reference_name][seed]) for seed, results in by_seed.items()}
            for name, by_seed in runs.items()
        }
    return Comparison(output_dir=root, runs=runs, delta_m=deltas, reference=reference)

