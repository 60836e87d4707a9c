"""Time one gradient-based multi-task step on a MiniLM-shaped encoder, against TorchJD.

Model: ``transformers.BertModel`` with a random MiniLM-L6 configuration: 6 layers, hidden size
384, 12 attention heads, intermediate size 1536, 22.6 M parameters. A batch has 16 x 64 tokens,
and three small heads read the [CLS] state (3-class and 5-class cross-entropy, 1-output MSE).

Variants (each a full step: forward, backward, ``.grad`` written; ``.grad`` set to None between
steps):

- ``plain``: ``sum(losses).backward()``.
- ``reference``: one forward, then ``loss_i.backward(retain_graph=True)`` for each task: the
  cost floor of any exact per-task-gradient method.
- ``engine_equal``: :class:`multitune.balancing.GradientBalancer` with equal coefficients,
  ``gradients="shared"``, heads found in the graph.
- ``engine_upgrad``: the same engine, coefficients from TorchJD's ``UPGradWeighting`` applied to
  the engine's Gramian (the same method as the ``torchjd`` variant, a different engine).
- ``engine_upgrad_heads``: as ``engine_upgrad`` with ``task_parameters`` given.
- ``engine_slow``: the slow path, ``balancer(losses).backward()`` (T + 1 backward passes).
- ``engine_features``: ``gradients="features"`` on the [CLS] state (MGDA-UB style).
- ``engine_last_layer``: ``gradients="last_shared_layer"`` on the last transformer layer's 16
  parameter tensors, with ``task_parameters`` given.
- ``torchjd``: TorchJD ``mtl_backward(losses, features=cls)`` then ``jac_to_grad(shared, UPGrad())``.
- ``batched_grad``: one ``torch.autograd.grad(stacked_losses, params, grad_outputs=eye(T),
  is_grads_batched=True)`` call (vmap over the T backward passes), mean of the rows to ``.grad``.

Times: one subprocess per round builds the model once and runs the variants in turn, step by
step, so that load from other processes is spread over all of them. Wall time and process CPU
time (``time.process_time``, all threads) are recorded; on a machine shared with other jobs the
CPU time is the steadier figure. Memory: each variant runs three steps in its own subprocess, so
its peak resident memory (``ru_maxrss``) is its own.

TorchJD's default UPGrad projector imports ``qpsolvers``; when that package is missing this
script gives UPGrad a projector that calls ``quadprog`` directly on the same problem
(minimise v^T G v subject to v >= u, after scaling G by its mean diagonal and adding 1e-4 I).

Usage::

    python benchmarks/gradient_step.py [--steps 6] [--rounds 3] [--variants plain,reference,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = (
    "plain",
    "reference",
    "engine_equal",
    "engine_upgrad",
    "engine_upgrad_heads",
    "engine_slow",
    "engine_features",
    "engine_last_layer",
    "torchjd",
    "batched_grad",
)


def _upgrad_weighting():
    """Return TorchJD's UPGrad weighting, with a quadprog projector if qpsolvers is missing."""
    from torchjd.aggregation import UPGradWeighting

    try:
        return UPGradWeighting()
    except ImportError:
        return UPGradWeighting(projector=_quadprog_projector())


def _upgrad_aggregator():
    from torchjd.aggregation import UPGrad

    try:
        return UPGrad()
    except ImportError:
        return UPGrad(projector=_quadprog_projector())


def _quadprog_projector():
    import numpy as np
    import quadprog
    import torch
    from torchjd._linalg._dual_cone import DualConeProjector  # private in torchjd 0.18

    class QuadprogDirect(DualConeProjector):
        def __call__(self, U, G):
            g = G.detach().cpu().double().numpy()
            scale = max(float(np.mean(np.diag(g))), 1e-4)
            g = g / scale + 1e-4 * np.eye(g.shape[0])
            u = U.detach().cpu().double().numpy()
            flat = u.reshape(-1, g.shape[0])
            identity = np.eye(g.shape[0])
            out = np.stack([quadprog.solve_qp(g, np.zeros(g.shape[0]), identity, row)[0] for row in flat])
            return torch.as_tensor(out.reshape(u.shape), dtype=G.dtype, device=G.device)

    return QuadprogDirect()


