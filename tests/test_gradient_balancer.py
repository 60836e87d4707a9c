"""Tests of GradientBalancer: the fast path, the slow path, task rounds and the gradient sources."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.balancing import GradientBalancer, NonFiniteLossError

NAMES = ["t0", "t1", "t2"]
FIXED = {"t0": 0.2, "t1": 0.5, "t2": 1.3}


class FixedCoefficients(GradientBalancer):
    """Coefficients fixed by task name; records the Gramians it receives."""

    name = "test_fixed_coefficients"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gramians: list[torch.Tensor] = []

    def weigh(self, gramian):
        self.gramians.append(gramian.clone())
        return torch.tensor([FIXED[name] for name in self.present_tasks], dtype=gramian.dtype)


class SignAggregate(GradientBalancer):
    """A non-linear aggregation: the sum of rows' absolute values, signed by the first row."""

    name = "test_sign_aggregate"
    needs_jacobian = True

    def aggregate(self, jacobian):
        return jacobian.abs().sum(0) * torch.sign(jacobian[0])


class Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.last = nn.Linear(6, 6)
        self.heads = nn.ModuleDict({name: nn.Linear(6, 2) for name in NAMES})
        self.double()

    def shared(self):
        return list(self.trunk.parameters()) + list(self.last.parameters())

    def head_parameters(self):
        return {name: list(head.parameters()) for name, head in self.heads.items()}

    def forward(self, x, targets, names=NAMES):
        features = torch.tanh(self.last(self.trunk(x)))
        losses = {name: ((self.heads[name](features) - targets[name]) ** 2).mean() for name in names}
        return losses, features


def _data(seed: int = 1, rows: int = 10):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5, dtype=torch.float64, generator=generator)
    targets = {name: torch.randn(rows, 2, dtype=torch.float64, generator=generator) for name in NAMES}
    return x, targets


def _grads(net):
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def _expected(net, x, targets, coefficients, *, heads="unweighted", names=NAMES):
    """Explicit float64 computation: shared gets sum_i c_i g_i, heads get g_i or c_i g_i."""
    losses, _ = net(x, targets, names)
    shared = net.shared()
    expected = {}
    combined = [torch.zeros_like(p) for p in shared]
    for name in names:
        grads = torch.autograd.grad(losses[name], shared, retain_graph=True)
        for total, g in zip(combined, grads):
            total.add_(coefficients[name] * g)
        head_grads = torch.autograd.grad(losses[name], list(net.heads[name].parameters()), retain_graph=True)
        factor = 1.0 if heads == "unweighted" else coefficients[name]
        for (pname, _), g in zip(net.heads[name].named_parameters(), head_grads):
            expected[f"heads.{name}.{pname}"] = factor * g
    shared_names = [n for n, _ in net.named_parameters() if not n.startswith("heads.")]
    expected.update(dict(zip(shared_names, combined)))
    return expected


def _assert_grads(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("heads", ["unweighted", "weighted"])
def test_backward_writes_combined_grad(heads):
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared(), task_gradients=heads)
    losses, _ = net(x, targets)

    total = balancer.backward(losses)

    _assert_grads(_grads(net), _expected(net, x, targets, FIXED, heads=heads))
    assert balancer.weights == pytest.approx(FIXED)
    assert total.item() == pytest.approx(sum(FIXED[n] * losses[n].item() for n in NAMES))
    assert not total.requires_grad


def test_weigh_receives_jacobian_gramian():
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared())
    losses, _ = net(x, targets)
    rows = []
    for name in NAMES:
        grads = torch.autograd.grad(losses[name], net.shared(), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jacobian = torch.stack(rows)

    balancer.backward(losses)

    torch.testing.assert_close(balancer.gramians[0], jacobian @ jacobian.T, rtol=1e-12, atol=1e-14)


def test_backward_adds_to_existing_grad():
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared())
    expected = _expected(net, x, targets, FIXED)
    for p in net.parameters():
        p.grad = torch.ones_like(p)

    balancer.backward(net(x, targets)[0])

    _assert_grads(_grads(net), {name: g + 1.0 for name, g in expected.items()})


