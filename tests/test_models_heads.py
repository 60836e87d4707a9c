"""Heads, losses, masking, pooling and predictions of MultiTaskModel on small backbones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from multitune.models import Features, HeadSpec, MultiTaskModel, cls_pool, mean_pool

torch.manual_seed(0)


class TokenStates(nn.Module):
    """Backbone that returns its input states times a learned scale, so pooling is checkable by hand."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.scale = nn.Parameter(torch.ones(hidden_size))

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return input_values * self.scale


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 5)

    def forward(self, input_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": self.linear(input_values)}


def _mlp_model(heads: dict, *, hidden: int = 6) -> MultiTaskModel:
    backbone = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
    return MultiTaskModel(backbone, heads)


def _ce_float64(logits: torch.Tensor, labels: list[int]) -> float:
    rows = logits.detach().double()
    log_probs = rows - torch.logsumexp(rows, dim=-1, keepdim=True)
    return float(-np.mean([log_probs[i, c].item() for i, c in enumerate(labels)]))


# HeadSpec validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "regression", "num_outputs": 1, "loss": "cross_entropy"}, "not available for kind"),
        ({"kind": "classification", "num_outputs": 3, "gamma": 1.0}, "apply only to loss='focal'"),
        ({"kind": "classification", "num_outputs": 1}, "num_outputs >= 2"),
        ({"kind": "regression", "num_outputs": 2, "target_std": [1.0, 0.0]}, "target_std must be positive"),
        ({"kind": "regression", "num_outputs": 2, "target_mean": [1.0, 2.0, 3.0]}, "one per target"),
        ({"kind": "multilabel", "num_outputs": 2, "target_mean": 1.0}, "only to regression"),
        ({"kind": "classification", "num_outputs": 3, "label_names": ["a", "b"]}, "label_names has 2"),
        ({"kind": "classification", "num_outputs": 3, "loss": "focal", "alpha": [1.0, 2.0]}, "alpha has 2 values"),
        ({"kind": "sentiment", "num_outputs": 3}, "kind"),
    ],
)
def test_head_spec_rejects_invalid(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HeadSpec(**fields)


def test_head_spec_normalises_loss_name() -> None:
    spec = HeadSpec(kind="classification", num_outputs=3, loss="Cross-Entropy")
    assert spec.loss == "cross_entropy"
    assert HeadSpec(kind="multilabel", num_outputs=2).loss_name == "bce"
    assert HeadSpec(kind="regression", num_outputs=1).loss_name == "mse"


def test_task_names_validated() -> None:
    with pytest.raises(ValueError, match="invalid task name 'a.b'"):
        _mlp_model({"a.b": HeadSpec(kind="classification", num_outputs=2)})


def test_task_name_equal_to_module_attribute() -> None:
    model = _mlp_model({"type": HeadSpec(kind="classification", num_outputs=2)})
    outputs = model({"input_values": torch.randn(3, 4)}, "type")
    assert outputs.shape == (3, 2)
    assert any(name.startswith("heads.type.") for name, _ in model.named_parameters())


# Shapes and backbones --------------------------------------------------------------------------


def test_output_shapes_per_kind() -> None:
    heads = {
        "topic": HeadSpec(kind="classification", num_outputs=3, hidden_layers=2, hidden_dim=5),
        "codes": HeadSpec(kind="multilabel", num_outputs=4),
        "score": HeadSpec(kind="regression", num_outputs=2),
        "tags": HeadSpec(kind="token_classification", num_outputs=5),
    }
    model = MultiTaskModel(TokenStates(8), heads)
    batch = {"input_values": torch.randn(2, 7, 8), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    features = model.forward_features(batch)

    assert features.pooled.shape == (2, 8)
    assert features.tokens is not None and features.tokens.shape == (2, 7, 8)
    assert model.head_forward("topic", features).shape == (2, 3)
    assert model.head_forward("codes", features).shape == (2, 4)
    assert model.head_forward("score", features).shape == (2, 2)
    assert model.head_forward("tags", features).shape == (2, 7, 5)
    assert sum(isinstance(m, nn.Linear) for m in model.heads["topic"].modules()) == 3


def test_generic_backbone_infers_hidden_size() -> None:
    model = _mlp_model({"topic": HeadSpec(kind="classification", num_outputs=3)}, hidden=6)
    assert model.hidden_size == 6
    assert model({"input_values": torch.randn(5, 4), "labels": torch.zeros(5)}, "topic").shape == (5, 3)


def test_backbone_dict_output() -> None:
    model = MultiTaskModel(DictOutput(), {"topic": HeadSpec(kind="classification", num_outputs=2)}, hidden_size=5)
    assert model({"input_values": torch.randn(2, 4, 3)}, "topic").shape == (2, 2)


def test_wrong_hidden_size_is_reported() -> None:
    backbone = nn.Sequential(nn.Linear(4, 6))
    model = MultiTaskModel(backbone, {"topic": HeadSpec(kind="classification", num_outputs=2)}, hidden_size=9)
    with pytest.raises(ValueError, match="pass hidden_size=6"):
        model.forward_features({"input_values": torch.randn(2, 4)})


def test_token_head_needs_token_states() -> None:
    model = _mlp_model({"tags": HeadSpec(kind="token_classification", num_outputs=3)})
    features = model.forward_features({"input_values": torch.randn(2, 4)})
    with pytest.raises(ValueError, match="needs per-token states"):
        model.head_forward("tags", features)


def test_batch_keys_must_match_forward() -> None:
    model = MultiTaskModel(TokenStates(4), {"topic": HeadSpec(kind="classification", num_outputs=2)})
    with pytest.raises(ValueError, match="none of the batch keys"):
        model.forward_features({"pixels": torch.randn(2, 3, 4), "other": torch.randn(2)})


def test_unknown_task_lists_known() -> None:
    model = _mlp_model({"topic": HeadSpec(kind="classification", num_outputs=2)})
    with pytest.raises(KeyError, match="unknown task 'sentiment'"):
        model({"input_values": torch.randn(2, 4)}, "sentiment")


# Pooling ---------------------------------------------------------------------------------------


def test_mean_and_cls_pooling_by_hand() -> None:
    states = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]],
            [[-2.0, 4.0], [50.0, 50.0], [70.0, 70.0]],
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    heads = {"topic": HeadSpec(kind="classification", num_outputs=2)}
    batch = {"input_values": states, "attention_mask": mask}

    mean_features = MultiTaskModel(TokenStates(2), heads, pooling="mean").forward_features(batch)
    cls_features = MultiTaskModel(TokenStates(2), heads, pooling="cls").forward_features(batch)

    torch.testing.assert_close(mean_features.pooled, torch.tensor([[2.0, 4.0], [-2.0, 4.0]]))
    torch.testing.assert_close(cls_features.pooled, torch.tensor([[1.0, 2.0], [-2.0, 4.0]]))


