"""The ``multitune`` command line: train, evaluate, predict, report, compare and demo.

Errors that a user can fix (an invalid config, a missing file, bad data) print one line on
stderr and exit with status 2; ``--debug`` shows the traceback instead.

The command sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: PyTorch's CPU
threads then sleep between parallel regions instead of spinning. On a CPU shared with other
busy processes, spinning threads burn the time slices the computing threads need. One measurement
(the demo's training step, 2 threads, 2 cores with about 5 other runnable processes) took
24.8 s with spinning and 3.1 s without.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

EXIT_USAGE = 2

# Exceptions whose message is the whole story for a user: a config, file or data problem.
_USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, ValueError, KeyError, ModuleNotFoundError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitune", description="Multi-task training of one shared model with loss balancing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only, and hide the progress bar")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a config")
    train.add_argument("config", type=Path, help="YAML config file")
    _add_set(train)
    train.add_argument("--resume", action="store_true", help="continue the run from its latest complete checkpoint")

    evaluate = commands.add_parser("evaluate", help="score a finished run on its tasks' eval splits")
    evaluate.add_argument("run_dir", type=Path, help="run folder (training.output_dir of the run)")

    predict = commands.add_parser("predict", help="predict one task's outputs for the rows of a file")
    predict.add_argument("run_dir", type=Path, help="run folder")
    predict.add_argument("--task", required=True, help="task name")
    predict.add_argument("file", type=Path, help="CSV, TSV, JSON Lines or Parquet file with the task's input columns")
    predict.add_argument("--output", type=Path, default=None, help="JSON Lines output file (default: stdout)")

    report = commands.add_parser("report", help="write the plots and report.md of a run")
    report.add_argument("run_dir", type=Path, help="run folder")

    compare = commands.add_parser("compare", help="train a config with several balancers and seeds, then compare")
    compare.add_argument("config", type=Path, help="YAML config file")
    compare.add_argument("--balancers", required=True, help="comma-separated balancer names, e.g. equal,gradnorm,task_normalization")
    compare.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    _add_set(compare)

    demo = commands.add_parser("demo", help="build the demo data, train the embedded config and report")
    demo.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="folder for the data, the config and the run (default: runs/demo)")
    demo.add_argument("--config", choices=("demo", "multidigits"), default="demo", help="embedded config: demo (MiniLM, five text tasks) or multidigits (MLP, seconds)")
    demo.add_argument("--quick", action="store_true", help="same as --config multidigits")
    demo.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    _add_set(demo)
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value), e.g. --set training.max_steps=20; repeatable",
    )


def _configure_logging(verbose: bool, quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    # Without a terminal (a log file, a pipe) rich would wrap every line at 80 columns, so plain
    # one-line records with a timestamp are written instead.
    interactive = sys.stderr.isatty()
    if interactive:
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[handler], force=True)
    else:
        handler = logging.StreamHandler(sys.stderr)
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S", handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "datasets", "transformers", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if quiet or not interactive:
        # Redrawn bars of the datasets library would fill a log file with carriage returns.
        _disable_library_progress_bars()


def _disable_library_progress_bars() -> None:
    """Hide the progress bars of datasets (encoding) and transformers (weight loading)."""
    try:
        import datasets
        from transformers.utils import logging as transformers_logging
    except ModuleNotFoundError:
        return
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _user_message(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error) or type(error).__name__


# Tables --------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def results_table(results: Mapping[str, Any], title: str | None = None) -> Table:
    """Return a rich table of a run's ``results.json``: each task's primary metric next to its constant baseline."""
    table = Table(title=title or f"Results at step {results.get('step')} (balancer: {results.get('balancer')})")
    for column, justify in (("task", "left"), ("kind", "left"), ("train", "right"), ("eval", "right"), ("metric", "left"), ("model", "right"), ("baseline", "right"), ("beats baseline", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, info in results.get("tasks", {}).items():
        if "primary_metric" not in info:
            continue
        metric = info["primary_metric"]
        arrow = "↑" if info.get("higher_is_better", True) else "↓"
        verdict = {True: "yes", False: "[red]NO[/red]", None: "n/a"}[info.get("beats_baseline")]
        table.add_row(
            name, info["kind"], str(info.get("num_train", "")), str(info.get("num_eval", "")), f"{metric} {arrow}",
            _cell(info["metrics"].get(metric)), _cell((info.get("baseline") or {}).get(metric)), verdict,
        )
    return table


def comparison_table(summary: Mapping[str, Any]) -> Table:
    """Return a rich table with one row per balancer: each task's primary metric (mean ± std over seeds) and Δm%."""
    tasks = list(summary["tasks"])
    seeds = ", ".join(str(seed) for seed in summary["seeds"])
    table = Table(title=f"Balancer comparison (seeds: {seeds})")
    table.add_column("balancer")
    for task in tasks:
        info = summary["tasks"][task]
        arrow = "↑" if info["higher_is_better"] else "↓"
        table.add_column(f"{task}\n{info['metric']} {arrow}", justify="right")
    table.add_column("Δm% ↓", justify="right")
    for name, info in summary["balancers"].items():
        cells = [name]
        for task in tasks:
            stats = info["tasks"][task]
            cells.append(_mean_std(stats["mean"], stats["std"], info["num_runs"]))
        cells.append(_mean_std(info["delta_m"]["mean"], info["delta_m"]["std"], info["num_runs"], signed=True))
        table.add_row(*cells)
    baseline_cells = ["constant baseline", *[_cell(summary["tasks"][task]["baseline"]) for task in tasks], ""]
    table.add_row(*baseline_cells, style="dim")
    table.caption = f"Δm% reference: {summary['delta_m_reference']} (lower is better)"
    return table


