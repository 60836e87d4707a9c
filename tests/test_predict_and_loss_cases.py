"""Predict on unusual input files and run folders, and the per-step loss weights of regression
tasks with a missing target: cases that once ended in a traceback or a wrong weight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from _multidigits_helpers import build_small_multidigits, one_error_line, write_config

from multitune import cli
from multitune.config import load_config
from multitune.training import Trainer
from multitune.training._evaluation import prepare_batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished MultiDigits run folder (an MLP on 128 pixel features)."""
    root = build_small_multidigits(tmp_path_factory.mktemp("predict-cases"))
    config = write_config(root, output_dir=str(root / "run"), max_steps=2, eval_steps=2, save_steps=2)
    assert cli.main(["-q", "train", str(config)]) == 0
    return root / "run"


def _pixel_rows(trained: Path, count: int) -> list[dict]:
    lines = (trained.parent / "data" / "multidigits" / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:count]]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_predict_ignores_unseen_label_value(trained: Path, tmp_path: Path) -> None:
    """The docs say a label column in the input is kept and not used, so its values cannot fail the run."""
    rows = [{"pixels": row["pixels"], "left": "not-a-digit"} for row in _pixel_rows(trained, 3)]
    source = _write_jsonl(tmp_path / "labelled.jsonl", rows)
    output = tmp_path / "out.jsonl"

    assert cli.main(["-q", "predict", str(trained), "--task", "left", str(source), "--output", str(output)]) == 0
    predicted = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["left"] for row in predicted] == ["not-a-digit"] * 3
    assert all(row["prediction"] in [str(digit) for digit in range(10)] for row in predicted)


def test_predict_empty_file_exits_2(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "empty.jsonl"
    source.write_text("", encoding="utf-8")

    assert cli.main(["-q", "predict", str(trained), "--task", "left", str(source)]) == 2
    assert "empty.jsonl" in one_error_line(capsys.readouterr().err)


def test_predict_wrong_feature_width_exits_2(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every row has 10 features but the model takes 128: a data error, not a matrix-shape traceback."""
    source = _write_jsonl(tmp_path / "short.jsonl", [{"pixels": row["pixels"][:10]} for row in _pixel_rows(trained, 3)])

    assert cli.main(["-q", "predict", str(trained), "--task", "left", str(source)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "10" in line
    assert "128" in line


def test_predict_output_is_folder_exits_2(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _write_jsonl(tmp_path / "rows.jsonl", [{"pixels": row["pixels"]} for row in _pixel_rows(trained, 2)])
    folder = tmp_path / "predictions"
    folder.mkdir()

    assert cli.main(["-q", "predict", str(trained), "--task", "left", str(source), "--output", str(folder)]) == 2
    assert "predictions" in one_error_line(capsys.readouterr().err)


def test_predict_corrupt_model_description_names_file(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copied = tmp_path / "run"
    shutil.copytree(trained, copied)
    (copied / "model" / "multitune_model.json").write_text('{"format_version": 1, "heads": ', encoding="utf-8")
    source = _write_jsonl(tmp_path / "rows.jsonl", [{"pixels": row["pixels"]} for row in _pixel_rows(trained, 1)])

    assert cli.main(["-q", "predict", str(copied), "--task", "left", str(source)]) == 2
    assert "multitune_model.json" in one_error_line(capsys.readouterr().err)


def test_loss_scales_count_missing_regression_targets(trained: Path) -> None:
    """A two-target regression micro-batch with one target missing per row has half the labelled elements.

    Micro-batch 1 keeps only the first target of its B rows (B elements), micro-batch 2 keeps both
    (2B elements), so the step's mean over its 3B labelled elements weights them 1/3 and 2/3.
    """
    root = trained.parent
    data = {
        "model": {"type": "mlp", "hidden_sizes": [8]},
        "tasks": {
            "pair": {
                "kind": "regression",
                "train": str(root / "data" / "multidigits" / "train.jsonl"),
                "feature_fields": "pixels",
                "label_field": ["left", "right"],
            }
        },
        "training": {"output_dir": str(root / "pair-run"), "max_steps": 1, "per_device_train_batch_size": 4, "report_to": "none"},
    }
    path = root / "pair.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    trainer = Trainer(load_config(path), show_progress=False)
    batch = next(iter(trainer.loader))["pair"]
    half = dict(batch)
    half["target_mask"] = batch["target_mask"].clone()
    half["target_mask"][:, 1] = False

    scales = trainer._loss_scales([{"pair": half}, {"pair": batch}])

    assert scales[0]["pair"] == pytest.approx(1 / 3)
    assert scales[1]["pair"] == pytest.approx(2 / 3)

    # The scaled losses add up to the mean over the 3B labelled elements of one combined batch.
    trainer.model.eval()
    with torch.no_grad():
        scaled = sum(float(trainer._task_losses({"pair": micro}, micro_scales)[0]["pair"]) for micro, micro_scales in zip((half, batch), scales))
        combined = {key: torch.cat([half[key], batch[key]]) for key in ("input_values", "labels", "label_mask", "target_mask")}
        prepared = prepare_batch(trainer.tasks["pair"], combined, torch.device("cpu"))
        outputs = trainer.model.head_forward("pair", trainer.model.forward_features(prepared))
        expected = float(trainer.model.compute_loss("pair", outputs, prepared))
    assert scaled == pytest.approx(expected, rel=1e-6)


def test_sigterm_during_predict_keeps_output(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM in the middle of predict exits 130, removes the partial file and keeps the earlier output."""
    import os
    import signal

    from multitune.training import _run

    rows = _pixel_rows(trained, 4)
    source = _write_jsonl(tmp_path / "rows.jsonl", [{"pixels": row["pixels"]} for row in rows])
    output = tmp_path / "predictions.jsonl"
    output.write_text("earlier output\n", encoding="utf-8")
    predict_rows = _run.predict_rows

    def terminated_after_two_rows(*args, **kwargs):
        for index, row in enumerate(predict_rows(*args, **kwargs)):
            if index == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield row

    monkeypatch.setattr(_run, "predict_rows", terminated_after_two_rows)
    handler_before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["-q", "predict", str(trained), "--task", "left", str(source), "--output", str(output)]) == 130
    assert "multitune: interrupted" in capsys.readouterr().err
    assert output.read_text(encoding="utf-8") == "earlier output\n"
    assert not output.with_name("predictions.jsonl.tmp").exists()
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_predict_writes_strict_json(trained: Path, tmp_path: Path) -> None:
    """An infinite value in an extra column becomes null, so every output line is strict JSON."""
    rows = _pixel_rows(trained, 2)
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"pixels": row["pixels"], "score": 1e999}) + "\n" for row in rows), encoding="utf-8")
    output = tmp_path / "predictions.jsonl"
    assert cli.main(["-q", "predict", str(trained), "--task", "left", str(source), "--output", str(output)]) == 0
    for line in output.read_text(encoding="utf-8").splitlines():
        row = json.loads(line, parse_constant=lambda constant: pytest.fail(f"non-standard JSON constant {constant}"))
        assert row["score"] is None


