"""The multi-task training loop: per-task forward passes, a balancer, AdamW, evaluation and checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from multitune.balancing import Balancer, GradientBalancer
from multitune.config import Config
from multitune.data import LoaderStep, MultiTaskBatch, MultiTaskLoader, TaskData
from multitune.distributed import (
    all_reduce_gradients,
    all_reduce_mean,
    barrier,
    broadcast_parameters,
    get_rank,
    get_world_size,
    init_from_environment,
    mean_across_ranks,
)
from multitune.metrics import metric_higher_is_better
from multitune.models import MultiTaskModel
from multitune.training._build import (
    build_model,
    build_run_balancer,
    load_run_tasks,
    load_tokenizer,
    resolve_bf16,
    select_device,
)
from multitune.training._checkpoint import (
    latest_checkpoint,
    load_checkpoint_state,
    load_model_weights,
    remove_incomplete_checkpoints,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from multitune.training._evaluation import (
    TaskEvaluation,
    constant_baseline,
    delta_m_against,
    evaluate_task,
    prepare_batch,
)
from multitune.training._logging import MetricsLogger, ProgressDisplay
from multitune.training._optim import build_optimizer, build_scheduler, warmup_steps_for
from multitune.training._results import beats_baseline, write_results

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainOutput:
    """Output of :meth:`Trainer.train`: the run folder, the final step, the results and the eval history."""

    run_dir: Path
    step: int
    results: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Interval:
    """Sums over the steps since the last log row."""

    loss_sums: dict[str, float] = field(default_factory=dict)
    loss_counts: dict[str, int] = field(default_factory=dict)
    total_sum: float = 0.0
    steps: int = 0

    def add(self, losses: Mapping[str, float], total: float) -> None:
        if not losses:
            # A step in which no task had a labelled element trains nothing and is not averaged in.
            return
        for name, value in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value
            self.loss_counts[name] = self.loss_counts.get(name, 0) + 1
        self.total_sum += total
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {name: self.loss_sums[name] / self.loss_counts[name] for name in self.loss_sums}


class Trainer:
    """Train one shared model on several tasks, as a run configuration describes.

    One optimizer step:

    1. takes ``gradient_accumulation_steps`` steps from the :class:`~multitune.data.MultiTaskLoader`
       (a mixed step is one ``{task: batch}``; a homogeneous step is a list of one-task
       micro-batches);
    2. runs the backbone once per task batch, then the task's head and loss. A task's loss in the
       step is the mean over its labelled elements in all the step's micro-batches (and ranks),
       and a task without any is left out of the step;
    3. hands the per-task losses to the balancer. A loss-weighting method returns a total that is
       back-propagated once. A gradient-based method (:class:`~multitune.balancing.GradientBalancer`)
       receives each micro-batch's losses through ``accumulate`` and writes the combined gradient
       itself in ``step_gradients``;
    4. clips the gradient norm to ``max_grad_norm``, steps AdamW and the learning-rate schedule.

    NOTE: loss-weighting balancers see all micro-batches of a step at once. The autograd graphs of
    all micro-batches are therefore kept until the single backward pass, so gradient accumulation
    does not lower peak memory for them.

    Every ``eval_steps`` (and at the end) each task's eval split is scored; every ``save_steps``
    (and at the end) a checkpoint is written that restores the run exactly (model, optimizer,
    scheduler, balancer, loader position, random generators, metrics history).

    Args:
        config: the validated run configuration.
        tasks: loaded tasks to use instead of loading ``config.tasks`` (their names must match).
        show_progress: draw the rich progress bar; default: unless ``training.disable_progress_bar``.
    """

    def __init__(self, config: Config, *, tasks: Mapping[str, TaskData] | None = None, show_progress: bool | None = None) -> None:
        self.config = config
        self.args = config.training
        self.run_dir = Path(self.args.output_dir)
        self.show_progress = (not self.args.disable_progress_bar) if show_progress is None else show_progress

        # Under torchrun (WORLD_SIZE > 1) every process joins the default process group here.
        init_from_environment(use_cpu=self.args.use_cpu)
        set_seed(self.args.seed)
        self.device = select_device(self.args.use_cpu)
        self.use_bf16 = resolve_bf16(self.args.bf16, self.device)

        self.tokenizer = load_tokenizer(config.model)
        self.tasks: dict[str, TaskData] = dict(tasks) if tasks is not None else load_run_tasks(config, self.tokenizer)
        self.task_names = list(self.tasks)
        self.model: MultiTaskModel = build_model(config, self.tasks).to(self.device)
        # Every rank starts from rank 0's weights, as DistributedDataParallel does.
        broadcast_parameters(self.model)
        self.balancer: Balancer = build_run_balancer(config, self.model, self.tasks).to(self.device)
        self.world_size = get_world_size()
        self.is_main_process = get_rank() == 0
        if self.world_size > 1:
            self.balancer.set_reduce_fn(mean_across_ranks)

        self._epoch_task = self.args.epoch_task or max(self.tasks, key=lambda name: len(self.tasks[name].train))
        self.loader = self._build_loader()
        self.total_steps = math.ceil(len(self.loader) / self.args.gradient_accumulation_steps)
        self.optimizer = build_optimizer(
            self.model,
            extra_parameters=self.balancer.parameters(),
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        warmup = warmup_steps_for(self.total_steps, warmup_steps=self.args.warmup_steps, warmup_ratio=self.args.warmup_ratio)
        self.scheduler = build_scheduler(self.optimizer, scheduler_type=self.args.lr_scheduler_type, total_steps=self.total_steps, warmup_steps=warmup)

        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self._epochs_done = 0
        self._baselines: dict[str, dict[str, float]] | None = None
        logger.info(
            "run %s: %d task(s), %d optimizer steps, device %s%s",
            self.run_dir, len(self.tasks), self.total_steps, self.device, " (bf16 autocast)" if self.use_bf16 else "",
        )

    # Set-up --------------------------------------------------------------------------------

    def _build_loader(self) -> MultiTaskLoader:
        epochs = None
        max_steps = None
        if self.args.max_steps is not None:
            max_steps = self.args.max_steps * self.args.gradient_accumulation_steps
        else:
            epochs = self.args.num_train_epochs
        return MultiTaskLoader(
            self.tasks,
            self.config.mixing,
            batch_size=self.args.per_device_train_batch_size,
            seed=self.args.seed,
            rank=get_rank(),
            world_size=get_world_size(),
            max_steps=max_steps,
            epochs=epochs,
            epoch_task=self._epoch_task if epochs is not None else None,
        )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Return the bf16 autocast context of the run (a no-op context when bf16 is off)."""
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # Training ------------------------------------------------------------------------------

    def train(self, *, resume: bool = False) -> TrainOutput:
        """Run the training loop to the end and return the final results.

        Args:
            resume: continue from the latest complete checkpoint in the run folder (an error when
                there is none); otherwise the run starts over and replaces ``metrics.jsonl``.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        else:
            self._reject_existing_run()
        if self.is_main_process:
            (self.run_dir / CONFIG_FILE).write_text(self.config.to_yaml(), encoding="utf-8")

        metrics_logger = MetricsLogger(
            self.run_dir,
            tensorboard=self.args.report_to != "none",
            resume_step=self.step if resume else None,
            enabled=self.is_main_process,
        )
        progress = ProgressDisplay(self.total_steps, initial_step=self.step, enabled=self.show_progress and self.is_main_process)
        interval = _Interval()
        started = time.perf_counter()
        first_step = self.step
        try:
            steps = self._optimizer_steps()
            while self.step < self.total_steps:
                micro_batches = next(steps, None)
                if micro_batches is None:
                    break
                losses, total, grad_norm = self._training_step(micro_batches)
                self.step += 1
                interval.add(losses, total)
                self._after_step()

                if self.step % self.args.logging_steps == 0 or self.step == self.total_steps:
                    metrics_logger.log(self._train_row(interval, grad_norm))
                    interval = _Interval()
                progress.update(self.step, losses=losses, weights=self.balancer.weights)

                evaluated = None
                if self.args.eval_steps and self.step % self.args.eval_steps == 0 and self.step < self.total_steps:
                    evaluated = self._evaluate_and_log(metrics_logger)
                if self.args.save_steps and self.step % self.args.save_steps == 0 and self.step < self.total_steps:
                    self._save(evaluated)
        finally:
            progress.close()

        final_eval = self._evaluate_and_log(metrics_logger)
        self._save(final_eval)
        # The other ranks may read the checkpoints below only once rank 0 has written them.
        barrier()
        metrics_logger.close()
        logger.info("trained %d steps in %.1f s (step %d of %d)", self.step - first_step, time.perf_counter() - started, self.step, self.total_steps)

        if self.args.load_best_model_at_end and self.best_step is not None and self.best_step != self.step:
            best = self.run_dir / f"checkpoint-{self.best_step}"
            logger.info("loading the best checkpoint %s (%s = %s)", best, self.args.metric_for_best_model, self.best_metric)
            load_model_weights(self.model, best / "model.safetensors")
            final_eval = self.evaluate()
        results = self._results(final_eval)
        if self.is_main_process:
            write_results(self.run_dir, results)
            self.model.save_pretrained(self.run_dir / MODEL_DIR, tokenizer=self.tokenizer)
        return TrainOutput(run_dir=self.run_dir, step=self.step, results=results, history=list(self.history))

    def _reject_existing_run(self) -> None:
        existing = latest_checkpoint(self.run_dir)
        if existing is not None:
            raise FileExistsError(
                f"{self.run_dir} already contains checkpoints ({existing.name}); pass --resume to continue that run, "
                "or set training.output_dir to a new folder"
            )
        if self.is_main_process:
            remove_incomplete_checkpoints(self.run_dir)
        barrier()

    def _optimizer_steps(self) -> Iterator[list[MultiTaskBatch]]:
        """Yield the micro-batches of each optimizer step (``gradient_accumulation_steps`` loader steps)."""
        pending: list[MultiTaskBatch] = []
        count = 0
        for loader_step in self.loader:
            pending.extend(_micro_batches(loader_step))
            count += 1
            if count == self.args.gradient_accumulation_steps:
                yield pending
                pending, count = [], 0
        if pending:
            yield pending

    def _loss_scales(self, micro_batches: list[MultiTaskBatch]) -> list[dict[str, float]]:
        r"""Return, per micro-batch, the factor of each task's mean loss in the step's loss of that task.

        Micro-batch :math:`m` on rank :math:`r` contains :math:`n_{r,m}` labelled elements of a task,
        and :math:`N = \sum_{r,m} n_{r,m}` over the step's micro-batches and all ranks. Its factor
        :math:`W n_{r,m} / N` makes the mean over the :math:`W` ranks of the summed task losses
        the mean over all :math:`N` labelled elements, as one process with the whole step's
        examples would compute. A task without any labelled element anywhere is left out of the
        step on every rank, as a task not drawn would be.
        """
        counts = [
            {task: self.model.labelled_count(task, batch) for task, batch in micro_batch.items() if task in self.tasks}
            for micro_batch in micro_batches
        ]
        totals = {task: 0 for task in self.task_names}
        for micro_batch_counts in counts:
            for task, count in micro_batch_counts.items():
                totals[task] += count
        if self.world_size > 1:
            # The tasks of a step are the same on every rank, so one vector carries every total.
            local = torch.tensor([float(totals[task]) for task in self.task_names], dtype=torch.float64, device=self.device)
            summed = (all_reduce_mean(local) * self.world_size).round().tolist()
            totals = dict(zip(self.task_names, (int(value) for value in summed)))

        return [
            {task: self.world_size * count / totals[task] for task, count in micro_batch_counts.items() if totals[task] > 0}
            for micro_batch_counts in counts
        ]

    def _task_losses(self, micro_batch: MultiTaskBatch, scales: Mapping[str, float]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Return each task's loss on its batch, times its factor from :meth:`_loss_scales`, and the pooled features."""
        losses: dict[str, Tensor] = {}
        features: list[Tensor] = []
        for task in self.task_names:
            if task not in micro_batch or task not in scales:
                continue
            batch = prepare_batch(self.tasks[task], micro_batch[task], self.device)
            with self.autocast():
                task_features = self.model.forward_features(batch)
                outputs = self.model.head_forward(task, task_features)
                loss = self.model.compute_loss(task, outputs, batch)
            losses[task] = loss.float() * scales[task]
            features.append(task_features.pooled)
        return losses, features

    def _training_step(self, micro_batches: list[MultiTaskBatch]) -> tuple[dict[str, float], float, float | None]:
        """Run one optimizer step; return the per-task losses, the balancer's total and the gradient norm."""
        self.model.train()
        self.balancer.train()
        scales = self._loss_scales(micro_batches)
        balancer = self.balancer
        per_micro_batch = isinstance(balancer, GradientBalancer) and balancer.gradients != "features"

        merged: dict[str, Tensor] = {}
        features: list[Tensor] = []
        for micro_batch, micro_batch_scales in zip(micro_batches, scales):
            losses, task_features = self._task_losses(micro_batch, micro_batch_scales)
            if per_micro_batch:
                balancer.accumulate(losses)  # type: ignore[union-attr]
            for task, loss in losses.items():
                # The balancer keeps the graphs of accumulated losses, so only their values are needed here.
                value = loss.detach() if per_micro_batch else loss
                merged[task] = merged[task] + value if task in merged else value
            features.extend(task_features)

        if per_micro_batch:
            total = balancer.step_gradients()  # type: ignore[union-attr]
        elif isinstance(balancer, GradientBalancer):
            total = balancer.backward(merged, features=features)
        else:
            total = balancer.backward(merged)

        if self.world_size > 1:
            self._average_gradients()
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(balancer, "update_mode", None) == "same_batch":
            self._same_batch_update(micro_batches, scales)

        loss_values = {task: float(loss.detach()) for task, loss in merged.items()}
        total_value = float(total.detach())
        if self.world_size > 1:
            # Every rank has the same tasks in a step, so the logged losses are means over ranks.
            values = all_reduce_mean(torch.tensor([*loss_values.values(), total_value], dtype=torch.float64, device=self.device)).tolist()
            loss_values = dict(zip(loss_values, values[:-1]))
            total_value = values[-1]
        return loss_values, total_value, grad_norm

    @torch.no_grad()
    def _same_batch_update(self, micro_batches: list[MultiTaskBatch], scales: list[dict[str, float]]) -> None:
        # FAMO with update="same_batch" needs the losses of the same batch after the model step.
        merged: dict[str, Tensor] = {}
        for micro_batch, micro_batch_scales in zip(micro_batches, scales):
            losses, _ = self._task_losses(micro_batch, micro_batch_scales)
            for task, loss in losses.items():
                merged[task] = merged[task] + loss if task in merged else loss
        self.balancer.update(merged)  # type: ignore[operator]

    def _average_gradients(self) -> None:
        # NOTE: one all-reduce after the backward pass, with no overlap between communication and
        # computation as in DistributedDataParallel. Gradient-based balancers combine each rank's
        # task gradients before this mean, so they see one rank's batch, not the global one.
        all_reduce_gradients(p for group in self.optimizer.param_groups for p in group["params"])

    def _clip_gradients(self) -> float | None:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if not parameters:
            return None
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm else math.inf
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(norm)

    def _after_step(self) -> None:
        """Call the balancer's ``end_epoch`` when the epoch task has finished another pass."""
        end_epoch = getattr(self.balancer, "end_epoch", None)
        if end_epoch is None:
            return
        # A DWA balancer that counts its own periods (steps_per_epoch) gets no end_epoch calls on top.
        if getattr(self.balancer, "steps_per_epoch", None) is not None:
            return
        passes = int(self.loader.sampler.epoch_progress[self._epoch_task])
        while self._epochs_done < passes:
            self._epochs_done += 1
            end_epoch()

    def _train_row(self, interval: _Interval, grad_norm: float | None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "type": "train",
            "step": self.step,
            "epoch": round(self.loader.sampler.epoch_progress[self._epoch_task], 6),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "loss": interval.total_sum / max(1, interval.steps),
            "losses": interval.means(),
            "weights": self.balancer.weights,
        }
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        task_grad_norms = getattr(self.balancer, "grad_norms", None)
        if isinstance(task_grad_norms, Mapping) and task_grad_norms:
            row["grad_norms"] = dict(task_grad_norms)
        return row

    # Evaluation ----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, TaskEvaluation]:
        """Score every task that has an eval split; the model is left in eval mode."""
        # NOTE: in a distributed run every rank scores the whole eval split, so the eval time does
        # not shrink with more ranks. The same weights give the same metrics on every rank.
        evaluations = {}
        for name, task in self.tasks.items():
            if task.eval is None:
                continue
            evaluations[name] = evaluate_task(
                self.model, task, batch_size=self.args.per_device_eval_batch_size, device=self.device, autocast=self.autocast()
            )
        return evaluations

    def baselines(self) -> dict[str, dict[str, float]]:
        """Return each task's constant-predictor metrics on its eval split (computed once)."""
        if self._baselines is None:
            self._baselines = {name: constant_baseline(task) for name, task in self.tasks.items() if task.eval is not None}
        return self._baselines

    def _evaluate_and_log(self, metrics_logger: MetricsLogger) -> dict[str, TaskEvaluation]:
        evaluations = self.evaluate()
        if not evaluations:
            return evaluations
        delta = delta_m_against(evaluations, self.config.baselines) if self.config.baselines else None
        row = {
            "type": "eval",
            "step": self.step,
            "metrics": {name: evaluation.metrics for name, evaluation in evaluations.items()},
            "eval_loss": {name: evaluation.loss for name, evaluation in evaluations.items()},
            "primary": {name: evaluation.primary for name, evaluation in evaluations.items()},
            "delta_m": delta,
        }
        metrics_logger.log(row)
        self.history.append(row)
        self._track_best(evaluations, delta)
        summary = ", ".join(f"{name} {e.primary_metric}={e.primary:.4f}" for name, e in evaluations.items())
        logger.info("step %d eval: %s", self.step, summary)
        return evaluations

    def _metric_value(self, evaluations: Mapping[str, TaskEvaluation], delta: float | None) -> float | None:
        metric = self.args.metric_for_best_model
        if metric is None:
            return None
        if metric == "eval_loss":
            return sum(e.loss for e in evaluations.values()) / len(evaluations)
        if metric == "delta_m":
            return delta
        task, _, name = metric.partition("/")
        if task not in evaluations:
            return None
        if name == "loss":
            return evaluations[task].loss
        if name not in evaluations[task].metrics:
            raise KeyError(f"training.metric_for_best_model: task {task!r} has no metric {name!r}; its metrics: {sorted(evaluations[task].metrics)}")
        return evaluations[task].metrics[name]

    def _greater_is_better(self) -> bool:
        if self.args.greater_is_better is not None:
            return self.args.greater_is_better
        metric = self.args.metric_for_best_model or "eval_loss"
        if metric in ("eval_loss", "delta_m"):
            return False
        return metric_higher_is_better(metric.partition("/")[2])

    def _track_best(self, evaluations: Mapping[str, TaskEvaluation], delta: float | None) -> None:
        value = self._metric_value(evaluations, delta)
        if value is None or not math.isfinite(value):
            return
        better = self.best_metric is None or (value > self.best_metric if self._greater_is_better() else value < self.best_metric)
        if better:
            self.best_metric = value
            self.best_step = self.step

    # Checkpoints ---------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "epochs_done": self._epochs_done,
            "total_steps": self.total_steps,
        }

    def _save(self, evaluations: Mapping[str, TaskEvaluation] | None) -> None:
        if not self.is_main_process:
            return
        summary = {
            "step": self.step,
            "total_steps": self.total_steps,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "metric_for_best_model": self.args.metric_for_best_model,
            "eval": {name: e.metrics for name, e in (evaluations or {}).items()},
        }
        save_checkpoint(self.run_dir, self.step, model=self.model, state=self._state(), summary=summary)
        best = self.run_dir / f"checkpoint-{self.best_step}" if self.best_step is not None else None
        if best is not None and not best.is_dir():
            best = None
        rotate_checkpoints(self.run_dir, save_total_limit=self.args.save_total_limit, best=best)

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{self.run_dir}: no complete checkpoint to resume from; run without --resume to start")
        state = load_checkpoint_state(checkpoint, map_location=self.device)
        if state["total_steps"] != self.total_steps:
            raise ValueError(
                f"{checkpoint} belongs to a run of {state['total_steps']} steps, but this config gives {self.total_steps}; "
                "resume with the config of that run (its copy is in the run folder's config.yaml)"
            )
        load_model_weights(self.model, checkpoint / "model.safetensors")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.best_metric = state["best_metric"]
        self.best_step = state["best_step"]
        self._epochs_done = int(state["epochs_done"])
        set_rng_state(state["rng"])
        # Checkpoints written after this one (by a run that went further) are not part of this run's
        # history. Rank 0 removes them once every rank has read the checkpoint it resumes from.
        barrier()
        if self.is_main_process:
            remove_incomplete_checkpoints(self.run_dir)
            for later in self.run_dir.glob("checkpoint-*"):
                step = later.name.removeprefix("checkpoint-")
                if step.isdigit() and int(step) > self.step:
                    shutil.rmtree(later)
        barrier()
        logger.info("resumed from %s at step %d of %d", checkpoint, self.step, self.total_steps)

    # Results -------------------------------------------------------------------------------

    def _results(self, evaluations: Mapping[str, TaskEvaluation]) -> dict[str, Any]:
        baselines = self.baselines()
        tasks: dict[str, Any] = {}
        for name, task in self.tasks.items():
            evaluation = evaluations.get(name)
            entry: dict[str, Any] = {"kind": task.kind, "num_train": len(task.train), "num_eval": len(task.eval) if task.eval is not None else 0}
            if evaluation is not None:
                baseline = baselines.get(name, {})
                entry.update(
                    primary_metric=evaluation.primary_metric,
                    higher_is_better=evaluation.higher_is_better,
                    metrics=evaluation.metrics,
                    eval_loss=evaluation.loss,
                    baseline=baseline,
                    beats_baseline=beats_baseline(evaluation.primary, baseline.get(evaluation.primary_metric), evaluation.higher_is_better),
                )
            tasks[name] = entry
        return {
            "step": self.step,
            "balancer": self.config.balancer.name,
            "seed": self.args.seed,
            "delta_m": delta_m_against(evaluations, self.config.baselines) if self.config.baselines else None,
            "best_checkpoint": f"checkpoint-{self.best_step}" if self.best_step is not None else None,
            "best_metric": self.best_metric,
            "best_metric_name": self.args.metric_for_best_model,
            "tasks": tasks,
        }


def _micro_batches(step: LoaderStep) -> list[MultiTaskBatch]:
    if isinstance(step, list):
        return list(step)
    return [step]