def _mean_std(mean: float, std: float, count: int, *, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean:+.2f}" if signed else f"{mean:.4f}"
    if count > 1 and math.isfinite(std):
        text += f" ± {std:.2f}" if signed else f" ± {std:.4f}"
    return text


# Commands ------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace, console: Console) -> int:
    from multitune.config import load_config
    from multitune.distributed import get_rank, init_from_environment, shutdown
    from multitune.report import write_run_report
    from multitune.training import Trainer

    config = load_config(args.config, args.overrides)
    if os.environ.get("RANK", "0") != "0":
        # Rank 0 logs and writes for the whole run; the other ranks report only problems.
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    owns_process_group = init_from_environment(use_cpu=config.training.use_cpu)
    rank = get_rank()
    try:
        output = Trainer(config, show_progress=not args.quiet and not config.training.disable_progress_bar).train(resume=args.resume)
    except KeyboardInterrupt:
        from multitune.training import latest_checkpoint

        # The interrupt message in main() offers --resume only when there is something to resume.
        args.resumable = latest_checkpoint(Path(config.training.output_dir)) is not None
        raise
    finally:
        if owns_process_group:
            shutdown()
    if rank != 0:
        return 0

    console.print(results_table(output.results))
    try:
        report = write_run_report(output.run_dir)
    except ModuleNotFoundError as error:
        # The run itself succeeded; only the plots need matplotlib.
        logger.warning("plots skipped: %s (pip install matplotlib, then run multitune report %s)", error, output.run_dir)
        report = output.run_dir / "results.md"
    console.print(f"run folder: {output.run_dir}  report: {report}")
    return 0


def _evaluate(args: argparse.Namespace, console: Console) -> int:
    from multitune.training._results import beats_baseline
    from multitune.training._run import evaluate_run, load_run

    run = load_run(args.run_dir)
    scored = evaluate_run(run)
    tasks = {}
    for name, (evaluation, baseline) in scored.items():
        tasks[name] = {
            "kind": run.tasks[name].kind,
            "num_train": len(run.tasks[name].train),
            "num_eval": evaluation.num_examples,
            "primary_metric": evaluation.primary_metric,
            "higher_is_better": evaluation.higher_is_better,
            "metrics": evaluation.metrics,
            "eval_loss": evaluation.loss,
            "baseline": baseline,
            "beats_baseline": beats_baseline(evaluation.primary, baseline.get(evaluation.primary_metric), evaluation.higher_is_better),
        }
    results = {"balancer": run.config.balancer.name, "tasks": tasks}
    console.print(results_table(results, title=f"Evaluation of {args.run_dir}"))
    return 0