@pytest.mark.parametrize("heads", ["unweighted", "weighted"])
@pytest.mark.parametrize("gradients", ["shared", "features"])
def test_slow_path_matches_fast_path(heads, gradients):
    net = Net()
    x, targets = _data()
    fast = FixedCoefficients(NAMES, net.shared(), gradients=gradients, task_gradients=heads)
    losses, features = net(x, targets)
    fast.backward(losses, features=features)
    fast_grads = _grads(net)
    net.zero_grad(set_to_none=True)

    slow = FixedCoefficients(NAMES, net.shared(), gradients=gradients, task_gradients=heads)
    losses, features = net(x, targets)
    total = slow(losses, features=features)
    total.backward()

    _assert_grads(_grads(net), fast_grads)
    assert total.item() == pytest.approx(sum(FIXED[n] * losses[n].item() for n in NAMES))
    assert slow.weights == pytest.approx(fast.weights)


@pytest.mark.parametrize("gradients", ["shared", "features"])
def test_jacobian_method_fast_and_slow_paths(gradients):
    net = Net()
    x, targets = _data()
    losses, features = net(x, targets)
    inputs = net.shared() if gradients == "shared" else [features]
    rows = []
    for name in NAMES:
        grads = torch.autograd.grad(losses[name], inputs, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    direction = SignAggregate(NAMES, net.shared()).aggregate(torch.stack(rows))
    if gradients == "shared":
        expected_shared = direction
    else:
        grads = torch.autograd.grad(features, net.shared(), grad_outputs=direction.view_as(features), retain_graph=True)
        expected_shared = torch.cat([g.reshape(-1) for g in grads])

    SignAggregate(NAMES, net.shared(), gradients=gradients).backward(losses, features=features)
    fast_shared = torch.cat([p.grad.reshape(-1) for p in net.shared()])
    fast = _grads(net)
    net.zero_grad(set_to_none=True)

    losses, features = net(x, targets)
    slow_balancer = SignAggregate(NAMES, net.shared(), gradients=gradients)
    slow_balancer(losses, features=features).backward()

    torch.testing.assert_close(fast_shared, expected_shared, rtol=1e-10, atol=1e-12)
    _assert_grads(_grads(net), fast)
    assert slow_balancer.weights == {name: 1.0 for name in NAMES}


def test_features_mode_equals_shared_combination():
    # By linearity, back-propagating sum_i c_i dL_i/dz gives sum_i c_i g_i on the layers below z.
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared(), gradients="features")
    losses, features = net(x, targets)

    balancer.backward(losses, features=features)

    _assert_grads(_grads(net), _expected(net, x, targets, FIXED))
    features_rows = []
    losses, features = net(x, targets)
    for name in NAMES:
        features_rows.append(torch.autograd.grad(losses[name], features, retain_graph=True)[0].reshape(-1))
    jacobian = torch.stack(features_rows)
    torch.testing.assert_close(balancer.gramians[0], jacobian @ jacobian.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("heads", ["unweighted", "weighted"])
def test_last_shared_layer_mode(heads):
    net = Net()
    x, targets = _data()
    layer = list(net.last.parameters())
    options = {"task_parameters": net.head_parameters()} if heads == "unweighted" else {}
    balancer = FixedCoefficients(NAMES, layer, gradients="last_shared_layer", task_gradients=heads, **options)
    losses, _ = net(x, targets)

    balancer.backward(losses)

    # The Gramian is the last layer's; every shared parameter gets the gradient of sum_i c_i L_i.
    losses, _ = net(x, targets)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], layer, retain_graph=True)]) for n in NAMES]
    jacobian = torch.stack(rows)
    torch.testing.assert_close(balancer.gramians[0], jacobian @ jacobian.T, rtol=1e-12, atol=1e-14)
    _assert_grads(_grads(net), _expected(net, x, targets, FIXED, heads=heads))


