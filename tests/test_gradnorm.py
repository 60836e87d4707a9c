"""Tests of GradNorm against Algorithm 1 of Chen et al., "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks" (ICML 2018).

The reference below builds L_grad = sum_i |G_i - sg[mean(G) r_i^alpha]| with a second-order
autograd graph in float64 (G_i = ||d(w_i L_i)/dW||, create_graph=True) and differentiates it with
respect to the weights, which is how the paper states the update. GradNorm itself uses the
closed-form gradient; the tests compare the two, and cover the pitfalls of public
implementations: the sign of the exponent, per-task initial losses, the detached target and
gradients of L_grad leaking into the model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from multitune.balancing import GradNorm, build_balancer
from multitune.balancing._gradnorm import gradnorm_weight_gradient

NAMES = ("a", "b", "c")
SCALES = (1.0, 30.0, 0.2)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


class SmallNet(nn.Module):
    """Two shared tanh layers and one linear head per task, in float64."""

    def __init__(self, num_tasks: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(4, 6, dtype=torch.float64)
        self.shared = nn.Linear(6, 6, dtype=torch.float64)
        self.heads = nn.ModuleList(nn.Linear(6, 1, dtype=torch.float64) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = torch.tanh(self.shared(torch.tanh(self.first(x))))
        return [head(features).squeeze(-1) for head in self.heads]


def make_batch(step: int, num_tasks: int = 3) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(num_tasks, 8, generator=generator, dtype=torch.float64)
    return x, targets


def task_losses(model: SmallNet, batch, names=NAMES, scales=SCALES) -> dict[str, Tensor]:
    x, targets = batch
    outputs = model(x)
    return {name: scales[i] * (outputs[i] - targets[i]).pow(2).mean() for i, name in enumerate(names)}


def reference_weight_gradient(losses: list[Tensor], weights: list[float], initial: list[float], alpha: float, shared) -> Tensor:
    """d L_grad / d w with the target detached, through a second-order autograd graph."""
    w = torch.tensor(weights, dtype=torch.float64, requires_grad=True)
    norms = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(w[i] * loss, shared, retain_graph=True, create_graph=True)
        norms.append(torch.sqrt(sum(grad.pow(2).sum() for grad in grads)))
    G = torch.stack(norms)
    ratios = torch.stack([loss.detach() for loss in losses]) / torch.tensor(initial, dtype=torch.float64)
    rates = ratios / ratios.mean()
    target = (G.mean() * rates.pow(alpha)).detach()
    loss_grad = (G - target).abs().sum()
    return torch.autograd.grad(loss_grad, w)[0]


def renormalise(weights: Tensor, min_weight: float) -> Tensor:
    weights = weights.clamp_min(min_weight)
    return weights * (len(weights) / weights.sum())


# Closed-form gradient ------------------------------------------------------------------------------


positive = st.floats(min_value=0.05, max_value=20.0)


@given(
    st.lists(st.tuples(positive, positive, positive, st.booleans()), min_size=2, max_size=6),
    st.floats(min_value=0.0, max_value=3.0),
)
@PROPERTY_SETTINGS
def test_closed_form_matches_autograd(rows, alpha):
    weights = torch.tensor([row[0] for row in rows], dtype=torch.float64)
    norms = torch.tensor([row[1] for row in rows], dtype=torch.float64)
    ratios = torch.tensor([row[2] for row in rows], dtype=torch.float64)
    active = torch.tensor([row[3] for row in rows])
    assume(active.any())

    w = weights.clone().requires_grad_(True)
    G = w * norms
    mask = active.to(torch.float64)
    rates = ratios / ((ratios * mask).sum() / mask.sum())
    target = ((G * mask).sum() / mask.sum() * rates.pow(alpha)).detach()
    assume(((G - target).abs()[active] > 1e-9).all())
    expected = torch.autograd.grad(((G - target).abs() * mask).sum(), w)[0]

    gradient, weighted_norms = gradnorm_weight_gradient(weights, norms, ratios, active, alpha)
    assert torch.allclose(gradient, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(weighted_norms, weights * norms, rtol=0, atol=0)


def test_detached_target_differs_from_attached():
    """With the target attached, d mean(G)/dw adds terms; the closed form must not include them."""
    weights = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    norms = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    ratios = torch.tensor([1.0, 1.5, 0.5], dtype=torch.float64)

    w = weights.clone().requires_grad_(True)
    G = w * norms
    attached = (G - G.mean() * (ratios / ratios.mean()).pow(1.5)).abs().sum()
    attached_gradient = torch.autograd.grad(attached, w)[0]
    gradient, _ = gradnorm_weight_gradient(weights, norms, ratios, torch.ones(3, dtype=torch.bool), 1.5)

    assert not torch.allclose(gradient, attached_gradient)


@pytest.mark.parametrize("shared_attr", ["weight", "both"])
def test_sgd_update_matches_reference(shared_attr):
    """Weights after each step equal w - lr dL_grad/dw (second-order reference), clamped and renormalised."""
    model = SmallNet()
    shared = [model.shared.weight] if shared_attr == "weight" else [model.shared.weight, model.shared.bias]
    balancer = GradNorm(NAMES, shared, alpha=1.5, lr=0.1, optimizer="sgd").double()
    model_optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    expected = torch.ones(3, dtype=torch.float64)
    initial: list[float] | None = None

    for step in range(6):
        losses = task_losses(model, make_batch(step))
        if initial is None:
            initial = [loss.item() for loss in losses.values()]
        gradient = reference_weight_gradient(list(losses.values()), expected.tolist(), initial, 1.5, shared)
        expected = renormalise(expected - 0.1 * gradient, balancer.min_weight)

        model_optimizer.zero_grad()
        balancer(losses).backward()
        model_optimizer.step()
        assert torch.allclose(balancer.task_weights, expected, rtol=1e-12, atol=1e-12), step


def test_adam_update_matches_reference():
    """The default Adam keeps its moments across steps; an Adam on the reference gradients agrees."""
    model = SmallNet(seed=3)
    balancer = GradNorm(NAMES, model.shared.weight, alpha=0.5).double()
    reference = torch.ones(3, dtype=torch.float64)
    reference_optimizer = torch.optim.Adam([reference], lr=0.025)
    initial: list[float] | None = None

    for step in range(8):
        losses = task_losses(model, make_batch(step))
        if initial is None:
            initial = [loss.item() for loss in losses.values()]
        reference.grad = reference_weight_gradient(list(losses.values()), reference.tolist(), initial, 0.5, [model.shared.weight])
        reference_optimizer.step()
        with torch.no_grad():
            reference.copy_(renormalise(reference, balancer.min_weight))

        balancer(losses)
        assert torch.allclose(balancer.task_weights, reference, rtol=1e-12, atol=1e-12), step

    state = balancer.state_dict()["_extra_state"]["optimizer"]["state"][0]
    assert float(state["step"]) == 8.0
    assert torch.allclose(state["exp_avg"], reference_optimizer.state[reference]["exp_avg"], rtol=1e-12, atol=1e-15)


# Pitfalls of public implementations ----------------------------------------------------------------


def test_slower_task_gets_larger_weight():
    """Equal gradient norms, task a has the higher loss ratio: its target is larger, so w_a grows."""
    model = SmallNet(num_tasks=1)
    x, targets = make_batch(0, num_tasks=1)
    output = model(x)[0]
    loss = (output - targets[0]).pow(2).mean()
    balancer = GradNorm(["a", "b"], model.shared.weight, initial_losses={"a": loss.item() / 4.0, "b": loss.item()}, optimizer="sgd", lr=0.01).double()

    balancer({"a": loss, "b": (output - targets[0]).pow(2).mean()})

    weights = balancer.task_weights.tolist()
    assert weights[0] > 1.0 > weights[1]
    assert math.isclose(sum(weights), 2.0, rel_tol=1e-15)


def test_initial_loss_per_task():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight).double()
    first = task_losses(model, make_batch(0))
    balancer({"a": first["a"], "b": first["b"]})
    later = task_losses(model, make_batch(1))
    balancer(later)

    # Each task keeps its own first loss; c was first seen in the second call.
    expected = [first["a"].item(), first["b"].item(), later["c"].item()]
    assert balancer.initial_losses.tolist() == expected
    assert len(set(expected)) == 3


def test_first_update_pulls_norms_together():
    """At the first call every loss ratio is 1, so every target is the mean gradient norm."""
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, optimizer="sgd", lr=0.01).double()
    losses = task_losses(model, make_batch(0))
    balancer(losses)
    norms = balancer.grad_norms
    mean_norm = sum(norms.values()) / 3
    for i, name in enumerate(NAMES):
        assert (balancer.task_weights[i].item() > 1.0) == (norms[name] < mean_norm)


def test_no_gradient_reaches_model_parameters():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, lr=0.1).double()
    for step in range(3):
        balancer(task_losses(model, make_batch(step)))
    before = balancer.task_weights.clone()

    losses = task_losses(model, make_batch(3))
    total = balancer(losses)
    after = balancer.task_weights.clone()
    assert all(parameter.grad is None for parameter in model.parameters())
    assert not torch.allclose(before, after)
    assert list(balancer.parameters()) == []

    total.backward()
    for weights, should_match in ((before, True), (after, False)):
        losses = task_losses(model, make_batch(3))
        weighted = sum(w * loss for w, loss in zip(weights, losses.values()))
        expected = torch.autograd.grad(weighted, list(model.parameters()))
        matches = all(torch.allclose(p.grad, g, rtol=1e-12, atol=1e-14) for p, g in zip(model.parameters(), expected))
        assert matches is should_match
    assert balancer.weights == dict(zip(NAMES, before.tolist()))


def test_weights_sum_and_positivity_over_many_steps():
    model = SmallNet(seed=1)
    scales = (1.0, 500.0, 0.01)
    balancer = GradNorm(NAMES, model.shared.weight, alpha=2.0, lr=0.05).double()
    model_optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        model_optimizer.zero_grad()
        balancer(task_losses(model, make_batch(step), scales=scales)).backward()
        model_optimizer.step()
        assert math.isclose(balancer.task_weights.sum().item(), 3.0, rel_tol=1e-12)
        assert (balancer.task_weights > 0).all()
    # The task with the largest loss scale has the largest gradient norm, so the smallest weight.
    assert balancer.task_weights.argmin().item() == 1


def test_large_steps_stay_at_floor():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, optimizer="sgd", lr=100.0, min_weight=0.01).double()
    for step in range(5):
        balancer(task_losses(model, make_batch(step), scales=(1.0, 100.0, 1.0)))
        weights = balancer.task_weights
        assert (weights > 0).all()
        assert math.isclose(weights.sum().item(), 3.0, rel_tol=1e-12)
    assert balancer.task_weights.min().item() < 0.05


def test_alpha_zero_equalises_gradient_norms():
    """With a fixed model and alpha = 0, the weights settle where w_i ||grad L_i|| are equal."""
    model = SmallNet(seed=2)
    batch = make_batch(0)
    losses = task_losses(model, batch)
    norms = torch.stack([torch.autograd.grad(loss, model.shared.weight, retain_graph=True)[0].norm() for loss in losses.values()])
    equilibrium = 3.0 * norms.reciprocal() / norms.reciprocal().sum()
    assert equilibrium.max() / equilibrium.min() > 5.0

    balancer = GradNorm(NAMES, model.shared.weight, alpha=0.0, lr=0.01).double()
    history = []
    for _ in range(400):
        balancer(task_losses(model, batch))
        history.append(balancer.task_weights.clone())
    # Adam steps of about lr make the weights oscillate around the equilibrium; compare the mean.
    mean_weights = torch.stack(history[-200:]).mean(dim=0)
    assert torch.allclose(mean_weights, equilibrium, rtol=0.01, atol=2e-3)


# State ------------------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, lr=0.05).double()
    model_optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train(model, balancer, optimizer, steps):
        for step in steps:
            optimizer.zero_grad()
            balancer(task_losses(model, make_batch(step))).backward()
            optimizer.step()

    train(model, balancer, model_optimizer, range(4))
    copy_model = copy.deepcopy(model)
    resumed = GradNorm(NAMES, copy_model.shared.weight, lr=0.05).double()
    resumed.load_state_dict(copy.deepcopy(balancer.state_dict()))
    fresh_model = copy.deepcopy(model)
    fresh = GradNorm(NAMES, fresh_model.shared.weight, lr=0.05).double()
    fresh.task_weights.copy_(balancer.task_weights)
    fresh.initial_losses.copy_(balancer.initial_losses)
    fresh.initial_loss_count.copy_(balancer.initial_loss_count)

    train(model, balancer, model_optimizer, range(4, 10))
    train(copy_model, resumed, torch.optim.SGD(copy_model.parameters(), lr=0.05), range(4, 10))
    train(fresh_model, fresh, torch.optim.SGD(fresh_model.parameters(), lr=0.05), range(4, 10))

    assert torch.equal(resumed.task_weights, balancer.task_weights)
    assert int(resumed.step) == int(balancer.step) == 10
    # Without the Adam moments the trajectory differs.
    assert not torch.equal(fresh.task_weights, balancer.task_weights)


def test_dtype_change_keeps_optimizer_state():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight)
    balancer(task_losses(model, make_batch(0)))
    balancer.double()
    balancer(task_losses(model, make_batch(1)))
    state = balancer.state_dict()["_extra_state"]["optimizer"]["state"][0]
    assert float(state["step"]) == 2.0
    assert state["exp_avg"].dtype == torch.float64
    assert math.isclose(balancer.task_weights.sum().item(), 3.0, rel_tol=1e-12)


def test_weights_are_a_buffer():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight)
    assert "task_weights" in dict(balancer.named_buffers())
    assert list(balancer.parameters()) == []
    assert set(balancer.state_dict()) == {"step", "task_weights", "initial_losses", "initial_loss_count", "_extra_state"}


# Options ----------------------------------------------------------------------------------------


def test_initial_losses_mean_of_first_k():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, initial_losses=3).double()
    seen: dict[str, list[float]] = {name: [] for name in NAMES}
    present_by_step = [("a", "b"), ("a", "b", "c"), ("a", "b", "c"), ("a", "b", "c")]

    for step, present in enumerate(present_by_step):
        losses = {name: loss for name, loss in task_losses(model, make_batch(step)).items() if name in present}
        for name, loss in losses.items():
            seen[name].append(loss.item())
        balancer(losses)
        weights = balancer.task_weights.tolist()
        if step < 2:
            assert weights == [1.0, 1.0, 1.0], step
        elif step == 2:
            # a and b have three losses, c only two: c keeps its weight and a + b keep their sum.
            assert weights[2] == 1.0
            assert weights[0] != 1.0
            assert math.isclose(weights[0] + weights[1], 2.0, rel_tol=1e-12)
        else:
            assert weights[2] != 1.0

    expected = [sum(values[:3]) / 3 for values in seen.values()]
    assert torch.allclose(balancer.initial_losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert balancer.initial_loss_count.tolist() == [3, 3, 3]


def test_initial_losses_mapping():
    model = SmallNet()
    given_values = {"a": math.log(10.0), "b": 2.0, "c": 0.5}
    balancer = GradNorm(NAMES, model.shared.weight, initial_losses=given_values, optimizer="sgd", lr=0.1).double()
    # The buffer is created in float32, so the given values are rounded to float32 before .double().
    stored = balancer.initial_losses.tolist()
    assert stored == pytest.approx(list(given_values.values()), rel=1e-7)
    losses = task_losses(model, make_batch(0))
    gradient = reference_weight_gradient(list(losses.values()), [1.0] * 3, stored, 1.5, [model.shared.weight])
    expected = renormalise(torch.ones(3, dtype=torch.float64) - 0.1 * gradient, balancer.min_weight)
    balancer(losses)
    assert balancer.initial_losses.tolist() == stored
    assert balancer.initial_loss_count.tolist() == [1, 1, 1]
    assert torch.allclose(balancer.task_weights, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("initial_losses", "match"),
    [
        ("last", "initial_losses must be 'first', an int >= 1 or a mapping"),
        (0, "initial_losses must be 'first', an int >= 1 or a mapping"),
        (True, "initial_losses must be 'first', an int >= 1 or a mapping"),
        ({"a": 1.0, "b": 1.0}, "no value for task\\(s\\) \\['c'\\]"),
        ({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, "unknown task\\(s\\) \\['d'\\]"),
        ({"a": 1.0, "b": 0.0, "c": 1.0}, "the initial loss of task 'b' must be a finite number > 0, got 0.0"),
        ({"a": 1.0, "b": 1.0, "c": float("nan")}, "the initial loss of task 'c' must be a finite number > 0"),
    ],
)
def test_invalid_initial_losses(initial_losses, match):
    with pytest.raises(ValueError, match=match):
        GradNorm(NAMES, SmallNet().shared.weight, initial_losses=initial_losses)


def test_update_every():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, update_every=3, lr=0.1).double()
    previous = balancer.task_weights.clone()
    for step in range(7):
        balancer(task_losses(model, make_batch(step)))
        changed = not torch.equal(previous, balancer.task_weights)
        assert changed == (step % 3 == 0), step
        previous = balancer.task_weights.clone()
    assert float(balancer.state_dict()["_extra_state"]["optimizer"]["state"][0]["step"]) == 3.0


@pytest.mark.parametrize("absence", ["missing", "nan"])
def test_absent_task_keeps_weight_and_moments(absence):
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, lr=0.1).double()
    balancer(task_losses(model, make_batch(0)))
    balancer(task_losses(model, make_batch(1)))
    weights_before = balancer.task_weights.clone()
    moments_before = {key: value.clone() for key, value in balancer._optimizer.state[balancer.task_weights].items()}

    losses = task_losses(model, make_batch(2))
    if absence == "missing":
        del losses["b"]
    else:
        losses["b"] = torch.tensor(float("nan"), dtype=torch.float64)
    balancer(losses)

    weights = balancer.task_weights
    moments = balancer._optimizer.state[weights]
    assert weights[1].item() == weights_before[1].item()
    assert weights[0].item() != weights_before[0].item()
    assert math.isclose(weights[0].item() + weights[2].item(), weights_before[0].item() + weights_before[2].item(), rel_tol=1e-12)
    assert math.isclose(weights.sum().item(), 3.0, rel_tol=1e-12)
    for key in ("exp_avg", "exp_avg_sq"):
        assert moments[key][1].item() == moments_before[key][1].item()
        assert moments[key][0].item() != moments_before[key][0].item()
    assert set(balancer.grad_norms) == {"a", "c"}
    assert set(balancer.weights) == {"a", "c"}


def test_single_task_step_leaves_weights():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight).double()
    balancer(task_losses(model, make_batch(0)))
    before = balancer.task_weights.clone()
    balancer({"a": task_losses(model, make_batch(1))["a"]})
    assert torch.equal(balancer.task_weights, before)


def test_grad_norms_are_weighted_norms():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, lr=0.1).double()
    balancer(task_losses(model, make_batch(0)))
    weights = balancer.task_weights.tolist()
    losses = task_losses(model, make_batch(1))
    balancer(losses)
    for i, (name, loss) in enumerate(losses.items()):
        norm = torch.autograd.grad(loss, model.shared.weight, retain_graph=True)[0].norm().item()
        assert math.isclose(balancer.grad_norms[name], weights[i] * norm, rel_tol=1e-12)


def test_reduce_fn_averages_losses_and_norms():
    """A reduce function that averages with a second rank; the update must use the rank means."""
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, optimizer="sgd", lr=0.1).double()
    other_losses = torch.tensor([2.0, 50.0, 0.1], dtype=torch.float64)
    other_norms = torch.tensor([0.5, 9.0, 0.2], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    other_rank = {2: torch.stack([other_losses, ones]), 3: torch.stack([other_losses, other_norms, ones])}
    # 1-D tensors are the per-task flags of non-finite losses, none of them set on either rank.
    balancer.set_reduce_fn(lambda tensor: tensor / 2.0 if tensor.dim() == 1 else (tensor + other_rank[tensor.shape[0]]) / 2.0)

    losses = task_losses(model, make_batch(0))
    local_losses = torch.stack([loss.detach() for loss in losses.values()])
    local_norms = torch.stack(
        [torch.autograd.grad(loss, model.shared.weight, retain_graph=True)[0].norm() for loss in losses.values()]
    )
    balancer(losses)

    mean_losses = (local_losses + other_losses) / 2.0
    mean_norms = (local_norms + other_norms) / 2.0
    assert torch.allclose(balancer.initial_losses, mean_losses, rtol=1e-12)
    assert torch.allclose(torch.tensor(list(balancer.grad_norms.values()), dtype=torch.float64), mean_norms, rtol=1e-12)
    gradient, _ = gradnorm_weight_gradient(ones, mean_norms, ones, torch.ones(3, dtype=torch.bool), 1.5)
    assert torch.allclose(balancer.task_weights, renormalise(ones - 0.1 * gradient, balancer.min_weight), rtol=1e-12)


def test_eval_mode_does_not_update():
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight).double()
    balancer.eval()
    total = balancer(task_losses(model, make_batch(0)))
    assert balancer.task_weights.tolist() == [1.0, 1.0, 1.0]
    assert balancer.initial_loss_count.tolist() == [0, 0, 0]
    assert balancer.grad_norms == {}
    assert math.isclose(total.item(), sum(loss.item() for loss in task_losses(model, make_batch(0)).values()), rel_tol=1e-12)

    balancer.train()
    with torch.no_grad():
        balancer(task_losses(model, make_batch(0)))
    assert balancer.initial_loss_count.tolist() == [0, 0, 0]


# Errors -----------------------------------------------------------------------------------------


def test_loss_not_reaching_shared_layer():
    model = SmallNet()
    balancer = GradNorm(["a", "b"], model.shared.weight)
    x, targets = make_batch(0)
    bypass = model.first(x).pow(2).mean()
    with pytest.raises(ValueError, match="task 'b'.*does not depend on shared_parameters; pass the weight of the last shared layer"):
        balancer({"a": task_losses(model, (x, targets))["a"], "b": bypass})


def test_loss_without_grad_with_others():
    model = SmallNet()
    balancer = GradNorm(["a", "b"], model.shared.weight)
    losses = task_losses(model, make_batch(0), names=("a",))
    with pytest.raises(ValueError, match="task 'b' does not require grad"):
        balancer({"a": losses["a"], "b": torch.tensor(0.5, dtype=torch.float64)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, "alpha must be a finite number >= 0.0"),
        ({"lr": 0.0}, "lr must be a finite number > 0.0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0.0"),
        ({"optimizer": "rmsprop"}, "optimizer must be 'adam' or 'sgd', got 'rmsprop'"),
        ({"update_every": 0}, "update_every must be an int >= 1"),
        ({"update_every": 2.0}, "update_every must be an int >= 1"),
        ({"min_weight": 0.0}, "min_weight must be a finite number > 0.0"),
        ({"min_weight": 1.0}, "min_weight must be < 1"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradNorm(NAMES, SmallNet().shared.weight, **kwargs)


def test_invalid_shared_parameters():
    with pytest.raises(ValueError, match="shared_parameters is empty"):
        GradNorm(NAMES, [])
    frozen = nn.Linear(2, 2).weight.requires_grad_(False)
    with pytest.raises(ValueError, match="shared_parameters\\[0\\] \\(shape \\(2, 2\\)\\) does not require grad"):
        GradNorm(NAMES, frozen)
    with pytest.raises(TypeError, match="shared_parameters\\[0\\] must be a tensor"):
        GradNorm(NAMES, [1.0])


def test_registry_build():
    model = SmallNet()
    balancer = build_balancer("gradnorm", NAMES, shared_parameters=model.shared.parameters(), alpha=0.12)
    assert isinstance(balancer, GradNorm)
    assert len(balancer.shared_parameters) == 2
    assert balancer.alpha == 0.12


def test_per_task_backward_matches_autograd_norms() -> None:
    """Norms over all shared parameters from T backward passes equal those from autograd.grad, and .grad is Σ w_i ∇L_i."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(8, 1) for name in ("a", "b", "c")})
    shared = list(encoder.parameters())
    inputs = torch.randn(16, 6)
    targets = {name: scale * torch.randn(16, 1) for name, scale in (("a", 1.0), ("b", 10.0), ("c", 0.1))}

    def task_losses() -> dict[str, torch.Tensor]:
        features = encoder(inputs)
        return {name: torch.nn.functional.mse_loss(head(features), targets[name]) for name, head in heads.items()}

    reference = GradNorm(["a", "b", "c"], shared, alpha=1.5)
    per_task = GradNorm(["a", "b", "c"], shared, alpha=1.5, per_task_backward=True)
    for step in range(4):
        encoder.zero_grad()
        heads.zero_grad()
        reference.backward(task_losses())
        expected_grads = [p.grad.clone() for p in [*shared, *heads.parameters()]]
        expected_norms = reference.grad_norms

        encoder.zero_grad()
        heads.zero_grad()
        total = per_task.backward(task_losses())
        assert total.requires_grad is False
        for expected, parameter in zip(expected_grads, [*shared, *heads.parameters()]):
            torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-7)
        for name, norm in expected_norms.items():
            assert per_task.grad_norms[name] == pytest.approx(norm, rel=1e-5)
        torch.testing.assert_close(per_task.task_weights, reference.task_weights, rtol=1e-5, atol=1e-7)
        if step > 0:
            assert per_task.grad_norms