def test_mean_pool_without_mask_is_plain_mean() -> None:
    states = torch.randn(3, 4, 2)
    torch.testing.assert_close(mean_pool(states, None), states.mean(dim=1))
    torch.testing.assert_close(cls_pool(states), states[:, 0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=5), st.integers(0, 2**16))
def test_mean_pool_matches_loop(mask_rows: list[list[bool]], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(len(mask_rows), 4, 3, generator=generator, dtype=torch.float64)
    mask = torch.tensor(mask_rows, dtype=torch.long)

    pooled = mean_pool(states, mask)

    for b, row in enumerate(mask_rows):
        kept = [states[b, t] for t in range(4) if row[t]]
        expected = torch.stack(kept).mean(dim=0) if kept else torch.zeros(3, dtype=torch.float64)
        torch.testing.assert_close(pooled[b], expected)


# Losses and masking ----------------------------------------------------------------------------


def test_classification_loss_skips_masked_and_missing() -> None:
    model = _mlp_model({"topic": HeadSpec(kind="classification", num_outputs=3)})
    batch = {
        "input_values": torch.randn(5, 4),
        "labels": torch.tensor([2, 0, 1, -100, 1]),
        "label_mask": torch.tensor([True, False, True, True, True]),
    }
    outputs = model(batch, "topic")

    loss = model.compute_loss("topic", outputs, batch)

    expected = _ce_float64(outputs[[0, 2, 4]], [2, 1, 1])
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_all_masked_batch_gives_connected_zero() -> None:
    model = _mlp_model({"topic": HeadSpec(kind="classification", num_outputs=3)})
    batch = {
        "input_values": torch.randn(3, 4),
        "labels": torch.tensor([1, -100, 2]),
        "label_mask": torch.tensor([False, True, False]),
    }
    outputs = model(batch, "topic")

    loss = model.compute_loss("topic", outputs, batch)
    loss.backward()

    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    head_weight = model.heads["topic"].net[-1].weight
    assert head_weight.grad is not None
    assert torch.count_nonzero(head_weight.grad) == 0


def test_zero_loss_stays_finite_with_nan_outputs() -> None:
    model = _mlp_model({"score": HeadSpec(kind="regression", num_outputs=1)})
    outputs = torch.full((2, 1), float("nan"), requires_grad=True)
    batch = {"labels": torch.tensor([1.0, 2.0]), "label_mask": torch.tensor([False, False])}

    loss = model.compute_loss("score", outputs, batch)
    loss.backward()

    assert loss.item() == 0.0
    assert outputs.grad is not None and torch.all(outputs.grad == 0)


def test_token_loss_ignores_padding_and_masked_rows() -> None:
    model = MultiTaskModel(TokenStates(4), {"tags": HeadSpec(kind="token_classification", num_outputs=3)})
    batch = {
        "input_values": torch.randn(3, 4, 4),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
        "labels": torch.tensor([[0, 2, 1, -100], [1, -100, -100, -100], [2, 2, 2, 2]]),
        "label_mask": torch.tensor([True, True, False]),
    }
    outputs = model(batch, "tags")

    loss = model.compute_loss("tags", outputs, batch)

    kept = torch.stack([outputs[0, 0], outputs[0, 1], outputs[0, 2], outputs[1, 0]])
    assert math.isclose(loss.item(), _ce_float64(kept, [0, 2, 1, 1]), rel_tol=1e-5)


def test_multilabel_loss_ignores_missing_entries() -> None:
    model = _mlp_model({"codes": HeadSpec(kind="multilabel", num_outputs=3)})
    batch = {
        "input_values": torch.randn(2, 4),
        "labels": torch.tensor([[1.0, 0.0, -100.0], [0.0, 1.0, 1.0]]),
        "label_mask": torch.tensor([True, True]),
    }
    outputs = model(batch, "codes")

    loss = model.compute_loss("codes", outputs, batch)

    z = outputs.detach().double()
    entries = [(0, 0, 1.0), (0, 1, 0.0), (1, 0, 0.0), (1, 1, 1.0), (1, 2, 1.0)]
    terms = [-(y * math.log(torch.sigmoid(z[i, c]).item()) + (1 - y) * math.log(1 - torch.sigmoid(z[i, c]).item())) for i, c, y in entries]
    assert math.isclose(loss.item(), float(np.mean(terms)), rel_tol=1e-5)


def test_focal_loss_option_matches_formula() -> None:
    gamma = 2.0
    model = _mlp_model({"topic": HeadSpec(kind="classification", num_outputs=3, loss="focal", gamma=gamma)})
    batch = {"input_values": torch.randn(4, 4), "labels": torch.tensor([0, 2, -100, 1]), "label_mask": torch.ones(4, dtype=torch.bool)}
    outputs = model(batch, "topic")

    loss = model.compute_loss("topic", outputs, batch)

    probabilities = torch.softmax(outputs.detach().double(), dim=-1)
    terms = [-((1 - probabilities[i, c]) ** gamma) * torch.log(probabilities[i, c]) for i, c in [(0, 0), (1, 2), (3, 1)]]
    assert math.isclose(loss.item(), float(torch.stack(terms).mean()), rel_tol=1e-5)


def test_focal_multilabel_with_alpha() -> None:
    model = _mlp_model({"codes": HeadSpec(kind="multilabel", num_outputs=2, loss="focal", gamma=1.0, alpha=0.25)})
    batch = {"input_values": torch.randn(2, 4), "labels": torch.tensor([[1.0, 0.0], [0.0, -100.0]])}
    outputs = model(batch, "codes")

    loss = model.compute_loss("codes", outputs, batch)

    p = torch.sigmoid(outputs.detach().double())
    terms = [
        -0.25 * (1 - p[0, 0]) * torch.log(p[0, 0]),
        -0.75 * p[0, 1] * torch.log(1 - p[0, 1]),
        -0.75 * p[1, 0] * torch.log(1 - p[1, 0]),
    ]
    assert math.isclose(loss.item(), float(torch.stack(terms).mean()), rel_tol=1e-5)


def test_custom_loss_gets_labelled_rows() -> None:
    received: dict[str, torch.Tensor] = {}

    def absolute_error(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        received["outputs"], received["labels"] = outputs, labels
        return (outputs - labels).abs().mean()

    spec = HeadSpec(kind="regression", num_outputs=1, loss=absolute_error, target_mean=10.0, target_std=2.0)
    model = _mlp_model({"score": spec})
    batch = {"input_values": torch.randn(3, 4), "labels": torch.tensor([[12.0], [99.0], [8.0]]), "label_mask": torch.tensor([True, False, True])}
    outputs = model(batch, "score")

    model.compute_loss("score", outputs, batch)

    assert received["outputs"].shape == (2, 1)
    torch.testing.assert_close(received["labels"], torch.tensor([[1.0], [-1.0]]))


def test_label_shape_error_names_task() -> None:
    model = _mlp_model({"topic": HeadSpec(kind="classification", num_outputs=3)})
    batch = {"input_values": torch.randn(2, 4), "labels": torch.tensor([[0, 1, 0], [1, 0, 0]])}
    with pytest.raises(ValueError, match="task 'topic': classification labels must be class ids"):
        model.compute_loss("topic", model(batch, "topic"), batch)


def test_missing_labels_key_is_reported() -> None:
    model = _mlp_model({"topic": HeadSpec(kind="classification", num_outputs=3)})
    batch = {"input_values": torch.randn(2, 4)}
    with pytest.raises(KeyError, match="no 'labels' entry"):
        model.compute_loss("topic", model(batch, "topic"), batch)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(0, 4), st.integers(0, 2**16))
def test_masked_rows_never_change_loss(labelled: int, masked: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    outputs = torch.randn(labelled, 3, generator=generator)
    labels = torch.randint(0, 3, (labelled,), generator=generator)
    noise_outputs = torch.randn(masked, 3, generator=generator) * 100
    noise_labels = torch.randint(0, 3, (masked,), generator=generator)
    model = _mlp_model({"topic": HeadSpec(kind="classification", num_outputs=3)})

    clean = model.compute_loss("topic", outputs, {"labels": labels})
    padded = model.compute_loss(
        "topic",
        torch.cat([outputs, noise_outputs]),
        {"labels": torch.cat([labels, noise_labels]), "label_mask": torch.tensor([True] * labelled + [False] * masked)},
    )

    torch.testing.assert_close(padded, clean)


# Regression standardisation and predictions -------------------------------------------------


def test_regression_standardisation_round_trip() -> None:
    mean, std = [10.0, -3.0], [2.0, 0.5]
    model = _mlp_model({"score": HeadSpec(kind="regression", num_outputs=2, target_mean=mean, target_std=std)})
    head = model.heads["score"]
    targets = torch.tensor([[12.0, -2.0], [7.0, -3.25], [10.0, -3.0]])

    standardised = head.standardise(targets)

    torch.testing.assert_close(standardised, torch.tensor([[1.0, 2.0], [-1.5, -0.5], [0.0, 0.0]]))
    torch.testing.assert_close(model.predict("score", standardised), targets)


def test_regression_loss_on_standardised_targets() -> None:
    model = _mlp_model({"score": HeadSpec(kind="regression", num_outputs=1, target_mean=5.0, target_std=4.0)})
    outputs = torch.tensor([[0.5], [-1.0], [2.0]])
    batch = {"labels": torch.tensor([9.0, float("nan"), 5.0])}

    loss = model.compute_loss("score", outputs, batch)

    expected = ((0.5 - 1.0) ** 2 + (2.0 - 0.0) ** 2) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_predictions_per_kind() -> None:
    heads = {
        "topic": HeadSpec(kind="classification", num_outputs=3),
        "codes": HeadSpec(kind="multilabel", num_outputs=3),
        "tags": HeadSpec(kind="token_classification", num_outputs=2),
    }
    model = _mlp_model(heads)

    topic = model.predict("topic", torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]))
    codes = model.predict("codes", torch.tensor([[0.0, -0.01, 4.0]]))
    tags = model.predict("tags", torch.tensor([[[0.2, 0.1], [0.0, 1.0]]]))

    assert topic.tolist() == [1, 0]
    assert codes.tolist() == [[1, 0, 1]]
    assert tags.tolist() == [[0, 1]]