def _build(threads: int):
    """Build the encoder, heads, data and a forward function (seeded, identical in every process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    from multitune.balancing import GradientBalancer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    encoder = BertModel(config, add_pooling_layer=False)
    heads = nn.ModuleDict({"a": nn.Linear(384, 3), "b": nn.Linear(384, 5), "c": nn.Linear(384, 1)})
    shared = list(encoder.parameters())
    everything = shared + list(heads.parameters())

    input_ids = torch.randint(0, config.vocab_size, (16, 64))
    attention_mask = torch.ones(16, 64, dtype=torch.long)
    labels = {"a": torch.randint(0, 3, (16,)), "b": torch.randint(0, 5, (16,)), "c": torch.randn(16, 1)}

    def forward():
        cls = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        losses = {
            "a": nn.functional.cross_entropy(heads["a"](cls), labels["a"]),
            "b": nn.functional.cross_entropy(heads["b"](cls), labels["b"]),
            "c": nn.functional.mse_loss(heads["c"](cls), labels["c"]),
        }
        return losses, cls

    class Equal(GradientBalancer):
        name = "benchmark_equal"

        def weigh(self, gramian):
            return torch.full((gramian.shape[0],), 1.0 / gramian.shape[0], dtype=gramian.dtype)

    class UPGradLike(GradientBalancer):
        name = "benchmark_upgrad"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.weighting = _upgrad_weighting()

        def weigh(self, gramian):
            return self.weighting(gramian)

    names = list(heads)
    head_parameters = {name: list(heads[name].parameters()) for name in names}

    def make_step(variant):
        return _make_step(variant, forward, names, shared, head_parameters, Equal, UPGradLike)

    def clear():
        for parameter in everything:
            parameter.grad = None

    return make_step, clear


def measure_memory(variant: str, threads: int, steps: int = 3) -> float:
    """Return the peak resident memory (MiB) of a process that builds the model and runs ``steps`` steps."""
    make_step, clear = _build(threads)
    step = make_step(variant)
    for _ in range(steps):
        step()
        clear()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_times(variants: list[str], threads: int, steps: int) -> dict[str, dict[str, list[float]]]:
    """Time the variants in one process, interleaved step by step; wall and process CPU milliseconds."""
    make_step, clear = _build(threads)
    step_functions = {variant: make_step(variant) for variant in variants}
    for step in step_functions.values():  # warm-up
        step()
        clear()

    times: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in variants}
    for _ in range(steps):
        for variant, step in step_functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            clear()
            times[variant]["wall"].append(1000 * (time.perf_counter() - wall))
            times[variant]["cpu"].append(1000 * (time.process_time() - cpu))
    return times


def _make_step(variant, forward, names, shared, head_parameters, Equal, UPGradLike):
    if variant == "plain":

        def step():
            losses, _ = forward()
            sum(losses.values()).backward()

    elif variant == "reference":

        def step():
            losses, _ = forward()
            values = list(losses.values())
            for index, loss in enumerate(values):
                loss.backward(retain_graph=index < len(values) - 1)

    elif variant in ("engine_equal", "engine_upgrad", "engine_upgrad_heads", "engine_features"):
        cls = Equal if variant == "engine_equal" else UPGradLike
        options = {}
        if variant == "engine_upgrad_heads":
            options["task_parameters"] = head_parameters
        if variant == "engine_features":
            options["gradients"] = "features"
        balancer = cls(names, shared, **options)
        use_features = variant == "engine_features"

        def step():
            losses, features = forward()
            balancer.backward(losses, features=features if use_features else None)

    elif variant == "engine_last_layer":
        # encoder.parameters() ends with the last transformer layer's 16 tensors.
        balancer = UPGradLike(names, shared[-16:], gradients="last_shared_layer", task_parameters=head_parameters)

        def step():
            losses, _ = forward()
            balancer.backward(losses)

    elif variant == "engine_slow":
        balancer = UPGradLike(names, shared)

        def step():
            losses, _ = forward()
            balancer(losses).backward()

    elif variant == "torchjd":
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = _upgrad_aggregator()

        def step():
            losses, features = forward()
            mtl_backward(list(losses.values()), features=features, shared_params=shared)
            jac_to_grad(shared, aggregator)

    elif variant == "batched_grad":
        import torch

        parameters = shared + [p for name in names for p in head_parameters[name]]

        def step():
            losses, _ = forward()
            stacked = torch.stack(list(losses.values()))
            identity = torch.eye(len(names), dtype=stacked.dtype)
            jacobians = torch.autograd.grad(stacked, parameters, grad_outputs=identity, is_grads_batched=True)
            for parameter, jacobian in zip(parameters, jacobians):
                parameter.grad = jacobian.mean(0)

    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="timing subprocesses (each interleaves all variants)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every subprocess")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]

    if args.child == "times":
        print(json.dumps(measure_times(variants, args.threads, args.steps)))
        return
    if args.child:
        print(json.dumps({"peak_mib": measure_memory(args.child, args.threads)}))
        return

    base = [sys.executable, __file__, "--threads", str(args.threads), "--variants", ",".join(variants)]
    walls: dict[str, list[float]] = {v: [] for v in variants}
    cpus: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        output = subprocess.run(base + ["--child", "times", "--steps", str(args.steps)], check=True, capture_output=True, text=True).stdout
        for variant, row in json.loads(output.strip().splitlines()[-1]).items():
            walls[variant].extend(row["wall"])
            cpus[variant].extend(row["cpu"])

    memory: dict[str, float] = {}
    if not args.no_memory:
        for variant in variants:
            output = subprocess.run(base + ["--child", variant], check=True, capture_output=True, text=True).stdout
            memory[variant] = json.loads(output.strip().splitlines()[-1])["peak_mib"]

    wall = {v: statistics.median(t) for v, t in walls.items()}
    wall_min = {v: min(t) for v, t in walls.items()}
    cpu = {v: statistics.median(t) for v, t in cpus.items()}

    def ratio(table, variant, reference):
        return f"{table[variant] / table[reference]:.3f}" if reference in table else "-"

    print(f"threads={args.threads}, {args.rounds} x {args.steps} interleaved steps per variant")
    print("| variant | wall ms (median) | wall ms (min) | CPU ms (median) | wall / plain | wall / fwd+T bwd | CPU / fwd+T bwd | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in variants:
        peak = f"{memory[variant]:.0f}" if variant in memory else "-"
        print(
            f"| {variant} | {wall[variant]:.0f} | {wall_min[variant]:.0f} | {cpu[variant]:.0f} | "
            f"{ratio(wall, variant, 'plain')} | {ratio(wall, variant, 'reference')} | {ratio(cpu, variant, 'reference')} | {peak} |"
        )


if __name__ == "__main__":
    main()
