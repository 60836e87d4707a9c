"""Plots and markdown summaries of finished runs and of balancer comparisons.

A run folder contains ``metrics.jsonl`` (written by the trainer) and ``results.json``.
:func:`write_run_report` reads them and writes, next to them,

- ``plots/training_loss.png``: per-task training loss over optimizer steps (log scale);
- ``plots/balancer_weights.png``: the balancer's per-task weights;
- ``plots/grad_norms.png``: per-task gradient norms, for balancers that report them (GradNorm);
- ``plots/eval_metrics.png``: each task's primary eval metric over steps, with its
  majority-class or mean-prediction baseline as a dashed line;
- ``report.md``: the results table and the plots.

Figures are drawn with matplotlib's non-interactive Agg backend, so no display is needed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitune.training._logging import read_metrics
from multitune.training._results import read_results, results_markdown

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows: Sequence[Mapping[str, Any]], row_type: str, field: str) -> dict[str, tuple[list[int], list[float]]]:
    """Return ``{task: (steps, values)}`` from the per-task mapping ``field`` of rows of ``row_type``."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        if row.get("type") != row_type:
            continue
        values = row.get(field) or {}
        for task, value in values.items():
            if value is None or isinstance(value, Mapping):
                continue
            steps, points = series.setdefault(task, ([], []))
            steps.append(int(row["step"]))
            points.append(float(value))
    return series


def _line_figure(series: Mapping[str, tuple[list[int], list[float]]], *, title: str, ylabel: str, log_scale: bool = False) -> Figure:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    for task, (steps, values) in series.items():
        axis.plot(steps, values, label=task, linewidth=1.4)
    axis.set_title(title)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(ylabel)
    if log_scale and all(value > 0 for _, values in series.values() for value in values):
        axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small", loc="best")
    figure.tight_layout()
    return figure


