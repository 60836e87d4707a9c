"""Shared set-up of the MultiDigits run tests: a small data set and configs written next to it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from multitune.demo import config_text
from multitune.demo.datasets import build_multidigits

TRAIN_SIZE = 240
EVAL_SIZE = 60


def build_small_multidigits(root: Path) -> Path:
    """Build a small MultiDigits data set under ``root/data`` and return ``root``."""
    build_multidigits(root / "data", seed=0, train_size=TRAIN_SIZE, eval_size=EVAL_SIZE)
    return root


def write_config(root: Path, name: str = "config.yaml", *, tasks: tuple[str, ...] | None = None, **training: Any) -> Path:
    """Write the packaged MultiDigits config into ``root`` with small, fast training settings.

    ``tasks`` keeps only those tasks; ``training`` entries replace keys of the ``training`` section.
    """
    data = yaml.safe_load(config_text("multidigits"))
    if tasks is not None:
        data["tasks"] = {name: spec for name, spec in data["tasks"].items() if name in tasks}
    data["model"]["hidden_sizes"] = [32]
    data["training"].update(
        {
            "output_dir": str(root / "run"),
            "max_steps": 8,
            "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 64,
            "eval_steps": 4,
            "save_steps": 4,
            "logging_steps": 1,
            "report_to": "none",
            "disable_progress_bar": True,
        }
    )
    data["training"].update(training)
    path = root / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def cut_run_before_checkpoint(run_dir: Path, step: int) -> None:
    """Leave ``run_dir`` as a crash while writing checkpoint ``step`` would: that checkpoint and the
    final outputs gone, and a half-written ``checkpoint-<step>.tmp`` left behind."""
    for name in (f"checkpoint-{step}", "model", "results.json", "results.md", "report.md", "plots"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    partial = run_dir / f"checkpoint-{step}.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 16)


def without_dropout(path: Path) -> Path:
    """Turn off the heads' dropout in the config at ``path``, so that two runs draw no different masks."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    for task in config["tasks"].values():
        task["loss"] = {"dropout": 0.0}
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def one_error_line(err: str) -> str:
    """Return the single ``multitune: error:`` line of a command's stderr, checking that it is the only line."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("multitune: error: ")
    return lines[0]