def test_predict_input_dim_mismatch_exits_2(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copied = tmp_path / "run"
    shutil.copytree(trained, copied)
    config = yaml.safe_load((copied / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["input_dim"] = 64
    (copied / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    source = _write_jsonl(tmp_path / "rows.jsonl", [{"pixels": row["pixels"]} for row in _pixel_rows(trained, 1)])

    assert cli.main(["-q", "predict", str(copied), "--task", "left", str(source)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.input_dim is 64" in line
    assert "reads 128 values" in line


def _one_task_config(tmp_path: Path, task: str, spec: dict) -> Path:
    """Write a one-step MLP config with one task to ``tmp_path / "config.yaml"``."""
    data = {
        "model": {"type": "mlp", "hidden_sizes": [8]},
        "tasks": {task: spec},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "report_to": "none"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config


def test_single_class_classification_names_task(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _pixel_rows(trained, 6)
    train = _write_jsonl(tmp_path / "one_class.jsonl", [{"pixels": row["pixels"], "colour": "red"} for row in rows])
    config = _one_task_config(tmp_path, "colour", {"kind": "classification", "train": str(train), "feature_fields": "pixels", "label_field": "colour"})

    assert cli.main(["-q", "train", str(config)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "task 'colour': the training labels contain one class (['red'])" in line
    assert "tasks.colour.labels" in line


def test_invalid_head_option_names_task(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _pixel_rows(trained, 6)
    train = _write_jsonl(tmp_path / "rows.jsonl", [{"pixels": row["pixels"], "left": row["left"]} for row in rows])
    spec = {"kind": "classification", "train": str(train), "feature_fields": "pixels", "label_field": "left", "loss": {"dropout": 2.0}}
    config = _one_task_config(tmp_path, "left", spec)

    assert cli.main(["-q", "train", str(config)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "task 'left': invalid head options (dropout:" in line
    assert "set them under tasks.left.loss" in line
