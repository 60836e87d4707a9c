"""Tests of the run logs: JSON Lines rows, truncation on resume, TensorBoard scalars and the progress bar."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from multitune.training import MetricsLogger, read_metrics
from multitune.training._logging import ProgressDisplay


def _row(step: int, loss: float) -> dict:
    return {"type": "train", "step": step, "losses": {"a": loss, "b": 2 * loss}, "weights": {"a": 1.0, "b": 0.5}}


def test_rows_round_trip(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    logger.log(_row(1, 0.5))
    logger.log({"type": "eval", "step": 1, "metrics": {"a": {"accuracy": 0.75}}, "delta_m": math.nan})
    logger.close()

    rows = read_metrics(tmp_path)
    assert rows[0] == _row(1, 0.5)
    # JSON has no NaN, so a NaN is written as null.
    assert rows[1]["delta_m"] is None
    assert rows[1]["metrics"] == {"a": {"accuracy": 0.75}}


def test_resume_drops_rows_after_checkpoint(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    for step in range(1, 7):
        logger.log(_row(step, 1.0 / step))
    logger.close()

    resumed = MetricsLogger(tmp_path, resume_step=4)
    resumed.log(_row(5, 9.0))
    resumed.close()
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["losses"]["a"] == 9.0


def test_new_run_replaces_old_rows(tmp_path: Path) -> None:
    first = MetricsLogger(tmp_path)
    first.log(_row(1, 1.0))
    first.close()
    second = MetricsLogger(tmp_path)
    second.close()
    assert read_metrics(tmp_path) == []


def test_truncated_last_line_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_row(1, 1.0)) + "\n" + '{"type": "train", "st', encoding="utf-8")
    assert read_metrics(tmp_path) == [_row(1, 1.0)]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", tensorboard=True, enabled=False)
    logger.log(_row(1, 1.0))
    logger.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(_row(1, 0.5))
    logger.log(_row(2, 0.25))
    logger.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/losses/a", "train/losses/b", "train/weights/a", "train/weights/b"} <= set(events.Tags()["scalars"])
    assert [(event.step, event.value) for event in events.Scalars("train/losses/b")] == [(1, 1.0), (2, 0.5)]


def test_progress_bar_shows_losses_and_weights() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    progress = ProgressDisplay(10, enabled=True, console=console)
    progress.update(3, losses={"a": 0.123, "b": 2.5}, weights={"a": 1.5})
    progress.close()
    text = buffer.getvalue()
    assert "3/10" in text
    assert "a 0.123×1.5" in text
    assert "b 2.5" in text


def test_progress_logged_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal the progress is one log line about every 5% of the steps, and none is drawn."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=40)
    with caplog.at_level("INFO", logger="multitune.training._logging"):
        progress = ProgressDisplay(40, enabled=True, console=console)
        for step in range(1, 41):
            progress.update(step, losses={"icd10_chapter": 1.15, "name_gender": 0.5}, weights={"icd10_chapter": 0.25})
        progress.close()

    assert buffer.getvalue() == ""
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" ", 2)[1] for line in lines] == [f"{step}/40" for step in range(2, 41, 2)]
    assert lines[-1].startswith("step 40/40 (100%)")
    assert "0s left" in lines[-1]
    assert lines[0].endswith("loss×weight: icd10_chapter 1.15×0.25 name_gender 0.5")


def test_progress_log_after_resume_starts_at_resumed_step(caplog: pytest.LogCaptureFixture) -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    with caplog.at_level("INFO", logger="multitune.training._logging"):
        progress = ProgressDisplay(100, initial_step=50, enabled=True, console=console)
        for step in range(51, 101):
            progress.update(step, losses={"a": 1.0}, weights={})
    steps = [record.getMessage().split(" ", 2)[1] for record in caplog.records]
    assert steps == [f"{step}/100" for step in range(55, 101, 5)]
