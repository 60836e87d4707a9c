"""Run logs: metrics as JSON Lines, TensorBoard scalars when installed, and a rich progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _json_value(value: Any) -> Any:
    # JSON has no NaN or infinity; they are written as null so every line parses with any reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return value


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Return the rows of ``metrics.jsonl`` in ``run_dir`` (an empty list when the file is missing)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A crash can cut the last line short; it is left out.
                logger.warning("%s:%d is not valid JSON and is skipped", path, number)
    return rows


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(f"{prefix}/{key}" if prefix else str(key), item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
        yield prefix, float(value)


class MetricsLogger:
    """Append metric rows to ``metrics.jsonl`` and, when TensorBoard is installed, to event files.

    Each row is a flat JSON object with ``step`` and ``type`` (``"train"`` or ``"eval"``) and nested
    per-task mappings (``losses``, ``weights``, ``grad_norms``, ``metrics``). Every row is flushed
    as written, so after a crash of the process the file is complete up to the last logged step.

    Args:
        run_dir: the run folder.
        tensorboard: ``True`` writes TensorBoard event files under ``run_dir/tensorboard``; without
            the ``tensorboard`` package a warning is logged once and only JSON Lines are written.
        resume_step: when resuming, rows with ``step > resume_step`` (written after the checkpoint
            the run resumes from) are dropped, so the log of a resumed run equals that of an
            uninterrupted one.
        enabled: ``False`` writes nothing (the processes other than rank 0 of a distributed run).
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, resume_step: int | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self._handle: Any = None
        self._writer: Any = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            self._truncate_after(resume_step)
        self._handle = open(self.path, "a", encoding="utf-8")
        self._writer = self._open_tensorboard() if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        rows = [row for row in read_metrics(self.run_dir) if int(row.get("step", 0)) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed; metrics go to %s only (pip install tensorboard)", self.path)
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row; ``row`` must contain ``step`` and ``type``."""
        if not self.enabled:
            return
        clean = _json_value(dict(row))
        self._handle.write(json.dumps(clean) + "\n")
        self._handle.flush()

        if self._writer is not None:
            step = int(row["step"])
            prefix = str(row.get("type", "train"))
            for tag, value in _flatten("", {key: item for key, item in row.items() if key not in ("step", "type")}):
                self._writer.add_scalar(f"{prefix}/{tag}", value, step)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ProgressDisplay:
    """Progress over optimizer steps with the latest per-task losses and weights.

    On a terminal it is a rich progress bar. Elsewhere (output to a file or a pipe, as under a
    job scheduler) a live bar would be cut to the console width and redrawn into the file, so
    the progress is logged instead: one INFO line about every 5% of the steps and at the last
    step. Disabled displays (``enabled=False``) do nothing, which is what tests use.
    """

    LOG_FRACTION = 0.05

    def __init__(self, total_steps: int, *, initial_step: int = 0, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self._progress: Progress | None = None
        self._started = time.perf_counter()
        self._initial_step = initial_step
        self._log_every = max(1, math.ceil(total_steps * self.LOG_FRACTION))
        self._next_log = initial_step + self._log_every
        if not enabled:
            return
        # rich counts FORCE_COLOR as a terminal, so the default console checks the real stderr.
        self._logs_instead = not console.is_terminal if console is not None else not sys.stderr.isatty()
        console = console or Console(stderr=True)
        if self._logs_instead:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=initial_step, status="")
        self._progress.start()

    def update(self, step: int, *, losses: Mapping[str, float], weights: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        parts = []
        for name, loss in losses.items():
            weight = weights.get(name)
            parts.append(f"{name} {loss:.3g}" + (f"×{weight:.2g}" if weight is not None else ""))
        status = " ".join(parts)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)
            return
        if step < self._next_log and step < self.total_steps:
            return
        self._next_log = step + self._log_every
        elapsed = time.perf_counter() - self._started
        done = step - self._initial_step
        remaining = elapsed / done * (self.total_steps - step) if done > 0 else math.nan
        logger.info(
            "step %d/%d (%d%%), %s elapsed, %s left; loss×weight: %s",
            step, self.total_steps, 100 * step // max(1, self.total_steps), _duration(elapsed), _duration(remaining), status,
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _duration(seconds: float) -> str:
    """Format seconds as ``1h02m``, ``3m05s`` or ``42s``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"