def _predict(args: argparse.Namespace, console: Console) -> int:
    from multitune.training._run import json_line, load_run, predict_rows

    output = Path(args.output) if args.output is not None else None
    if output is not None:
        if output.is_dir():
            raise ValueError(f"--output {output} is a folder; give a file name such as {output / 'predictions.jsonl'}")
        output.parent.mkdir(parents=True, exist_ok=True)

    # The model comes from the run folder alone; the training data need not exist any more.
    run = load_run(args.run_dir, load_data=False)
    rows = predict_rows(run, args.task, args.file)
    if output is None:
        count = 0
        for row in rows:
            sys.stdout.write(json_line(row) + "\n")
            count += 1
        logger.info("wrote %d predictions", count)
        return 0

    # Written under a temporary name and renamed at the end, so a failed run leaves any earlier
    # output file as it was.
    partial = output.with_name(output.name + ".tmp")
    count = 0
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json_line(row) + "\n")
                count += 1
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %d predictions to %s", count, output)
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from multitune.report import write_run_report
    from multitune.training import read_results

    report = write_run_report(args.run_dir)
    results = read_results(args.run_dir)
    if results is not None:
        console.print(results_table(results))
    console.print(f"report: {report}")
    return 0


def _parse_list(text: str, *, name: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"--{name} is empty; give a comma-separated list")
    return items


def _compare(args: argparse.Namespace, console: Console) -> int:
    from multitune.config import load_config
    from multitune.report import summarize_comparison, write_comparison
    from multitune.training._compare import compare_balancers

    balancers = _parse_list(args.balancers, name="balancers")
    try:
        seeds = [int(seed) for seed in _parse_list(args.seeds, name="seeds")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    config = load_config(args.config, args.overrides)
    comparison = compare_balancers(config, balancers, seeds, show_progress=not args.quiet)
    summary = summarize_comparison(comparison.runs, delta_m=comparison.delta_m, delta_m_reference=comparison.reference)
    markdown, image = write_comparison(summary, comparison.output_dir)
    console.print(comparison_table(summary))
    console.print(f"comparison: {markdown}  plot: {image}")
    return 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    from multitune.demo import run_demo

    name = "multidigits" if args.quick else args.config
    output = run_demo(args.output_dir, config=name, max_steps=args.max_steps, overrides=args.overrides, show_progress=not args.quiet)
    console.print(results_table(output.results))
    console.print(f"run folder: {output.run_dir}  report: {output.run_dir / 'report.md'}  plots: {output.run_dir / 'plots'}")
    return 0


_COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "predict": _predict,
    "report": _report,
    "compare": _compare,
    "demo": _demo,
}


def _interrupt_on_sigterm() -> Any:
    """Handle SIGTERM (how job schedulers and torchrun stop a process) like Ctrl-C; return the previous handler.

    The interrupt unwinds the command, so temporary files are removed and the exit status is 130.
    Returns ``None`` outside the main thread, where Python cannot set signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _reject_launcher_for(command: str) -> None:
    """Raise when a launcher such as torchrun started several processes of a command other than ``train``."""
    from multitune.distributed import launched_world_size

    if command != "train" and launched_world_size() > 1:
        raise ValueError(
            f"multitune {command} runs in one process, but WORLD_SIZE={launched_world_size()} is set by a "
            "launcher; run it without torchrun (only multitune train runs distributed)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``multitune`` command line and return its exit status."""
    # Read by OpenMP when PyTorch loads, so it has no effect once torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    # Rich wraps tables at 80 columns when stdout is not a terminal; 120 keeps a results row on one line.
    console = Console(width=None if sys.stdout.isatty() else 120)
    from multitune.config import ConfigError
    from multitune.data import DataError

    previous_sigterm = _interrupt_on_sigterm()
    try:
        _reject_launcher_for(args.command)
        return _COMMANDS[args.command](args, console)
    except (ConfigError, DataError) as error:
        if args.debug:
            raise
        print(f"multitune: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except _USER_ERRORS as error:
        if args.debug:
            raise
        print(f"multitune: error: {_user_message(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train":
            if getattr(args, "resumable", True):
                hint = "; resume with --resume from the last complete checkpoint"
            else:
                hint = " before the first checkpoint; start the run again without --resume"
        print(f"multitune: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
