"""Tests of the trainer's parts: one step against a hand-written step, schedules, parameter groups, epochs, best model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from _multidigits_helpers import build_small_multidigits, write_config
from safetensors.torch import load_file
from torch import nn

from multitune.config import load_config
from multitune.data import MultiTaskLoader
from multitune.training import Trainer, list_checkpoints, read_metrics
from multitune.training._evaluation import prepare_batch
from multitune.training._optim import build_optimizer, build_scheduler, warmup_steps_for


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_multidigits(tmp_path_factory.mktemp("trainer"))


def _config(data_root: Path, name: str, *overrides: str):
    path = write_config(data_root, f"{name}.yaml", output_dir=str(data_root / name))
    return load_config(path, list(overrides))


def test_one_step_matches_hand_written_step(data_root: Path) -> None:
    config = _config(
        data_root,
        "one-step",
        "training.max_steps=1",
        "training.eval_steps=null",
        "training.save_steps=null",
        "training.lr_scheduler_type=constant",
        "training.max_grad_norm=null",
        "training.weight_decay=0.0",
        "training.learning_rate=0.01",
        "balancer.name=equal",
    )
    trainer = Trainer(config, show_progress=False)
    model = copy.deepcopy(trainer.model)
    loader = MultiTaskLoader(
        trainer.tasks, config.mixing, batch_size=config.training.per_device_train_batch_size, seed=config.training.seed, max_steps=1
    )
    step = next(iter(loader))
    rng = torch.get_rng_state()

    trainer.train()

    # The same step by hand: the sum of the task losses, one backward pass, one AdamW step.
    torch.set_rng_state(rng)
    model.train()
    total = torch.zeros(())
    for task in trainer.task_names:
        batch = prepare_batch(trainer.tasks[task], step[task], torch.device("cpu"))
        features = model.forward_features(batch)
        total = total + model.compute_loss(task, model.head_forward(task, features), batch)
    total.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    optimizer.step()

    trained = load_file(str(data_root / "one-step" / "model" / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-6, atol=1e-7, msg=name)

    row = next(row for row in read_metrics(data_root / "one-step") if row["type"] == "train")
    assert row["loss"] == pytest.approx(float(total.detach()), rel=1e-6)
    assert row["weights"] == {task: 1.0 for task in trainer.task_names}


@pytest.mark.parametrize(
    ("kind", "reference"),
    [
        ("linear", transformers.get_linear_schedule_with_warmup),
        ("cosine", transformers.get_cosine_schedule_with_warmup),
        ("constant_with_warmup", lambda optimizer, warmup, total: transformers.get_constant_schedule_with_warmup(optimizer, warmup)),
    ],
)
def test_schedule_matches_transformers(kind: str, reference) -> None:
    total, warmup = 40, 7
    ours_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    theirs_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    ours = build_scheduler(ours_optimizer, scheduler_type=kind, total_steps=total, warmup_steps=warmup)
    theirs = reference(theirs_optimizer, warmup, total)
    for _ in range(total + 1):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        ours_optimizer.step()
        theirs_optimizer.step()
        ours.step()
        theirs.step()


def test_constant_schedule_ignores_warmup() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = build_scheduler(optimizer, scheduler_type="constant", total_steps=10, warmup_steps=5)
    assert scheduler.get_last_lr() == [0.5]


def test_warmup_steps_override_ratio() -> None:
    assert warmup_steps_for(100, warmup_steps=3, warmup_ratio=0.5) == 3
    assert warmup_steps_for(100, warmup_steps=0, warmup_ratio=0.06) == 6
    assert warmup_steps_for(10, warmup_steps=0, warmup_ratio=0.01) == 1


def test_weight_decay_groups() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    extra = nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(model, extra_parameters=[extra], learning_rate=0.1, weight_decay=0.05)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias), id(extra)}


def test_uncertainty_log_variances_are_optimized_without_decay(data_root: Path) -> None:
    config = _config(data_root, "uncertainty", "balancer.name=uncertainty", "training.weight_decay=0.1")
    trainer = Trainer(config, show_progress=False)
    groups = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert groups[id(trainer.balancer.log_variances)] == 0.0

    # The task kinds reach the balancer, so classification tasks use the classification form.
    assert trainer.balancer.task_types == {"left": "classification", "right": "classification", "sum": "regression", "digits": "multilabel"}


def test_gradnorm_weights_stay_out_of_the_optimizer(data_root: Path) -> None:
    config = _config(data_root, "gradnorm-groups", "balancer.name=gradnorm")
    trainer = Trainer(config, show_progress=False)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(trainer.balancer.task_weights) not in optimized
    assert [id(p) for p in trainer.balancer.shared_parameters] == [id(p) for p in trainer.model.last_shared_parameters()]


def test_dwa_gets_one_end_epoch_per_pass(data_root: Path) -> None:
    config = _config(
        data_root,
        "dwa-epochs",
        "balancer.name=dwa",
        "training.max_steps=null",
        "training.num_train_epochs=3",
        "training.epoch_task=left",
        "training.eval_steps=null",
        "training.save_steps=null",
    )
    trainer = Trainer(config, show_progress=False)
    steps_per_epoch = math.ceil(240 / 16)
    assert trainer.total_steps == 3 * steps_per_epoch
    trainer.train()
    assert trainer.balancer.periods_completed == 3

    rows = [row for row in read_metrics(data_root / "dwa-epochs") if row["type"] == "train"]
    for row in rows:
        # DWA keeps weight 1 until two epochs are complete, then the loss ratios move the weights.
        if row["step"] <= 2 * steps_per_epoch:
            assert set(row["weights"].values()) == {1.0}, row["step"]
    assert any(set(row["weights"].values()) != {1.0} for row in rows if row["step"] > 2 * steps_per_epoch + 1)


def test_best_checkpoint_kept_and_loaded(data_root: Path) -> None:
    # With greater_is_better on the eval loss, the first (worst) evaluation is the "best": a best checkpoint that is not the last.
    config = _config(
        data_root,
        "best",
        "training.eval_steps=2",
        "training.save_steps=2",
        "training.save_total_limit=1",
        "training.metric_for_best_model=eval_loss",
        "training.greater_is_better=true",
        "training.load_best_model_at_end=true",
    )
    Trainer(config, show_progress=False).train()
    run_dir = data_root / "best"
    assert [path.name for path in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-8"]

    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_checkpoint"] == "checkpoint-2"
    evals = [row for row in read_metrics(run_dir) if row["type"] == "eval"]
    losses = {row["step"]: sum(row["eval_loss"].values()) / len(row["eval_loss"]) for row in evals}
    assert max(losses, key=losses.get) == 2
    assert results["best_metric"] == pytest.approx(losses[2])

    best = load_file(str(run_dir / "checkpoint-2" / "model.safetensors"))
    final = load_file(str(run_dir / "model" / "model.safetensors"))
    for name in best:
        assert torch.equal(best[name], final[name]), name


def test_gradient_accumulation_counts_loader_steps(data_root: Path) -> None:
    config = _config(
        data_root,
        "accumulation",
        "training.max_steps=3",
        "training.gradient_accumulation_steps=2",
        "training.eval_steps=null",
        "training.save_steps=null",
        "mixing.step_shape=homogeneous",
        "mixing.micro_batches_per_step=2",
        "mixing.strategy=round_robin",
    )
    trainer = Trainer(config, show_progress=False)
    trainer.train()
    assert trainer.step == 3
    assert trainer.loader.step == 6
    rows = [row for row in read_metrics(data_root / "accumulation") if row["type"] == "train"]
    # Round robin over four tasks with four micro-batches per optimizer step: every task in every step.
    assert all(set(row["losses"]) == {"left", "right", "sum", "digits"} for row in rows)


def test_task_loss_options_reach_the_head(data_root: Path) -> None:
    config = _config(data_root, "focal", "tasks.left.loss={name: focal, gamma: 1.5}", "tasks.right.loss={hidden_layers: 1, dropout: 0.0}")
    trainer = Trainer(config, show_progress=False)
    left, right = trainer.model.head_specs["left"], trainer.model.head_specs["right"]
    assert left.loss == "focal"
    assert left.gamma == 1.5
    assert right.loss is None
    assert right.hidden_layers == 1
    assert right.label_names == [str(digit) for digit in range(10)]


def test_bf16_autocast_on_cpu(data_root: Path) -> None:
    config = _config(data_root, "bf16", "training.bf16=true", "training.max_steps=2", "training.eval_steps=null", "training.save_steps=null")
    trainer = Trainer(config, show_progress=False)
    assert trainer.use_bf16

    batch = prepare_batch(trainer.tasks["left"], trainer.tasks["left"].tensors("train").batch([0, 1, 2]), torch.device("cpu"))
    with trainer.autocast():
        features = trainer.model.forward_features(batch)
    assert features.pooled.dtype == torch.bfloat16

    output = trainer.train()
    rows = [row for row in read_metrics(data_root / "bf16") if row["type"] == "train"]
    assert all(math.isfinite(value) for row in rows for value in row["losses"].values())
    assert set(output.results["tasks"]) == {"left", "right", "sum", "digits"}


def test_bf16_auto_is_off_on_cpu(data_root: Path) -> None:
    trainer = Trainer(_config(data_root, "bf16-auto"), show_progress=False)
    assert trainer.args.bf16 == "auto"
    assert not trainer.use_bf16


def _masked(batch: dict[str, torch.Tensor], labelled: int) -> dict[str, torch.Tensor]:
    """Return a copy of a task batch whose first ``labelled`` examples keep their labels."""
    masked = dict(batch)
    mask = torch.zeros_like(batch["label_mask"])
    mask[:labelled] = True
    masked["label_mask"] = mask
    return masked


def test_loss_scales_weight_micro_batches_by_labelled_examples(data_root: Path) -> None:
    """Micro-batch losses count by their labelled examples; a task without any is left out of the step."""
    trainer = Trainer(_config(data_root, "scales", "balancer.name=equal"), show_progress=False)
    step = next(iter(trainer.loader))
    micro_batches = [
        {"left": _masked(step["left"], 3), "right": _masked(step["right"], 0)},
        {"left": _masked(step["left"], 1), "right": _masked(step["right"], 0), "sum": step["sum"]},
    ]
    scales = trainer._loss_scales(micro_batches)

    assert scales[0] == {"left": pytest.approx(3 / 4)}
    assert scales[1] == {"left": pytest.approx(1 / 4), "sum": pytest.approx(1.0)}

    # The scaled losses add up to the mean over all labelled examples of the step.
    losses = [trainer._task_losses(micro_batch, micro_scales)[0] for micro_batch, micro_scales in zip(micro_batches, scales)]
    assert "right" not in losses[0]
    assert "right" not in losses[1]
    trainer.model.eval()
    with torch.no_grad():
        combined = {key: torch.cat([step["left"][key][:3], step["left"][key][:1]]) for key in ("input_values", "labels")}
        combined["label_mask"] = torch.ones(4, dtype=torch.bool)
        batch = prepare_batch(trainer.tasks["left"], combined, torch.device("cpu"))
        expected = trainer.model.compute_loss("left", trainer.model.head_forward("left", trainer.model.forward_features(batch)), batch)
        scaled = [trainer._task_losses(micro_batch, micro_scales)[0]["left"] for micro_batch, micro_scales in zip(micro_batches, scales)]
    assert float(sum(scaled)) == pytest.approx(float(expected), rel=1e-6)
