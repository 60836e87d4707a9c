"""Tests of the command line: errors as one line with exit status 2, and train/evaluate/predict/report/demo on MultiDigits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _multidigits_helpers import build_small_multidigits, one_error_line, write_config

from multitune import cli
from multitune.config import ConfigError


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished MultiDigits run folder."""
    root = build_small_multidigits(tmp_path_factory.mktemp("cli"))
    config = write_config(root, output_dir=str(root / "run"), max_steps=6, eval_steps=3, save_steps=3)
    assert cli.main(["-q", "train", str(config)]) == 0
    return root / "run"


def test_bad_value_exits_2_with_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = build_small_multidigits(tmp_path)
    config = write_config(root)
    code = cli.main(["train", str(config), "--set", "training.learning_rate=fast"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "config.yaml: training.learning_rate: Input should be a valid number" in line
    assert line.endswith("got 'fast'")


def test_unknown_balancer_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert cli.main(["train", str(config), "--set", "balancer.name=nope"]) == 2
    assert "balancer.name: unknown balancer 'nope'" in one_error_line(capsys.readouterr().err)


def test_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in one_error_line(capsys.readouterr().err)


def test_missing_data_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert cli.main(["-q", "train", str(config)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "train file" in line
    assert "train.jsonl' not found" in line


def test_debug_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        cli.main(["--debug", "train", str(tmp_path / "missing.yaml")])


def test_evaluate_prints_table(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli.main(["-q", "evaluate", str(trained)]) == 0
    out = capsys.readouterr().out
    results = json.loads((trained / "results.json").read_text())
    for task, info in results["tasks"].items():
        assert task in out
        assert f"{info['metrics'][info['primary_metric']]:.4f}" in out


def test_evaluate_unfinished_run_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "config.yaml not found; is this a multitune run folder?" in one_error_line(capsys.readouterr().err)


def test_predict_writes_one_row_per_input(trained: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (trained.parent / "data" / "multidigits" / "eval.jsonl").read_text().splitlines()[:7]]
    source = tmp_path / "inputs.jsonl"
    source.write_text("".join(json.dumps({"pixels": row["pixels"], "id": index}) + "\n" for index, row in enumerate(rows)))

    for task, check in (
        ("left", lambda value: value in [str(digit) for digit in range(10)]),
        ("digits", lambda value: isinstance(value, list) and all(item in [str(d) for d in range(10)] for item in value)),
        ("sum", lambda value: isinstance(value, float) and -5.0 < value < 25.0),
    ):
        output = tmp_path / f"{task}.jsonl"
        assert cli.main(["-q", "predict", str(trained), "--task", task, str(source), "--output", str(output)]) == 0
        predicted = [json.loads(line) for line in output.read_text().splitlines()]
        assert [row["id"] for row in predicted] == list(range(7))
        assert all(check(row["prediction"]) for row in predicted), predicted


def test_predict_unknown_task_exits_2(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "inputs.jsonl"
    source.write_text(json.dumps({"pixels": [0.0] * 128}) + "\n")
    assert cli.main(["-q", "predict", str(trained), "--task", "colour", str(source)]) == 2
    assert "unknown task 'colour'" in one_error_line(capsys.readouterr().err)


def test_predict_without_training_data(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copied run folder whose config points at data that no longer exists still predicts, and keeps label columns."""
    copied = tmp_path / "copied-run"
    shutil.copytree(trained, copied)
    config = (copied / "config.yaml").read_text(encoding="utf-8")
    (copied / "config.yaml").write_text(config.replace(str(trained.parent / "data"), str(tmp_path / "deleted")), encoding="utf-8")

    rows = [json.loads(line) for line in (trained.parent / "data" / "multidigits" / "eval.jsonl").read_text().splitlines()[:5]]
    source = tmp_path / "labelled.jsonl"
    source.write_text("".join(json.dumps({"pixels": row["pixels"], "left": row["left"]}) + "\n" for row in rows))

    from_copy = tmp_path / "from_copy.jsonl"
    from_original = tmp_path / "from_original.jsonl"
    assert cli.main(["-q", "predict", str(copied), "--task", "left", str(source), "--output", str(from_copy)]) == 0
    assert cli.main(["-q", "predict", str(trained), "--task", "left", str(source), "--output", str(from_original)]) == 0
    predicted = [json.loads(line) for line in from_copy.read_text().splitlines()]
    assert predicted == [json.loads(line) for line in from_original.read_text().splitlines()]
    assert [row["left"] for row in predicted] == [row["left"] for row in rows]

    # Evaluation needs the eval data, so the copied run names the missing file.
    capsys.readouterr()
    assert cli.main(["-q", "evaluate", str(copied)]) == 2
    assert "deleted" in one_error_line(capsys.readouterr().err)


def test_failed_predict_keeps_output(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "inputs.jsonl"
    source.write_text(json.dumps({"id": 1}) + "\n")
    output = tmp_path / "predictions.jsonl"
    output.write_text("earlier output\n")
    assert cli.main(["-q", "predict", str(trained), "--task", "left", str(source), "--output", str(output)]) == 2
    assert "pixels" in one_error_line(capsys.readouterr().err)
    assert output.read_text() == "earlier output\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inputs.jsonl", "predictions.jsonl"]


def test_report_writes_plots(trained: Path) -> None:
    assert cli.main(["-q", "report", str(trained)]) == 0
    plots = sorted(path.name for path in (trained / "plots").glob("*.png"))
    assert plots == ["balancer_weights.png", "eval_metrics.png", "training_loss.png"]
    assert "![eval_metrics](plots/eval_metrics.png)" in (trained / "report.md").read_text()


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "demo"
    assert cli.main(["-q", "demo", "--quick", "--output-dir", str(output), "--max-steps", "4", "--set", "training.eval_steps=2"]) == 0
    assert "Results at step 4" in capsys.readouterr().out

    written = (output / "config.yaml").read_text()
    assert str(output / "data" / "multidigits" / "train.jsonl") in written
    assert (output / "results.md").is_file()
    assert (output / "plots" / "eval_metrics.png").is_file()

    # A second demo run in the same folder replaces the first.
    assert cli.main(["-q", "demo", "--quick", "--output-dir", str(output), "--max-steps", "2"]) == 0
    assert json.loads((output / "results.json").read_text())["step"] == 2
