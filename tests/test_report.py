"""Tests of the run report and the balancer comparison: plotted series, PNG files and tables."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib
import pytest

from multitune.report import (
    comparison_figure,
    comparison_markdown,
    plot_run,
    run_figures,
    summarize_comparison,
    write_comparison,
    write_run_report,
)
from multitune.training import results_markdown

matplotlib.use("Agg")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(with_grad_norms: bool) -> list[dict]:
    rows = []
    for step in (10, 20, 30):
        row = {
            "type": "train",
            "step": step,
            "losses": {"a": 1.0 / step, "b": 2.0 / step},
            "weights": {"a": 1.0 + step / 100, "b": 1.0 - step / 100},
        }
        if with_grad_norms:
            row["grad_norms"] = {"a": 0.5 * step, "b": 0.25 * step}
        rows.append(row)
    rows.append({"type": "eval", "step": 20, "primary": {"a": 0.6, "b": 3.0}, "metrics": {}})
    rows.append({"type": "eval", "step": 30, "primary": {"a": 0.7, "b": 2.5}, "metrics": {}})
    return rows


def _results() -> dict:
    return {
        "step": 30,
        "balancer": "gradnorm",
        "tasks": {
            "a": {
                "kind": "classification", "primary_metric": "macro_f1", "higher_is_better": True,
                "metrics": {"macro_f1": 0.7, "accuracy": 0.8}, "baseline": {"macro_f1": 0.2, "accuracy": 0.5},
                "beats_baseline": True, "num_train": 100, "num_eval": 20, "eval_loss": 0.5,
            },
            "b": {
                "kind": "regression", "primary_metric": "rmse", "higher_is_better": False,
                "metrics": {"rmse": 2.5}, "baseline": {"rmse": 2.0},
                "beats_baseline": False, "num_train": 50, "num_eval": 10, "eval_loss": 1.5,
            },
        },
    }


def _lines(figure) -> dict[str, tuple[list[float], list[float]]]:
    axis = figure.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()}


def test_figures_hold_the_logged_series() -> None:
    figures = run_figures(_rows(with_grad_norms=True), _results())
    assert set(figures) == {"training_loss", "balancer_weights", "grad_norms", "eval_metrics"}

    losses = _lines(figures["training_loss"])
    assert losses["a"] == ([10, 20, 30], [0.1, 0.05, 1 / 30])
    assert losses["b"] == ([10, 20, 30], [0.2, 0.1, 2 / 30])
    assert figures["training_loss"].axes[0].get_yscale() == "log"

    weights = _lines(figures["balancer_weights"])
    assert weights["a"][1] == pytest.approx([1.1, 1.2, 1.3])
    assert weights["b"][1] == pytest.approx([0.9, 0.8, 0.7])

    norms = _lines(figures["grad_norms"])
    assert norms["a"][1] == [5.0, 10.0, 15.0]


def test_eval_figure_draws_baseline() -> None:
    figure = run_figures(_rows(with_grad_norms=False), _results())["eval_metrics"]
    first, second = figure.axes[0], figure.axes[1]
    assert first.get_title() == "a: macro_f1"
    model_line, baseline_line = first.get_lines()
    assert list(model_line.get_ydata()) == [0.6, 0.7]
    assert list(baseline_line.get_ydata()) == [0.2, 0.2]
    assert second.get_title() == "b: rmse"


def test_no_grad_norm_figure_without_norms() -> None:
    assert "grad_norms" not in run_figures(_rows(with_grad_norms=False), None)


def test_plot_run_writes_pngs(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _rows(with_grad_norms=True)))
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    paths = plot_run(tmp_path)

    assert sorted(path.name for path in paths) == ["balancer_weights.png", "eval_metrics.png", "grad_norms.png", "training_loss.png"]
    for path in paths:
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE), path
        assert len(content) > 5_000, path


def test_run_report_links_plots_and_table(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _rows(with_grad_norms=False)))
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    report = write_run_report(tmp_path).read_text()
    assert "![training_loss](plots/training_loss.png)" in report
    assert "| a | classification | 100 | 20 | macro_f1 ↑ | 0.7000 | 0.2000 | yes |" in report
    assert "| b | regression | 50 | 10 | rmse ↓ | 2.5000 | 2.0000 | NO |" in report


def test_plot_run_without_metrics(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl rows"):
        plot_run(tmp_path)


def test_results_markdown_lists_every_metric() -> None:
    text = results_markdown(_results())
    assert "| a | accuracy | 0.8000 | 0.5000 |" in text
    assert "| b | loss | 1.5000 | |" in text


def _run_results(a: float, b: float) -> dict:
    results = _results()
    results["tasks"]["a"]["metrics"] = {"macro_f1": a}
    results["tasks"]["b"]["metrics"] = {"rmse": b}
    return results


def test_comparison_summary_statistics() -> None:
    runs = {
        "equal": {0: _run_results(0.5, 3.0), 1: _run_results(0.7, 2.0)},
        "gradnorm": {0: _run_results(0.6, 2.0), 1: _run_results(0.8, 1.0)},
    }
    deltas = {"equal": {0: 0.0, 1: 0.0}, "gradnorm": {0: -26.67, 1: -39.29}}
    summary = summarize_comparison(runs, delta_m=deltas, delta_m_reference="the 'equal' run of the same seed")

    gradnorm = summary["balancers"]["gradnorm"]
    assert gradnorm["tasks"]["a"]["mean"] == pytest.approx(0.7)
    assert gradnorm["tasks"]["a"]["std"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert gradnorm["delta_m"]["mean"] == pytest.approx((-26.67 - 39.29) / 2)
    assert summary["tasks"]["b"] == {"metric": "rmse", "higher_is_better": False, "baseline": 2.0}
    assert summary["seeds"] == [0, 1]

    table = comparison_markdown(summary)
    assert "| balancer | a macro_f1 | b rmse | Δm% (lower is better) |" in table
    assert f"| gradnorm | 0.7000 ± {statistics.stdev([0.6, 0.8]):.4f} | 1.5000 ± {statistics.stdev([2.0, 1.0]):.4f} |" in table
    assert "| constant baseline | 0.2000 | 2.0000 |  |" in table


def test_comparison_figure_panels(tmp_path: Path) -> None:
    runs = {"equal": {0: _run_results(0.5, 3.0)}, "pcgrad": {0: _run_results(0.6, 2.0)}}
    summary = summarize_comparison(runs, delta_m={"equal": {0: 0.0}, "pcgrad": {0: -20.0}}, delta_m_reference="x")
    figure = comparison_figure(summary)
    titles = [axis.get_title() for axis in figure.axes if axis.get_visible()]
    assert titles == ["a: macro_f1", "b: rmse", "Δm% (lower is better)"]
    heights = [patch.get_height() for patch in figure.axes[0].patches]
    assert heights == [0.5, 0.6]

    markdown, image = write_comparison(summary, tmp_path)
    assert image.read_bytes().startswith(PNG_SIGNATURE)
    assert "| pcgrad | 0.6000 | 2.0000 | -20.0000 |" in markdown.read_text()


def test_comparison_with_undefined_delta() -> None:
    runs = {"equal": {0: _run_results(0.5, 3.0)}}
    summary = summarize_comparison(runs, delta_m={"equal": {0: None}}, delta_m_reference="x")
    assert math.isnan(summary["balancers"]["equal"]["delta_m"]["mean"])
    assert "| equal | 0.5000 | 3.0000 | n/a |" in comparison_markdown(summary)