class OddShapeNet(nn.Module):
    """A shared layer W of shape 5 x 7 on a batch of 11, so that W's weight-gradient product
    (a [5, 11] @ [11, 7] matrix product) has a shape no other product of the step has."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 7)
        self.shared = nn.Linear(7, 5)
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in NAMES)
        self.x = torch.randn(11, 4)

    def losses(self, step: int = 0) -> dict[str, Tensor]:
        features = torch.tanh(self.shared(torch.tanh(self.first(self.x + step))))
        return {name: head(features).pow(2).mean() for name, head in zip(NAMES, self.heads)}


def weight_gradient_products(balancer: GradNorm, model: OddShapeNet, steps: int = 1) -> int:
    """Count the matrix products of W's weight gradient in ``steps`` calls of balancer.backward()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for step in range(steps):
            balancer.backward(model.losses(step))
    return sum(1 for event in profiler.events() if event.name == "aten::mm" and event.input_shapes == [[5, 11], [11, 7]])


def all_gradients(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reuse", [True, None])
def test_reused_gradient_equals_plain_backward(reuse: bool | None) -> None:
    """The gradient summed at W from the task gradients equals the one of the total's backward pass."""
    reusing_model, plain_model = SmallNet(), SmallNet()
    reusing = GradNorm(NAMES, reusing_model.shared.weight, alpha=1.5, lr=0.1, reuse_gradients=reuse)
    plain = GradNorm(NAMES, plain_model.shared.weight, alpha=1.5, lr=0.1, reuse_gradients=False)

    for step in range(6):
        # Step 3 keeps the gradients of step 2 (gradient accumulation); step 4 lacks task "b".
        names = ("a", "c") if step == 4 else NAMES
        if step != 3:
            reusing_model.zero_grad(set_to_none=True)
            plain_model.zero_grad(set_to_none=True)
        batch = make_batch(step)
        reusing_losses = {name: loss for name, loss in task_losses(reusing_model, batch).items() if name in names}
        plain_losses = {name: loss for name, loss in task_losses(plain_model, batch).items() if name in names}

        reusing_total = reusing.backward(reusing_losses)
        plain_total = plain.backward(plain_losses)

        assert reusing_total.item() == pytest.approx(plain_total.item(), rel=1e-12)
        for got, expected in zip(all_gradients(reusing_model), all_gradients(plain_model)):
            assert (got is None) == (expected is None)
            if got is not None:
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(reusing.task_weights, plain.task_weights, rtol=1e-12, atol=0.0)


def test_reuse_skips_one_product_at_w() -> None:
    """An update step computes W's weight gradient T times (one per task) instead of T + 1."""
    counts = {}
    for reuse in (None, False):
        model = OddShapeNet()
        counts[reuse] = weight_gradient_products(GradNorm(NAMES, model.shared.weight, reuse_gradients=reuse), model)
        assert model.shared.weight.grad is not None
    assert counts == {None: len(NAMES), False: len(NAMES) + 1}


def test_reuse_with_two_shared_tensors() -> None:
    """W made of two tensors, one reached by a single task only, gets the total's gradient."""
    reusing_model, plain_model = SmallNet(), SmallNet()
    reusing = GradNorm(NAMES, [reusing_model.shared.weight, reusing_model.heads[0].weight], reuse_gradients=True)
    plain = GradNorm(NAMES, [plain_model.shared.weight, plain_model.heads[0].weight], reuse_gradients=False)
    for step in range(3):
        reusing_model.zero_grad(set_to_none=True)
        plain_model.zero_grad(set_to_none=True)
        reusing.backward(task_losses(reusing_model, make_batch(step)))
        plain.backward(task_losses(plain_model, make_batch(step)))
        for got, expected in zip(all_gradients(reusing_model), all_gradients(plain_model)):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_step_without_update_backpropagates_to_w() -> None:
    """Steps that take no norms (update_every, initial losses still being averaged) run the plain backward pass."""
    # update_every=2: step 0 updates (T products, one of them reused) and step 1 does not (1 product).
    # initial_losses=3: neither step updates (1 product each).
    for options, expected in (({"update_every": 2}, len(NAMES) + 1), ({"initial_losses": 3}, 2)):
        model = OddShapeNet()
        balancer = GradNorm(NAMES, model.shared.weight, **options)
        assert weight_gradient_products(balancer, model, steps=2) == expected, options


def test_reuse_off_with_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a torch.distributed process group, reuse_gradients=None back-propagates to W again."""
    monkeypatch.setattr("multitune.balancing._gradnorm.is_distributed", lambda: True)
    model = OddShapeNet()
    assert weight_gradient_products(GradNorm(NAMES, model.shared.weight), model) == len(NAMES) + 1


def test_reuse_gradients_rejects_non_bool() -> None:
    with pytest.raises(ValueError, match="reuse_gradients must be None, True or False, got 'yes'"):
        GradNorm(NAMES, SmallNet().shared.weight, reuse_gradients="yes")  # type: ignore[arg-type]


def test_tensor_listed_twice_counts_once() -> None:
    model = SmallNet()
    once = GradNorm(NAMES, [model.shared.weight])
    twice = GradNorm(NAMES, [model.shared.weight, model.shared.weight])
    assert len(twice.shared_parameters) == 1
    losses = task_losses(model, make_batch(0))
    once({name: loss for name, loss in losses.items()})
    twice({name: loss for name, loss in losses.items()})
    assert twice.grad_norms == pytest.approx(once.grad_norms, rel=1e-12)


def test_nonfinite_gradient_norm_skips_update(caplog: pytest.LogCaptureFixture) -> None:
    """A finite loss whose gradient at W is NaN (sqrt at 0) leaves the weights and moments unchanged."""
    model = SmallNet()
    balancer = GradNorm(NAMES, model.shared.weight, lr=0.1)
    balancer.backward(task_losses(model, make_batch(0)))
    weights = balancer.task_weights.clone()
    moments = {key: value.clone() for key, value in balancer._weight_optimizer().state[balancer.task_weights].items()}

    def losses_with_nan_gradient() -> dict[str, Tensor]:
        losses = task_losses(model, make_batch(1))
        x, _ = make_batch(1)
        features = torch.tanh(model.shared(torch.tanh(model.first(x))))
        losses["b"] = losses["b"] + (features * 0.0).sum().sqrt()
        return losses

    with caplog.at_level("WARNING", logger="multitune.balancing._gradnorm"):
        balancer.backward(losses_with_nan_gradient())
        balancer.backward(losses_with_nan_gradient())

    assert torch.equal(balancer.task_weights, weights)
    for key, value in balancer._weight_optimizer().state[balancer.task_weights].items():
        assert torch.equal(value, moments[key]), key
    messages = [record.getMessage() for record in caplog.records if "NaN or inf" in record.getMessage()]
    assert len(messages) == 1
    assert "['b']" in messages[0]
    assert torch.isfinite(balancer.task_weights).all()
