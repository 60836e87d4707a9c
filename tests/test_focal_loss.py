"""Tests of multitune.losses.focal_loss and FocalLoss.

Values are checked against the focal loss formula of Lin et al., "Focal Loss for Dense Object
Detection" (ICCV 2017), written below with plain probabilities in float64, against kornia 0.9's
focal losses, and against PyTorch's cross entropies at gamma = 0.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import kornia.losses
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.losses import FocalLoss, focal_loss

GAMMAS = [0.0, 0.25, 0.5, 1.0, 2.0, 5.0]
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


# Reference formula ------------------------------------------------------------------------------


def reference_sigmoid_focal(logits, targets, *, alpha=None, gamma=2.0):
    """FL = alpha_t (1 - p_t)^gamma BCE(p, y) with p = sigmoid(z) and p_t = p y + (1 - p)(1 - y)."""
    p = 1.0 / (1.0 + torch.exp(-logits))
    cross_entropy = -(targets * torch.log(p) + (1.0 - targets) * torch.log(1.0 - p))
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    loss = (1.0 - p_t) ** gamma * cross_entropy
    if alpha is not None:
        alpha = torch.as_tensor(alpha, dtype=logits.dtype)
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return loss


def reference_softmax_focal(logits, targets, *, alpha=None, gamma=2.0):
    """FL = -alpha_t (1 - p_t)^gamma log p_t with p = exp(z) / sum(exp(z)) over dim 1."""
    exp = torch.exp(logits)
    p = exp / exp.sum(dim=1, keepdim=True)
    p_t = p.gather(1, targets.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - p_t) ** gamma) * torch.log(p_t)
    if alpha is not None:
        alpha = torch.as_tensor(alpha, dtype=logits.dtype)
        loss = (alpha if alpha.ndim == 0 else alpha[targets]) * loss
    return loss


def random_logits(*shape, scale=3.0, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(dtype)


def random_labels(high, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, high, shape, generator=generator)


# Values against the formula ---------------------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [None, 0.25, 0.8])
def test_binary_matches_formula(gamma, alpha):
    logits = random_logits(64, seed=1)
    targets = random_labels(2, 64, seed=1).double()

    loss = focal_loss(logits, targets, mode="binary", alpha=alpha, gamma=gamma, reduction="none")

    expected = reference_sigmoid_focal(logits, targets, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_multilabel_alpha_vector_matches_formula(gamma):
    logits = random_logits(32, 4, seed=2)
    targets = random_labels(2, 32, 4, seed=2).double()
    alpha = [0.1, 0.5, 0.75, 1.0]

    loss = focal_loss(logits, targets, mode="multilabel", alpha=alpha, gamma=gamma, reduction="none")

    expected = reference_sigmoid_focal(logits, targets, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_soft_targets_match_formula(gamma):
    logits = random_logits(16, 3, seed=3)
    targets = torch.rand(16, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    loss = focal_loss(logits, targets, mode="multilabel", alpha=0.3, gamma=gamma, reduction="none")

    expected = reference_sigmoid_focal(logits, targets, alpha=0.3, gamma=gamma)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [None, 0.5, [0.2, 1.0, 3.0, 0.0, 0.7]])
def test_multiclass_matches_formula(gamma, alpha):
    logits = random_logits(48, 5, seed=4)
    targets = random_labels(5, 48, seed=4)

    loss = focal_loss(logits, targets, mode="multiclass", alpha=alpha, gamma=gamma, reduction="none")

    expected = reference_softmax_focal(logits, targets, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_multiclass_spatial_matches_formula(gamma):
    logits = random_logits(3, 4, 5, 2, seed=5)
    targets = random_labels(4, 3, 5, 2, seed=5)

    loss = focal_loss(logits, targets, mode="multiclass", gamma=gamma, reduction="none")

    assert loss.shape == (3, 5, 2)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = reference_softmax_focal(flat_logits, targets.reshape(-1), gamma=gamma).reshape(3, 5, 2)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_gradients_match_formula(gamma):
    # Moderate logits keep p_t < 1 in float64, where the plain formula has finite gradients.
    binary_logits = random_logits(40, seed=6).requires_grad_()
    binary_targets = random_labels(2, 40, seed=6).double()
    focal_loss(binary_logits, binary_targets, mode="binary", alpha=0.25, gamma=gamma, reduction="sum").backward()
    reference_logits = binary_logits.detach().clone().requires_grad_()
    reference_sigmoid_focal(reference_logits, binary_targets, alpha=0.25, gamma=gamma).sum().backward()
    torch.testing.assert_close(binary_logits.grad, reference_logits.grad, rtol=1e-9, atol=1e-12)

    # Logits up to +-8 put p_t on both sides of 1/2, so both ways of computing log(1 - p_t) run.
    class_logits = random_logits(40, 3, scale=4.0, seed=7).requires_grad_()
    class_targets = random_labels(3, 40, seed=7)
    focal_loss(class_logits, class_targets, mode="multiclass", gamma=gamma, reduction="sum").backward()
    reference_logits = class_logits.detach().clone().requires_grad_()
    reference_softmax_focal(reference_logits, class_targets, gamma=gamma).sum().backward()
    torch.testing.assert_close(class_logits.grad, reference_logits.grad, rtol=1e-9, atol=1e-12)


def test_gradcheck_both_modes():
    binary_logits = random_logits(6, 2, seed=8).requires_grad_()
    soft_targets = torch.tensor([[0.0, 1.0], [0.3, 0.9], [1.0, 0.0], [0.5, 0.1], [1.0, 1.0], [0.0, 0.7]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: focal_loss(z, soft_targets, mode="multilabel", alpha=0.4, gamma=0.5, reduction="none"),
        (binary_logits,),
    )

    class_logits = random_logits(6, 4, seed=9).requires_grad_()
    class_targets = random_labels(4, 6, seed=9)
    assert torch.autograd.gradcheck(
        lambda z: focal_loss(z, class_targets, mode="multiclass", gamma=0.75, reduction="none"),
        (class_logits,),
    )


def test_known_value_binary():
    # z = 0: p = 1/2, BCE = log 2, (1 - p_t)^2 = 1/4, alpha_t = 0.25 for y = 1 and 0.75 for y = 0.
    logits = torch.zeros(2, dtype=torch.float64)
    targets = torch.tensor([1.0, 0.0], dtype=torch.float64)

    loss = focal_loss(logits, targets, mode="binary", alpha=0.25, gamma=2.0, reduction="none")

    expected = torch.tensor([0.25 * 0.25 * math.log(2.0), 0.75 * 0.25 * math.log(2.0)], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


# float32 against the float64 formula ------------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
def test_float32_close_to_float64_formula(gamma):
    # Logits of scale 6 include entries with 1 - p_t below 1e-6 (about 3e-7 binary, 1e-8 multiclass).
    binary_logits = random_logits(200, scale=6.0, seed=21)
    binary_targets = random_labels(2, 200, seed=21).double()
    class_logits = random_logits(200, 4, scale=6.0, seed=22)
    class_targets = random_labels(4, 200, seed=22)

    binary = focal_loss(binary_logits.float(), binary_targets.float(), mode="binary", alpha=0.25, gamma=gamma, reduction="none")
    multiclass = focal_loss(class_logits.float(), class_targets, mode="multiclass", gamma=gamma, reduction="none")

    expected_binary = reference_sigmoid_focal(binary_logits, binary_targets, alpha=0.25, gamma=gamma)
    expected_multiclass = reference_softmax_focal(class_logits, class_targets, gamma=gamma)
    torch.testing.assert_close(binary.double(), expected_binary, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(multiclass.double(), expected_multiclass, rtol=1e-4, atol=1e-6)


# Extreme logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
def test_sigmoid_extreme_logits_finite(gamma):
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4, 1e4, -1e4], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.6])

    loss = focal_loss(logits, targets, mode="binary", alpha=0.25, gamma=gamma, reduction="none")
    loss.sum().backward()

    assert torch.isfinite(loss).all()
    assert torch.isfinite(logits.grad).all()
    # Confidently right: no loss and no gradient.
    assert loss[0].item() == 0.0
    assert loss[1].item() == 0.0
    assert logits.grad[0].item() == 0.0
    assert logits.grad[1].item() == 0.0
    # Confidently wrong: the factor is 1, so the loss is alpha_t * |z| and the gradient alpha_t * sign.
    torch.testing.assert_close(loss[2], torch.tensor(0.75e4))
    torch.testing.assert_close(loss[3], torch.tensor(0.25e4))
    torch.testing.assert_close(logits.grad[2], torch.tensor(0.75))
    torch.testing.assert_close(logits.grad[3], torch.tensor(-0.25))


@pytest.mark.parametrize("gamma", GAMMAS)
def test_multiclass_extreme_logits_finite(gamma):
    logits = torch.tensor(
        [[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [1e4, -1e4, -1e4], [0.0, 0.0, 0.0]],
        requires_grad=True,
    )
    targets = torch.tensor([0, 0, 2, 1])

    loss = focal_loss(logits, targets, mode="multiclass", gamma=gamma, reduction="none")
    loss.sum().backward()

    assert torch.isfinite(loss).all()
    assert torch.isfinite(logits.grad).all()
    assert loss[0].item() == 0.0
    torch.testing.assert_close(logits.grad[0], torch.zeros(3))
    # Target logit 2e4 below two tied maxima: -log p_t = 2e4 + log 2 and the factor is 1.
    torch.testing.assert_close(loss[1], torch.tensor(2e4 + math.log(2.0)))
    torch.testing.assert_close(loss[2], torch.tensor(2e4))


@pytest.mark.parametrize("gamma", GAMMAS)
def test_multiclass_spatial_extreme_finite(gamma):
    logits = (1e4 * torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(10))).requires_grad_()
    targets = random_labels(4, 2, 3, seed=10)

    loss = focal_loss(logits, targets, mode="multiclass", alpha=[0.1, 0.2, 0.3, 0.4], gamma=gamma)
    loss.backward()

    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


# gamma = 0 against PyTorch's cross entropies ----------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gamma_zero_equals_cross_entropy(reduction):
    logits = random_logits(20, 6, 7, seed=11, dtype=torch.float32).requires_grad_()
    targets = random_labels(6, 20, 7, seed=11)
    targets[0, :3] = -100
    targets[5, 2] = -100

    loss = focal_loss(logits, targets, mode="multiclass", gamma=0.0, reduction=reduction)
    expected_logits = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(expected_logits, targets, reduction=reduction)
    torch.testing.assert_close(loss, expected)

    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(logits.grad, expected_logits.grad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("mode", "shape"), [("binary", (30,)), ("binary", (30, 1)), ("multilabel", (30, 5))])
def test_gamma_zero_equals_bce(reduction, mode, shape):
    logits = random_logits(*shape, seed=12, dtype=torch.float32).requires_grad_()
    hard = random_labels(2, *shape, seed=12).float()
    soft = torch.rand(*shape, generator=torch.Generator().manual_seed(12))

    for targets in (hard, soft):
        logits.grad = None
        loss = focal_loss(logits, targets, mode=mode, gamma=0.0, reduction=reduction)
        expected_logits = logits.detach().clone().requires_grad_()
        expected = F.binary_cross_entropy_with_logits(expected_logits, targets, reduction=reduction)
        torch.testing.assert_close(loss, expected)

        loss.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(logits.grad, expected_logits.grad)


# kornia 0.9 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [None, 0.25, 0.9])
def test_multilabel_matches_kornia(gamma, alpha):
    # kornia's binary_focal_loss_with_logits weights positives by alpha and negatives by 1 - alpha,
    # as here. Only hard targets are compared: for a soft target y kornia mixes the two hard-target
    # losses with weights y and 1 - y, while multitune scales the soft-target BCE by (1 - p_t)^gamma.
    logits = random_logits(24, 3, seed=13, dtype=torch.float32)
    targets = random_labels(2, 24, 3, seed=13).float()

    loss = focal_loss(logits, targets, mode="multilabel", alpha=alpha, gamma=gamma, reduction="none")

    expected = kornia.losses.binary_focal_loss_with_logits(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [None, 0.25, 0.6])
def test_multiclass_matches_kornia(gamma, alpha):
    # kornia's scalar alpha gives class 0 the weight 1 - alpha and every other class alpha, which is
    # multitune's per-class vector [1 - alpha, alpha, ..., alpha]. kornia's reduction="none" returns
    # an [N, C, *] map that is zero off the target class, so its sum over dim 1 is the per-entry loss.
    # Its "mean" divides by C times every entry, ignored ones included, so only "none" is compared.
    num_classes = 4
    logits = random_logits(6, num_classes, 5, seed=14, dtype=torch.float32)
    targets = random_labels(num_classes, 6, 5, seed=14)
    targets[1, 0] = -100
    targets[4, 3] = -100
    our_alpha = None if alpha is None else [1.0 - alpha] + [alpha] * (num_classes - 1)

    loss = focal_loss(logits, targets, mode="multiclass", alpha=our_alpha, gamma=gamma, reduction="none")

    expected = kornia.losses.focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").sum(dim=1)
    torch.testing.assert_close(loss, expected)
    assert loss[1, 0].item() == 0.0
    assert loss[4, 3].item() == 0.0


# Properties -------------------------------------------------------------------------------------


def logit_arrays(shape):
    return hnp.arrays(np.float64, shape, elements=st.floats(-40.0, 40.0, allow_nan=False))


@st.composite
def sigmoid_cases(draw):
    rows = draw(st.integers(1, 8))
    columns = draw(st.integers(1, 4))
    logits = torch.from_numpy(draw(logit_arrays((rows, columns))))
    targets = torch.from_numpy(draw(hnp.arrays(np.float64, (rows, columns), elements=st.floats(0.0, 1.0))))
    alpha = draw(st.none() | st.floats(0.0, 1.0))
    return logits, targets, alpha


@st.composite
def softmax_cases(draw):
    rows = draw(st.integers(1, 8))
    num_classes = draw(st.integers(2, 5))
    logits = torch.from_numpy(draw(logit_arrays((rows, num_classes))))
    targets = torch.tensor(draw(st.lists(st.integers(0, num_classes - 1), min_size=rows, max_size=rows)))
    alpha = draw(st.none() | hnp.arrays(np.float64, num_classes, elements=st.floats(0.0, 5.0)).map(torch.from_numpy))
    return logits, targets, alpha


@PROPERTY_SETTINGS
@given(case=sigmoid_cases(), gamma=st.floats(0.0, 6.0))
def test_sigmoid_nonnegative(case, gamma):
    logits, targets, alpha = case
    loss = focal_loss(logits, targets, mode="multilabel", alpha=alpha, gamma=gamma, reduction="none")
    assert torch.isfinite(loss).all()
    assert (loss >= 0).all()


@PROPERTY_SETTINGS
@given(case=softmax_cases(), gamma=st.floats(0.0, 6.0))
def test_softmax_nonnegative(case, gamma):
    logits, targets, alpha = case
    loss = focal_loss(logits, targets, mode="multiclass", alpha=alpha, gamma=gamma, reduction="none")
    assert torch.isfinite(loss).all()
    assert (loss >= 0).all()


def _assert_non_increasing(smaller, larger):
    # The loss at the larger gamma may exceed the other only by float64 rounding of exp.
    assert (larger <= smaller * (1.0 + 1e-12)).all(), f"loss grew with gamma: {smaller} -> {larger}"


@PROPERTY_SETTINGS
@given(case=sigmoid_cases(), gammas=st.tuples(st.floats(0.0, 6.0), st.floats(0.0, 6.0)))
def test_sigmoid_non_increasing_in_gamma(case, gammas):
    logits, targets, alpha = case
    low, high = sorted(gammas)
    losses = [focal_loss(logits, targets, mode="multilabel", alpha=alpha, gamma=g, reduction="none") for g in (low, high)]
    _assert_non_increasing(*losses)


@PROPERTY_SETTINGS
@given(case=softmax_cases(), gammas=st.tuples(st.floats(0.0, 6.0), st.floats(0.0, 6.0)))
def test_softmax_non_increasing_in_gamma(case, gammas):
    logits, targets, alpha = case
    low, high = sorted(gammas)
    losses = [focal_loss(logits, targets, mode="multiclass", alpha=alpha, gamma=g, reduction="none") for g in (low, high)]
    _assert_non_increasing(*losses)


@PROPERTY_SETTINGS
@given(case=softmax_cases(), gamma=st.floats(0.0, 6.0), ignored=st.lists(st.booleans(), min_size=8, max_size=8))
def test_reduction_consistency(case, gamma, ignored):
    logits, targets, alpha = case
    targets = targets.clone()
    targets[torch.tensor(ignored[: len(targets)])] = -100
    kept_count = int((targets != -100).sum())

    def loss_with(reduction):
        return focal_loss(logits, targets, mode="multiclass", alpha=alpha, gamma=gamma, reduction=reduction)

    none, total, mean = loss_with("none"), loss_with("sum"), loss_with("mean")
    torch.testing.assert_close(none.sum(), total)
    torch.testing.assert_close(mean, total / max(kept_count, 1))
    assert (none[targets == -100] == 0).all()


@PROPERTY_SETTINGS
@given(case=sigmoid_cases(), gamma=st.floats(0.0, 6.0))
def test_sigmoid_label_flip_symmetry(case, gamma):
    # Negating the logits, flipping the targets and swapping alpha with 1 - alpha gives the same loss.
    logits, targets, alpha = case
    flipped_alpha = None if alpha is None else 1.0 - alpha

    loss = focal_loss(logits, targets, mode="multilabel", alpha=alpha, gamma=gamma, reduction="none")
    flipped = focal_loss(-logits, 1.0 - targets, mode="multilabel", alpha=flipped_alpha, gamma=gamma, reduction="none")

    torch.testing.assert_close(loss, flipped, rtol=1e-9, atol=1e-12)


@PROPERTY_SETTINGS
@given(logits=logit_arrays((6, 2)), labels=st.lists(st.integers(0, 1), min_size=6, max_size=6), gamma=st.floats(0.0, 6.0))
def test_two_class_softmax_equals_binary(logits, labels, gamma):
    # The softmax over two classes is the sigmoid of the logit difference z1 - z0.
    logits = torch.from_numpy(logits)
    targets = torch.tensor(labels)

    softmax = focal_loss(logits, targets, mode="multiclass", gamma=gamma, reduction="none")
    binary = focal_loss(logits[:, 1] - logits[:, 0], targets.double(), mode="binary", gamma=gamma, reduction="none")

    torch.testing.assert_close(softmax, binary, rtol=1e-7, atol=1e-12)


# ignore_index -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_ignored_entries_contribute_nothing(gamma):
    logits = random_logits(10, 3, seed=15)
    targets = random_labels(3, 10, seed=15)
    targets[[1, 4, 7]] = -100
    kept_mask = targets != -100

    loss = focal_loss(logits, targets, mode="multiclass", alpha=[0.5, 1.0, 2.0], gamma=gamma)

    expected = focal_loss(logits[kept_mask], targets[kept_mask], mode="multiclass", alpha=[0.5, 1.0, 2.0], gamma=gamma)
    torch.testing.assert_close(loss, expected)


def test_sigmoid_ignore_index_entries():
    logits = random_logits(6, 2, seed=16).requires_grad_()
    targets = torch.tensor([[1.0, -100.0], [0.0, 1.0], [-100.0, -100.0], [0.5, 0.0], [1.0, 1.0], [0.0, -100.0]])
    kept_mask = targets != -100

    loss = focal_loss(logits, targets, mode="multilabel", alpha=0.25, gamma=1.5)
    loss.backward()

    expected = reference_sigmoid_focal(logits.detach()[kept_mask], targets[kept_mask].double(), alpha=0.25, gamma=1.5).mean()
    torch.testing.assert_close(loss, expected)
    assert (logits.grad[~kept_mask] == 0).all()


def test_custom_ignore_index():
    logits = random_logits(5, 3, seed=17)
    targets = torch.tensor([0, 255, 2, 1, 255])

    loss = focal_loss(logits, targets, mode="multiclass", ignore_index=255, reduction="none")

    assert loss[1].item() == 0.0
    assert loss[4].item() == 0.0
    assert (loss[[0, 2, 3]] > 0).all()


def test_ignore_index_none_keeps_every_entry():
    logits = random_logits(4, seed=18)
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = focal_loss(logits, targets, mode="binary", ignore_index=None, reduction="mean")
    torch.testing.assert_close(loss, reference_sigmoid_focal(logits, targets).mean())

    with pytest.raises(ValueError, match="out of range"):
        focal_loss(random_logits(2, 3), torch.tensor([0, -100]), mode="multiclass", ignore_index=None)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("mode", "logits", "targets"),
    [
        ("binary", torch.randn(4), torch.full((4,), -100.0)),
        ("multilabel", torch.randn(3, 2), torch.full((3, 2), -100.0)),
        ("multiclass", torch.randn(3, 4), torch.full((3,), -100)),
        ("multiclass", torch.randn(2, 4, 3), torch.full((2, 3), -100)),
    ],
)
def test_all_ignored_gives_zero(reduction, mode, logits, targets):
    logits = logits.clone().requires_grad_()

    loss = focal_loss(logits, targets, mode=mode, alpha=0.5, gamma=0.5, reduction=reduction)
    loss.backward()

    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# Half precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_half_precision_computed_in_float32(dtype, mode):
    if mode == "binary":
        logits = random_logits(16, seed=19, dtype=dtype)
        targets = random_labels(2, 16, seed=19).float()
    else:
        logits = random_logits(16, 4, seed=19, dtype=dtype)
        targets = random_labels(4, 16, seed=19)
    logits.requires_grad_()

    loss = focal_loss(logits, targets, mode=mode, alpha=0.25, gamma=0.5)
    loss.backward()

    assert loss.dtype == torch.float32
    expected = focal_loss(logits.detach().float(), targets, mode=mode, alpha=0.25, gamma=0.5)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert logits.grad.dtype == dtype
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_half_precision_extreme_logits(dtype, gamma):
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], dtype=dtype, requires_grad=True)

    binary = focal_loss(logits, torch.tensor([[1.0, 1.0], [0.0, 0.0]]), mode="multilabel", gamma=gamma)
    multiclass = focal_loss(logits, torch.tensor([0, 0]), mode="multiclass", gamma=gamma)
    (binary + multiclass).backward()

    assert torch.isfinite(binary)
    assert torch.isfinite(multiclass)
    assert torch.isfinite(logits.grad).all()


# Module -----------------------------------------------------------------------------------------


def test_module_matches_function():
    logits = random_logits(8, 3, seed=20)
    targets = random_labels(3, 8, seed=20)
    module = FocalLoss("multiclass", alpha=[0.2, 0.3, 0.5], gamma=1.5, reduction="sum")

    torch.testing.assert_close(
        module(logits, targets),
        focal_loss(logits, targets, mode="multiclass", alpha=[0.2, 0.3, 0.5], gamma=1.5, reduction="sum"),
    )
    assert module.state_dict() == {}
    assert "gamma=1.5" in repr(module)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss("binary", gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss("multilabel", alpha=1.5)
    with pytest.raises(ValueError, match="mode"):
        FocalLoss("softmax")


# Errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "logits", "targets", "error", "match"),
    [
        ({"mode": "softmax"}, torch.randn(3, 2), torch.tensor([0, 1, 0]), ValueError, "mode must be one of"),
        ({"mode": "multiclass", "gamma": -0.5}, torch.randn(3, 2), torch.tensor([0, 1, 0]), ValueError, "gamma"),
        ({"mode": "multiclass", "gamma": math.nan}, torch.randn(3, 2), torch.tensor([0, 1, 0]), ValueError, "gamma"),
        ({"mode": "multiclass", "reduction": "avg"}, torch.randn(3, 2), torch.tensor([0, 1, 0]), ValueError, "reduction"),
        ({"mode": "binary"}, torch.randn(3, 2), torch.ones(3, 2), ValueError, r"\[N\] or \[N, 1\]"),
        ({"mode": "binary"}, torch.randn(3), torch.ones(3, 1), ValueError, "shape of input"),
        ({"mode": "multilabel"}, torch.randn(3), torch.ones(3), ValueError, r"\[N, C\]"),
        ({"mode": "multilabel"}, torch.randn(3, 2), torch.ones(3, 3), ValueError, "shape of input"),
        ({"mode": "multiclass"}, torch.randn(3, 2), torch.tensor([0, 1]), ValueError, "target must have shape"),
        ({"mode": "multiclass"}, torch.randn(3, 1), torch.tensor([0, 0, 0]), ValueError, "C >= 2"),
        ({"mode": "multiclass"}, torch.randn(3, 2), torch.tensor([0.0, 1.0, 0.0]), TypeError, "integer class indices"),
        ({"mode": "multiclass"}, torch.randn(3, 2), torch.tensor([0, 2, 0]), ValueError, "out of range"),
        ({"mode": "multiclass"}, torch.randint(0, 3, (3, 2)), torch.tensor([0, 1, 0]), TypeError, "floating-point"),
        ({"mode": "multiclass", "alpha": [0.5, 0.5, 0.5]}, torch.randn(3, 2), torch.tensor([0, 1, 0]), ValueError, "2 classes"),
        ({"mode": "multiclass", "alpha": [0.5, -0.1]}, torch.randn(3, 2), torch.tensor([0, 1, 0]), ValueError, ">= 0"),
        ({"mode": "multiclass", "alpha": [[0.5, 0.5]]}, torch.randn(3, 2), torch.tensor([0, 1, 0]), ValueError, "1-D"),
        ({"mode": "multilabel", "alpha": [0.5, 0.5, 0.5]}, torch.randn(3, 2), torch.ones(3, 2), ValueError, "2 label"),
        ({"mode": "multilabel", "alpha": 1.2}, torch.randn(3, 2), torch.ones(3, 2), ValueError, r"\[0, 1\]"),
        ({"mode": "binary", "alpha": -0.2}, torch.randn(3), torch.ones(3), ValueError, r"\[0, 1\]"),
        ({"mode": "binary", "alpha": math.inf}, torch.randn(3), torch.ones(3), ValueError, "finite"),
        ({"mode": "binary"}, torch.randn(3), torch.tensor([0.0, 1.5, 1.0]), ValueError, "1.5"),
        ({"mode": "binary"}, torch.randn(3), torch.tensor([0.0, -1.0, 1.0]), ValueError, "in \\[0, 1\\]"),
    ],
)
def test_invalid_arguments_raise(kwargs, logits, targets, error, match):
    with pytest.raises(error, match=match):
        focal_loss(logits, targets, **kwargs)