def test_task_round_equals_all_task_step():
    x, targets = _data()
    net = Net()
    all_tasks = FixedCoefficients(NAMES, net.shared())
    all_tasks.backward(net(x, targets)[0])
    expected = _grads(net)

    net = Net()
    rounds = FixedCoefficients(NAMES, net.shared())
    for name in NAMES:
        losses, _ = net(x, targets, names=[name])
        rounds.accumulate(losses)
        assert all(p.grad is None for p in net.parameters())
    total = rounds.step_gradients()

    _assert_grads(_grads(net), expected)
    torch.testing.assert_close(rounds.gramians[0], all_tasks.gramians[0], rtol=1e-12, atol=1e-14)
    assert rounds.weights == pytest.approx(all_tasks.weights)
    assert total.item() == pytest.approx(sum(FIXED[n] * net(x, targets)[0][n].item() for n in NAMES))


def test_task_round_sums_repeated_task():
    x, targets = _data(rows=12)
    net = Net()
    balancer = FixedCoefficients(NAMES, net.shared(), task_gradients="weighted")
    balancer.accumulate(net(x[:6], targets={n: t[:6] for n, t in targets.items()}, names=["t0", "t1"])[0])
    balancer.accumulate(net(x[6:], targets={n: t[6:] for n, t in targets.items()}, names=["t0"])[0])
    balancer.step_gradients()
    actual = _grads(net)

    # Expected: the gradient of c_0 (L_0(a) + L_0(b)) + c_1 L_1(a), with weighted heads.
    net.zero_grad(set_to_none=True)
    first, _ = net(x[:6], {n: t[:6] for n, t in targets.items()}, names=["t0", "t1"])
    second, _ = net(x[6:], {n: t[6:] for n, t in targets.items()}, names=["t0"])
    (FIXED["t0"] * (first["t0"] + second["t0"]) + FIXED["t1"] * first["t1"]).backward()

    _assert_grads(actual, _grads(net))
    assert balancer.weights == pytest.approx({"t0": FIXED["t0"], "t1": FIXED["t1"]})


def test_features_mode_rejects_second_accumulate():
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared(), gradients="features")
    losses, features = net(x, targets, names=["t0"])
    balancer.accumulate(losses, features=features)
    losses, features = net(x, targets, names=["t1"])

    with pytest.raises(RuntimeError, match="one call per step"):
        balancer.accumulate(losses, features=features)


def test_nan_loss_task_skipped(caplog):
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared())
    losses, _ = net(x, targets)
    losses["t1"] = losses["t1"] * float("nan")

    with caplog.at_level(logging.WARNING):
        balancer.backward(losses)

    _assert_grads(_grads(net), _expected(net, x, targets, FIXED, names=["t0", "t2"]))
    assert balancer.weights == pytest.approx({"t0": FIXED["t0"], "t2": FIXED["t2"]})
    assert balancer.nonfinite_counts == {"t1": 1}


def test_nan_gradient_task_skipped():
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared())
    losses, _ = net(x, targets)
    # sqrt(w^2) at w = 0 is finite (0) with gradient 0/0 = NaN.
    zero = torch.zeros((), dtype=torch.float64)
    losses["t2"] = losses["t2"] + torch.sqrt((net.last.bias.sum() * zero) ** 2)

    balancer.backward(losses)

    _assert_grads(_grads(net), _expected(net, x, targets, FIXED, names=["t0", "t1"]))
    assert balancer.weights == pytest.approx({"t0": FIXED["t0"], "t1": FIXED["t1"]})


def test_nan_gradient_raises_when_asked():
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared(), on_nonfinite="raise")
    losses, _ = net(x, targets)
    zero = torch.zeros((), dtype=torch.float64)
    losses["t2"] = losses["t2"] + torch.sqrt((net.last.bias.sum() * zero) ** 2)

    with pytest.raises(NonFiniteLossError, match="'t2'"):
        balancer.backward(losses)


def test_explicit_task_parameters_match_inferred():
    x, targets = _data()
    net = Net()
    FixedCoefficients(NAMES, net.shared()).backward(net(x, targets)[0])
    inferred = _grads(net)
    net.zero_grad(set_to_none=True)

    FixedCoefficients(NAMES, net.shared(), task_parameters=net.head_parameters()).backward(net(x, targets)[0])

    _assert_grads(_grads(net), inferred)