def _eval_figure(rows: Sequence[Mapping[str, Any]], results: Mapping[str, Any] | None) -> Figure | None:
    plt = _pyplot()
    primary = _series(rows, "eval", "primary")
    if not primary:
        return None
    tasks = list(primary)
    columns = min(3, len(tasks))
    lines = math.ceil(len(tasks) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
    task_results = (results or {}).get("tasks", {})
    for index, task in enumerate(tasks):
        axis = axes[index // columns][index % columns]
        steps, values = primary[task]
        info = task_results.get(task, {})
        metric = info.get("primary_metric", "primary metric")
        axis.plot(steps, values, marker="o", markersize=3, label="model")
        baseline = (info.get("baseline") or {}).get(metric)
        if baseline is not None and math.isfinite(baseline):
            axis.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="baseline")
        axis.set_title(f"{task}: {metric}", fontsize="medium")
        axis.set_xlabel("optimizer step")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="x-small", loc="best")
    for index in range(len(tasks), lines * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.tight_layout()
    return figure


def run_figures(rows: Sequence[Mapping[str, Any]], results: Mapping[str, Any] | None = None) -> dict[str, Figure]:
    """Return the figures of a run by file stem; figures without data (no grad norms, no eval) are left out."""
    figures: dict[str, Figure] = {}
    losses = _series(rows, "train", "losses")
    if losses:
        figures["training_loss"] = _line_figure(losses, title="Training loss per task", ylabel="loss", log_scale=True)
    weights = _series(rows, "train", "weights")
    if weights:
        figures["balancer_weights"] = _line_figure(weights, title="Balancer weights", ylabel="weight")
    grad_norms = _series(rows, "train", "grad_norms")
    if grad_norms:
        figures["grad_norms"] = _line_figure(grad_norms, title="Per-task gradient norms", ylabel="gradient norm", log_scale=True)
    evaluation = _eval_figure(rows, results)
    if evaluation is not None:
        figures["eval_metrics"] = evaluation
    return figures


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNG plots of a run to ``<run_dir>/plots`` and return their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl rows found; is this a multitune run folder?")
    results = read_results(run_dir)

    plt = _pyplot()
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, figure in run_figures(rows, results).items():
        path = out / f"{stem}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    logger.info("wrote %d plots to %s", len(paths), out)
    return paths


def write_run_report(run_dir: str | Path) -> Path:
    """Write the plots and ``report.md`` (results table and plots) of a run; return the report's path."""
    run_dir = Path(run_dir)
    paths = plot_run(run_dir)
    results = read_results(run_dir)
    parts = [f"# Run report: {run_dir.name}\n"]
    if results is not None:
        parts.append(results_markdown(results))
    else:
        parts.append("No results.json yet: the run has not finished.\n")
    for path in paths:
        parts.append(f"\n![{path.stem}]({PLOTS_DIR}/{path.name})\n")
    report = run_dir / "report.md"
    report.write_text("\n".join(parts), encoding="utf-8")
    return report


# Comparison of balancers ---------------------------------------------------------------------------


def _mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [value for value in values if value is not None and math.isfinite(value)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in finite) / (len(finite) - 1)
    return mean, math.sqrt(variance)


def comparison_figure(summary: Mapping[str, Any]) -> Figure:
    """Draw one panel per task (primary metric by balancer, mean ± std over seeds) and one for Δm%."""
    plt = _pyplot()
    balancers = list(summary["balancers"])
    tasks = list(summary["tasks"])
    panels = len(tasks) + 1
    columns = min(3, panels)
    lines = math.ceil(panels / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.3 * lines), squeeze=False)
    positions = list(range(len(balancers)))

    for index, task in enumerate(tasks):
        axis = axes[index // columns][index % columns]
        info = summary["tasks"][task]
        means = [summary["balancers"][name]["tasks"][task]["mean"] for name in balancers]
        stds = [summary["balancers"][name]["tasks"][task]["std"] for name in balancers]
        axis.bar(positions, means, yerr=stds, capsize=3, color="tab:blue")
        if info.get("baseline") is not None and math.isfinite(info["baseline"]):
            axis.axhline(info["baseline"], color="grey", linestyle="--", linewidth=1)
        axis.set_title(f"{task}: {info['metric']}", fontsize="medium")
        axis.set_xticks(positions, balancers, rotation=30, ha="right", fontsize="small")

    axis = axes[len(tasks) // columns][len(tasks) % columns]
    deltas = [summary["balancers"][name]["delta_m"]["mean"] for name in balancers]
    errors = [summary["balancers"][name]["delta_m"]["std"] for name in balancers]
    axis.bar(positions, [0.0 if math.isnan(d) else d for d in deltas], yerr=[0.0 if math.isnan(e) else e for e in errors], capsize=3, color="tab:orange")
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_title("Δm% (lower is better)", fontsize="medium")
    axis.set_xticks(positions, balancers, rotation=30, ha="right", fontsize="small")
    for index in range(panels, lines * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.tight_layout()
    return figure


def comparison_markdown(summary: Mapping[str, Any]) -> str:
    """Return the comparison table: rows are balancers, columns each task's primary metric and Δm%."""
    tasks = list(summary["tasks"])
    header = ["balancer", *[f"{task} {summary['tasks'][task]['metric']}" for task in tasks], "Δm% (lower is better)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baseline_cells = ["constant baseline"]
    for task in tasks:
        value = summary["tasks"][task].get("baseline")
        baseline_cells.append("" if value is None else _format(value))
    baseline_cells.append("")
    for name, info in summary["balancers"].items():
        cells = [name]
        for task in tasks:
            stats = info["tasks"][task]
            cells.append(_format_mean_std(stats["mean"], stats["std"], info["num_runs"]))
        cells.append(_format_mean_std(info["delta_m"]["mean"], info["delta_m"]["std"], info["num_runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| " + " | ".join(baseline_cells) + " |")
    note = summary.get("delta_m_reference", "")
    seeds = ", ".join(str(seed) for seed in summary.get("seeds", []))
    return (
        "# Balancer comparison\n\n"
        + "\n".join(lines)
        + f"\n\nSeeds: {seeds}. Values are mean ± standard deviation over seeds. Δm% reference: {note}.\n"
    )


def _format(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _format_mean_std(mean: float, std: float, count: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if count < 2:
        return _format(mean)
    return f"{_format(mean)} ± {_format(std)}"


def summarize_comparison(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
    *,
    delta_m: Mapping[str, Mapping[int, float | None]],
    delta_m_reference: str,
) -> dict[str, Any]:
    """Aggregate per-run results into the structure :func:`comparison_markdown` and :func:`comparison_figure` draw.

    Args:
        runs: ``{balancer: {seed: results}}``, each ``results`` as in ``results.json``.
        delta_m: ``{balancer: {seed: Δm%}}``.
        delta_m_reference: what Δm% compares against, for the table's note.
    """
    first = next(iter(next(iter(runs.values())).values()))
    tasks: dict[str, Any] = {}
    for task, info in first["tasks"].items():
        if "primary_metric" not in info:
            continue
        metric = info["primary_metric"]
        tasks[task] = {"metric": metric, "higher_is_better": info["higher_is_better"], "baseline": (info.get("baseline") or {}).get(metric)}

    balancers: dict[str, Any] = {}
    seeds: set[int] = set()
    for name, by_seed in runs.items():
        seeds.update(by_seed)
        per_task = {}
        for task, task_info in tasks.items():
            values = [results["tasks"][task]["metrics"].get(task_info["metric"], math.nan) for results in by_seed.values()]
            mean, std = _mean_and_std(values)
            per_task[task] = {"mean": mean, "std": std, "values": values}
        deltas = [value for value in delta_m.get(name, {}).values() if value is not None]
        mean, std = _mean_and_std(deltas)
        balancers[name] = {"tasks": per_task, "delta_m": {"mean": mean, "std": std, "values": deltas}, "num_runs": len(by_seed)}
    return {"tasks": tasks, "balancers": balancers, "seeds": sorted(seeds), "delta_m_reference": delta_m_reference}


def write_comparison(summary: Mapping[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``compare.md`` and ``compare.png`` to ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = output_dir / "compare.md"
    markdown.write_text(comparison_markdown(summary), encoding="utf-8")
    plt = _pyplot()
    figure = comparison_figure(summary)
    image = output_dir / "compare.png"
    figure.savefig(image, dpi=110)
    plt.close(figure)
    return markdown, image
