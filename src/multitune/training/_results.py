"""The final results of a run: ``results.json`` and the markdown table ``results.md``.

Structure of ``results.json``::

    {
      "step": 300, "balancer": "task_normalization", "seed": 0,
      "delta_m": -3.2 | null,            # Δm% against config baselines (lower is better)
      "best_checkpoint": "checkpoint-300" | null, "best_metric": ... | null,
      "tasks": {
        "<task>": {
          "kind": "classification", "primary_metric": "macro_f1", "higher_is_better": true,
          "metrics": {...}, "eval_loss": 0.41,
          "baseline": {...},             # constant predictor fitted on train: majority class or mean
          "beats_baseline": true, "num_train": 1000, "num_eval": 200
        }
      }
    }
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multitune.training._checkpoint import atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def json_safe(value: Any) -> Any:
    """Return ``value`` with NaN and infinite floats replaced by None, in nested mappings and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def beats_baseline(value: float | None, baseline: float | None, higher_is_better: bool) -> bool | None:
    """Return whether ``value`` is strictly better than ``baseline``; None when either is missing."""
    if value is None or baseline is None or not math.isfinite(value) or not math.isfinite(baseline):
        return None
    return value > baseline if higher_is_better else value < baseline


def write_results(run_dir: Path, results: Mapping[str, Any]) -> None:
    """Write ``results.json`` and ``results.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / RESULTS_JSON, json.dumps(json_safe(dict(results)), indent=2, sort_keys=False) + "\n")
    atomic_write_text(run_dir / RESULTS_MD, results_markdown(results))


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """Return the parsed ``results.json`` of ``run_dir``, or None when the run has not written one."""
    path = Path(run_dir) / RESULTS_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4f}"
    return str(value)


def results_markdown(results: Mapping[str, Any]) -> str:
    """Return the per-task results table: primary metric next to its constant baseline, then every metric."""
    tasks: Mapping[str, Any] = results.get("tasks", {})
    lines = [
        f"## Results at step {results.get('step')} (balancer: {results.get('balancer')})",
        "",
        "| task | kind | train | eval | metric | model | baseline | beats baseline |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for name, info in tasks.items():
        if "primary_metric" not in info:
            lines.append(f"| {name} | {info.get('kind')} | {info.get('num_train', '')} | 0 | no eval split | | | n/a |")
            continue
        metric = info["primary_metric"]
        arrow = "↑" if info.get("higher_is_better", True) else "↓"
        value = info.get("metrics", {}).get(metric)
        baseline = (info.get("baseline") or {}).get(metric)
        verdict = {True: "yes", False: "NO", None: "n/a"}[info.get("beats_baseline")]
        lines.append(
            f"| {name} | {info.get('kind')} | {info.get('num_train', '')} | {info.get('num_eval', '')} | "
            f"{metric} {arrow} | {_cell(value)} | {_cell(baseline)} | {verdict} |"
        )
    lines.append("")
    lines.append(
        "Baseline: a constant predictor fitted on the training labels (majority class, majority "
        "per label, or the mean target), scored on the same eval split."
    )
    if results.get("delta_m") is not None:
        lines.append("")
        lines.append(f"Δm% against the configured baselines: {_cell(results['delta_m'])} (lower is better).")
    if results.get("best_checkpoint"):
        lines.append("")
        lines.append(f"Best checkpoint: {results['best_checkpoint']} ({results.get('best_metric_name')} = {_cell(results.get('best_metric'))}).")

    lines.extend(["", "### All eval metrics", "", "| task | metric | model | baseline |", "|---|---|---:|---:|"])
    for name, info in tasks.items():
        baseline = info.get("baseline") or {}
        for metric, value in info.get("metrics", {}).items():
            lines.append(f"| {name} | {metric} | {_cell(value)} | {_cell(baseline.get(metric))} |")
        if info.get("eval_loss") is not None:
            lines.append(f"| {name} | loss | {_cell(info['eval_loss'])} | |")
    return "\n".join(lines) + "\n"
