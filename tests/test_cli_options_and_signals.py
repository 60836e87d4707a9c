"""Cases that must end ``multitune train`` cleanly.

Invalid options under ``tasks.<name>.loss`` give one error line that names the task and that key,
with exit status 2. A SIGTERM while a checkpoint file is written ends in a ``KeyboardInterrupt``,
which the command turns into exit status 130. A run whose stderr is a file under FORCE_COLOR logs
plain records.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _multidigits_helpers import build_small_multidigits, one_error_line, write_config

from multitune import cli
from multitune.training._checkpoint import atomic_write_bytes


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_multidigits(tmp_path_factory.mktemp("cli-options"))


def _config(root: Path, tmp_path: Path, task: str, kind: str, loss: dict[str, Any]) -> Path:
    data_dir = root / "data" / "multidigits"
    spec = {
        "kind": kind,
        "train": str(data_dir / "train.jsonl"),
        "feature_fields": "pixels",
        "label_field": task,
        "loss": loss,
    }
    data = {
        "model": {"type": "mlp", "hidden_sizes": [8]},
        "tasks": {task: spec},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "report_to": "none"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# Each case is a loss mapping that HeadSpec or focal_loss rejects, or that head_spec silently
# drops or lets replace a field the data determines (kind, target statistics).
CASES = [
    pytest.param("left", "classification", {"name": "focal", "gamma": float("inf")}, id="focal-gamma-inf"),
    pytest.param("digits", "multilabel", {"name": "focal", "alpha": -0.5}, id="multilabel-alpha-negative"),
    pytest.param("digits", "multilabel", {"name": "focal", "alpha": float("nan")}, id="multilabel-alpha-nan"),
    pytest.param("left", "classification", {"kind": "regression"}, id="kind-override"),
    pytest.param("sum", "regression", {"target_mean": [100.0]}, id="target-mean-override"),
]


@pytest.mark.parametrize(("task", "kind", "loss"), CASES)
def test_invalid_loss_option_names_config_key(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str, kind: str, loss: dict[str, Any]
) -> None:
    config = _config(data_root, tmp_path, task, kind, loss)

    status = cli.main(["-q", "train", str(config)])

    err = capsys.readouterr().err
    assert status == 2, err
    line = one_error_line(err)
    assert f"task {task!r}" in line
    assert f"tasks.{task}.loss" in line


def test_sigterm_during_torch_save_interrupts(tmp_path: Path) -> None:
    # A SIGTERM that lands inside torch.save's write of a tensor record leaves the zip writer in
    # an inconsistent state, and its __exit__ raises RuntimeError ("unexpected pos") in place of
    # the KeyboardInterrupt. The atomic write must still end in the interrupt, so that the command
    # exits 130 without a traceback. Each attempt sends one real SIGTERM at a different moment.
    state = {f"tensor{index}": torch.randn(20_000) for index in range(200)}
    target = tmp_path / "trainer_state.pt"
    outcomes: Counter[str] = Counter()
    previous = cli._interrupt_on_sigterm()
    try:
        for attempt in range(20):
            timer = threading.Timer(0.05 + 0.01 * attempt, os.kill, (os.getpid(), signal.SIGTERM))
            timer.start()
            try:
                while True:
                    atomic_write_bytes(target, lambda handle: torch.save(state, handle))
            except BaseException as error:  # noqa: BLE001 - the test records which exception surfaced
                outcomes[type(error).__name__] += 1
            timer.join()
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert set(outcomes) == {"KeyboardInterrupt"}, dict(outcomes)


def test_force_color_log_file_has_no_bar(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # CI services often set FORCE_COLOR, which rich counts as a terminal. A log file must still get
    # plain records and no live bar with carriage returns and ANSI escapes.
    monkeypatch.setenv("FORCE_COLOR", "1")
    config = write_config(data_root, "force_color.yaml", output_dir=str(tmp_path / "run"), max_steps=4, disable_progress_bar=False)

    assert cli.main(["train", str(config)]) == 0

    err = capsys.readouterr().err
    assert "\r" not in err
    assert "\x1b[" not in err


@pytest.mark.parametrize("checkpoints", [False, True])
def test_interrupt_hint_matches_checkpoints(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], checkpoints: bool) -> None:
    """An interrupted train offers --resume only when a complete checkpoint exists."""
    from multitune.training import Trainer

    run_dir = tmp_path / "run"
    config = write_config(data_root, f"interrupted-{checkpoints}.yaml", output_dir=str(run_dir), max_steps=4, save_steps=2)
    train = Trainer.train

    def interrupted(self, *args, **kwargs):
        # With checkpoints, the run writes them all before the interrupt; without, it stops at once.
        if checkpoints:
            train(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    assert cli.main(["-q", "train", str(config)]) == 130
    err = capsys.readouterr().err
    if checkpoints:
        assert "resume with --resume from the last complete checkpoint" in err
    else:
        assert "before the first checkpoint; start the run again without --resume" in err