def test_matches_torchjd_mean_aggregator():
    autojac = pytest.importorskip("torchjd.autojac")
    aggregation = pytest.importorskip("torchjd.aggregation")

    class Mean(GradientBalancer):
        name = "test_mean"

        def weigh(self, gramian):
            return torch.full((gramian.shape[0],), 1.0 / gramian.shape[0], dtype=gramian.dtype)

    x, targets = _data()
    net = Net()
    losses, features = net(x, targets)
    autojac.mtl_backward(list(losses.values()), features=features, shared_params=net.shared())
    autojac.jac_to_grad(net.shared(), aggregation.Mean())
    expected = _grads(net)
    net.zero_grad(set_to_none=True)

    Mean(NAMES, net.shared()).backward(net(x, targets)[0])

    _assert_grads(_grads(net), expected)


def test_constructor_rejects_invalid_options():
    net = Net()
    layer = list(net.last.parameters())
    with pytest.raises(ValueError, match="task_parameters="):
        FixedCoefficients(NAMES, layer, gradients="last_shared_layer")
    with pytest.raises(ValueError, match="full Jacobian"):
        SignAggregate(NAMES, layer, gradients="last_shared_layer", task_gradients="weighted")
    with pytest.raises(ValueError, match="gradients must be one of"):
        FixedCoefficients(NAMES, net.shared(), gradients="everything")
    with pytest.raises(ValueError, match="contains shared parameters"):
        FixedCoefficients(NAMES, net.shared(), task_parameters={"t0": layer})
    with pytest.raises(KeyError, match="unknown task"):
        FixedCoefficients(NAMES, net.shared(), task_parameters={"t9": []})
    with pytest.raises(ValueError, match="empty"):
        FixedCoefficients(NAMES, [])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        FixedCoefficients(NAMES, frozen.parameters())


def test_features_required_in_features_mode():
    net = Net()
    x, targets = _data()
    balancer = FixedCoefficients(NAMES, net.shared(), gradients="features")
    with pytest.raises(ValueError, match="needs features="):
        balancer.backward(net(x, targets)[0])


def test_invalid_weigh_output_raises():
    class Wrong(GradientBalancer):
        name = "test_wrong"

        def weigh(self, gramian):
            return torch.ones(gramian.shape[0] + 1)

    net = Net()
    x, targets = _data()
    with pytest.raises(ValueError, match="shape"):
        Wrong(NAMES, net.shared()).backward(net(x, targets)[0])


def test_generator_state_round_trips():
    net = Net()
    balancer = FixedCoefficients(NAMES, net.shared(), seed=3)
    torch.rand(5, generator=balancer.generator)
    state = balancer.state_dict()
    expected = torch.rand(4, generator=balancer.generator)

    restored = FixedCoefficients(NAMES, net.shared(), seed=99)
    restored.load_state_dict(state)

    torch.testing.assert_close(torch.rand(4, generator=restored.generator), expected)
    assert int(restored.step) == int(balancer.step)


def test_transformer_encoder_matches_explicit():
    # A small BERT: its word, position and token-type tables take the embedding-rows path.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    encoder = transformers.BertModel(config, add_pooling_layer=False).double()
    heads = nn.ModuleDict({name: nn.Linear(16, 2).double() for name in NAMES})
    ids = torch.randint(1, 60, (3, 7))
    ids[0, 5:] = 0
    targets = {name: torch.randn(3, 2, dtype=torch.float64) for name in NAMES}

    def losses():
        cls = encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0]
        return {name: ((heads[name](cls) - targets[name]) ** 2).mean() for name in NAMES}

    shared = list(encoder.parameters())
    values = losses()
    expected_shared = [torch.zeros_like(p) for p in shared]
    for name in NAMES:
        for total, g in zip(expected_shared, torch.autograd.grad(values[name], shared, retain_graph=True, allow_unused=True)):
            if g is not None:
                total.add_(FIXED[name] * g)
    expected_heads = {name: torch.autograd.grad(values[name], list(heads[name].parameters()), retain_graph=True) for name in NAMES}

    FixedCoefficients(NAMES, shared).backward(losses())

    for parameter, expected in zip(shared, expected_shared):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-10, atol=1e-12)
    for name in NAMES:
        for parameter, expected in zip(heads[name].parameters(), expected_heads[name]):
            torch.testing.assert_close(parameter.grad, expected, rtol=1e-10, atol=1e-12)


