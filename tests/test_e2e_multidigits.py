"""End to end on MultiDigits: train through the CLI, interrupt, resume, and match an uninterrupted run exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _multidigits_helpers import build_small_multidigits, cut_run_before_checkpoint, write_config
from safetensors.torch import load_file

from multitune import cli
from multitune.config import load_config
from multitune.training import Trainer, read_metrics


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_multidigits(tmp_path_factory.mktemp("multidigits"))


def _entry_point() -> str:
    script = Path(sys.executable).with_name("multitune")
    if script.is_file():
        return str(script)
    found = shutil.which("multitune")
    if found is None:
        pytest.skip("the multitune console script is not installed (pip install -e .)")
    return found


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _train_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir) if row["type"] == "train"]


def test_resume_matches_uninterrupted_run(data_root: Path) -> None:
    config = write_config(data_root, "resume.yaml", output_dir=str(data_root / "resume-a"))
    uninterrupted = data_root / "resume-a"
    resumed = data_root / "resume-b"

    assert cli.main(["-q", "train", str(config)]) == 0
    assert cli.main(["-q", "train", str(config), "--set", f"training.output_dir={resumed}"]) == 0
    cut_run_before_checkpoint(resumed, 8)

    # The resume runs the installed console script in a separate process.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [_entry_point(), "-q", "train", str(config), "--set", f"training.output_dir={resumed}", "--resume"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr

    expected, actual = _weights(uninterrupted), _weights(resumed)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name

    expected_rows, actual_rows = _train_rows(uninterrupted), _train_rows(resumed)
    assert [row["step"] for row in actual_rows] == list(range(1, 9))
    assert [row["losses"] for row in actual_rows] == [row["losses"] for row in expected_rows]
    assert [row["weights"] for row in actual_rows] == [row["weights"] for row in expected_rows]

    assert not (resumed / "checkpoint-8.tmp").exists()
    results_a = json.loads((uninterrupted / "results.json").read_text())
    results_b = json.loads((resumed / "results.json").read_text())
    assert results_a["tasks"] == results_b["tasks"]


@pytest.mark.parametrize("balancer", ["gradnorm", "pcgrad"])
def test_resume_exact_for_stateful_balancers(data_root: Path, balancer: str) -> None:
    overrides = [f"balancer.name={balancer}", "training.max_steps=6", "training.save_steps=3", "training.eval_steps=null"]
    config_path = write_config(data_root, f"{balancer}.yaml")
    first = load_config(config_path, overrides + [f"training.output_dir={data_root / (balancer + '-a')}"])
    Trainer(first, show_progress=False).train()

    copy = data_root / (balancer + "-b")
    shutil.copytree(data_root / (balancer + "-a"), copy)
    shutil.rmtree(copy / "checkpoint-6")
    second = load_config(config_path, overrides + [f"training.output_dir={copy}"])
    Trainer(second, show_progress=False).train(resume=True)

    expected, actual = _weights(data_root / (balancer + "-a")), _weights(copy)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert _train_rows(copy) == _train_rows(data_root / (balancer + "-a"))


def test_every_task_beats_its_baseline(data_root: Path) -> None:
    run_dir = data_root / "long"
    config = write_config(data_root, "long.yaml", output_dir=str(run_dir), max_steps=150, eval_steps=None, save_steps=None, learning_rate=0.01)
    assert cli.main(["-q", "train", str(config)]) == 0

    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["tasks"]) == {"left", "right", "sum", "digits"}
    for name, info in results["tasks"].items():
        assert info["beats_baseline"] is True, (name, info["metrics"], info["baseline"])


def test_train_refuses_existing_run_without_resume(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(data_root, "twice.yaml", output_dir=str(data_root / "twice"), max_steps=2, eval_steps=None, save_steps=None)
    assert cli.main(["-q", "train", str(config)]) == 0
    capsys.readouterr()

    assert cli.main(["-q", "train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "already contains checkpoints (checkpoint-2); pass --resume" in err


def test_resume_without_checkpoint_fails_clearly(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(data_root, "fresh.yaml", output_dir=str(data_root / "fresh"))
    assert cli.main(["-q", "train", str(config), "--resume"]) == 2
    assert "no complete checkpoint to resume from" in capsys.readouterr().err