# Parameters and gradients ----------------------------------------------------------------------


def test_gradient_reaches_heads_and_backbone() -> None:
    heads = {"topic": HeadSpec(kind="classification", num_outputs=3, hidden_layers=1), "score": HeadSpec(kind="regression", num_outputs=1)}
    model = _mlp_model(heads)
    batch = {"input_values": torch.randn(4, 4), "labels": torch.tensor([0, 1, 2, 1])}

    features = model.forward_features(batch)
    loss = model.compute_loss("topic", model.head_forward("topic", features), batch)
    loss.backward()

    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.task_parameters("topic"))
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.shared_parameters())
    assert all(p.grad is None for p in model.task_parameters("score"))


def test_parameter_groups_partition_model() -> None:
    model = _mlp_model({"a": HeadSpec(kind="classification", num_outputs=2), "b": HeadSpec(kind="multilabel", num_outputs=3)})
    groups = [model.shared_parameters(), model.task_parameters("a"), model.task_parameters("b")]
    ids = [id(p) for group in groups for p in group]

    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_generic_last_shared_layer() -> None:
    model = _mlp_model({"a": HeadSpec(kind="classification", num_outputs=2)})

    assert model.last_shared_parameter_names() == ["backbone.2.weight"]
    assert model.last_shared_parameters()[0] is model.backbone[2].weight


def test_features_dataclass_defaults() -> None:
    pooled = torch.zeros(2, 3)
    features = Features(pooled=pooled)
    assert features.tokens is None
    assert features.attention_mask is None