class GivenCoefficients(GradientBalancer):
    name = "test_given_coefficients"

    def __init__(self, *args, coefficients, **kwargs):
        super().__init__(*args, **kwargs)
        self.coefficients = coefficients

    def weigh(self, gramian):
        return torch.tensor([self.coefficients[name] for name in self.present_tasks], dtype=gramian.dtype)


@settings(max_examples=15, deadline=None)
@given(
    present=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True),
    values=st.lists(st.floats(min_value=-2.0, max_value=2.0, allow_nan=False), min_size=3, max_size=3),
    heads=st.sampled_from(["unweighted", "weighted"]),
)
@example(present=NAMES, values=[0.0, 1.0, -1.0], heads="weighted")
@example(present=NAMES, values=[0.0, 1.0, -1.0], heads="unweighted")
def test_fast_slow_explicit_agree(present, values, heads):
    coefficients = dict(zip(NAMES, values))
    names = [name for name in NAMES if name in present]
    x, targets = _data()
    net = Net()
    expected = _expected(net, x, targets, coefficients, heads=heads, names=names)

    GivenCoefficients(NAMES, net.shared(), coefficients=coefficients, task_gradients=heads).backward(net(x, targets, names)[0])
    fast = _grads(net)
    net.zero_grad(set_to_none=True)
    GivenCoefficients(NAMES, net.shared(), coefficients=coefficients, task_gradients=heads)(net(x, targets, names)[0]).backward()

    _assert_grads(fast, expected)
    _assert_grads(_grads(net), expected)


def test_nan_gradient_dropped_jacobian_method():
    net = Net()
    x, targets = _data()
    balancer = SignAggregate(NAMES, net.shared())
    losses, _ = net(x, targets)
    zero = torch.zeros((), dtype=torch.float64)
    losses["t0"] = losses["t0"] + torch.sqrt((net.last.bias.sum() * zero) ** 2)

    balancer.backward(losses)

    assert balancer.weights == {"t1": 1.0, "t2": 1.0}
    assert all(torch.isfinite(p.grad).all() for p in net.shared())
    assert net.heads["t0"].bias.grad is None


def test_last_shared_layer_round_equals_step():
    x, targets = _data()
    net = Net()
    options = {"gradients": "last_shared_layer", "task_parameters": net.head_parameters()}
    all_tasks = FixedCoefficients(NAMES, list(net.last.parameters()), **options)
    all_tasks.backward(net(x, targets)[0])
    expected = _grads(net)

    net = Net()
    options["task_parameters"] = net.head_parameters()
    rounds = FixedCoefficients(NAMES, list(net.last.parameters()), **options)
    for name in NAMES:
        rounds.accumulate(net(x, targets, names=[name])[0])
    rounds.step_gradients()

    _assert_grads(_grads(net), expected)
    torch.testing.assert_close(rounds.gramians[0], all_tasks.gramians[0], rtol=1e-12, atol=1e-14)


def test_features_from_another_graph_rejected() -> None:
    from multitune.balancing import build_balancer

    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 4)
    heads = {name: torch.nn.Linear(4, 1) for name in ("a", "b")}
    balancer = build_balancer("mgda_ub", ["a", "b"], shared_parameters=list(encoder.parameters()))
    inputs = torch.randn(8, 4)
    stale_features = encoder(inputs)
    features = encoder(inputs)
    losses = {name: head(features).pow(2).mean() for name, head in heads.items()}

    with pytest.raises(ValueError, match="does not depend on the features"):
        balancer.backward(losses, features=stale_features)

    losses = {name: head(features).pow(2).mean() for name, head in heads.items()}
    balancer.backward(losses, features=features)
    assert sum(balancer.weights.values()) == pytest.approx(1.0, abs=1e-5)
