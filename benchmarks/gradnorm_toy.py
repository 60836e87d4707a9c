"""Reproduce the synthetic multi-task regression of the GradNorm paper with three balancers.

Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018, section "Toy example": task ``i`` regresses

    f_i(x) = sigma_i * tanh((B + eps_i) x)

with x of dimension 250 and outputs of dimension 100. ``B`` and every ``eps_i`` are 100 x 250
matrices with entries drawn from N(0, 10^2) and N(0, 3.5^2), where 10 and 3.5 are standard
deviations. The tasks share ``B`` and differ by ``eps_i``, and ``sigma_i`` sets the scale of
task ``i``. The network is four shared ReLU layers of 100 units and one linear head per task,
trained on the mean squared error of every task. GradNorm uses alpha = 0.12 and the weight of
the last shared layer.

The paper does not give the input distribution. Here x ~ N(0, s^2 I) with s = 1 / (10 sqrt(250)),
so the entries of B x have unit standard deviation and tanh is not saturated. The network's
input is x / s (standardised inputs), which gives the same function class. Each seed draws its own B,
eps_i, training set and test set, and all methods of a seed start from the same network.

Metric (the paper's): the sum over tasks of the test loss divided by that task's test loss at
initialisation, sum_i L_i(t) / L_i(0), at the last step; lower is better.

Usage::

    python benchmarks/gradnorm_toy.py [--steps 2000] [--seeds 3] [--threads 1] [--json results.json]

Writes docs/img/gradnorm_toy_weights.png (GradNorm's weights over the steps, first seed) and
docs/img/gradnorm_toy_loss_ratio.png (the metric over the steps, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ToyMLP, machine_summary, set_threads  # noqa: E402

from multitune.balancing import build_balancer  # noqa: E402

INPUT_DIM = 250
OUTPUT_DIM = 100
METHODS = ("equal", "gradnorm", "task_normalization")
CONFIGS = {
    "T2": (1.0, 100.0),
    "T10": tuple(float(value) for value in torch.logspace(0, 2, 10, dtype=torch.float64).tolist()),
}
ROOT = Path(__file__).resolve().parent.parent


def make_data(seed: int, sigmas: tuple[float, ...], num_train: int, num_test: int) -> dict[str, Tensor]:
    """Draw B, eps_i, inputs and the targets of every task for one seed."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(OUTPUT_DIM, INPUT_DIM, generator=generator) * 10.0
    specific = torch.randn(len(sigmas), OUTPUT_DIM, INPUT_DIM, generator=generator) * 3.5
    input_scale = 1.0 / (10.0 * math.sqrt(INPUT_DIM))
    x_train = torch.randn(num_train, INPUT_DIM, generator=generator)
    x_test = torch.randn(num_test, INPUT_DIM, generator=generator)

    def targets(x: Tensor) -> Tensor:
        # Shape (tasks, examples, outputs); x is the standardised input, x * input_scale the paper's.
        matrices = shared.unsqueeze(0) + specific
        sigma = torch.tensor(sigmas).view(-1, 1, 1)
        return sigma * torch.tanh(torch.einsum("ni,toi->tno", x * input_scale, matrices))

    return {"x_train": x_train, "y_train": targets(x_train), "x_test": x_test, "y_test": targets(x_test)}


def evaluate_test_losses(model: ToyMLP, data: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        _, outputs = model(data["x_test"])
        return torch.stack([nn.functional.mse_loss(output, data["y_test"][i]) for i, output in enumerate(outputs)])


def train(method: str, seed: int, sigmas: tuple[float, ...], data: dict[str, Tensor], args: argparse.Namespace) -> dict:
    """Train one network with one balancer; return the metric curve and GradNorm's weights."""
    names = [f"task{i}" for i in range(len(sigmas))]
    torch.manual_seed(seed)
    model = ToyMLP(len(sigmas), INPUT_DIM, 100, OUTPUT_DIM)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    hyperparameters = {"alpha": args.alpha} if method == "gradnorm" else {}
    balancer = build_balancer(method, names, shared_parameters=[model.last_shared_layer.weight], **hyperparameters)

    initial = evaluate_test_losses(model, data)
    curve_steps, curve = [0], [float(len(sigmas))]
    weight_steps: list[int] = []
    weights: list[list[float]] = []
    order = torch.Generator().manual_seed(seed + 1)
    num_train = data["x_train"].shape[0]
    permutation = torch.randperm(num_train, generator=order)
    position = 0

    for step in range(1, args.steps + 1):
        if position + args.batch_size > num_train:
            permutation = torch.randperm(num_train, generator=order)
            position = 0
        index = permutation[position : position + args.batch_size]
        position += args.batch_size

        _, outputs = model(data["x_train"][index])
        losses = {name: nn.functional.mse_loss(outputs[i], data["y_train"][i, index]) for i, name in enumerate(names)}
        optimizer.zero_grad(set_to_none=True)
        balancer(losses).backward()
        optimizer.step()

        if method == "gradnorm" and (step % args.record_every == 0 or step == 1):
            weight_steps.append(step)
            weights.append(balancer.task_weights.tolist())
        if step % args.eval_every == 0 or step == args.steps:
            ratios = evaluate_test_losses(model, data) / initial
            curve_steps.append(step)
            curve.append(float(ratios.sum()))

    return {
        "curve_steps": curve_steps,
        "curve": curve,
        "final_task_ratios": ratios.tolist(),
        "final_weights": list(balancer.weights.values()),
        "weight_steps": weight_steps,
        "weights": weights,
    }


def summarise(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def plot(results: dict, configs: dict[str, tuple[float, ...]], seeds: list[int], image_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    figure, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4), squeeze=False)
    for axis, (config, sigmas) in zip(axes[0], configs.items()):
        run = results[config]["gradnorm"][seeds[0]]
        weights = torch.tensor(run["weights"])
        colors = plt.cm.viridis(torch.linspace(0, 1, len(sigmas)).tolist())
        for i, sigma in enumerate(sigmas):
            axis.plot(run["weight_steps"], weights[:, i].tolist(), color=colors[i], label=f"σ = {sigma:.3g}")
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_ylabel("GradNorm weight w_i")
        axis.set_title(f"T = {len(sigmas)}, seed {seeds[0]}")
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    paths.append(image_dir / "gradnorm_toy_weights.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4), squeeze=False)
    for axis, (config, sigmas) in zip(axes[0], configs.items()):
        for method in METHODS:
            runs = [results[config][method][seed] for seed in seeds]
            mean_curve = torch.tensor([run["curve"] for run in runs]).mean(dim=0)
            axis.plot(runs[0]["curve_steps"], mean_curve.tolist(), label=method)
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_ylabel("Σ_i test loss_i / initial test loss_i")
        axis.set_title(f"T = {len(sigmas)}, mean of {len(seeds)} seeds")
        axis.legend()
    figure.tight_layout()
    paths.append(image_dir / "gradnorm_toy_loss_ratio.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per run (default 2000)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0 .. N-1 (default 3)")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per step (default 100)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the network (default 1e-3)")
    parser.add_argument("--alpha", type=float, default=0.12, help="GradNorm alpha (default 0.12, the paper's)")
    parser.add_argument("--num-train", type=int, default=10000, help="training examples per seed (default 10000)")
    parser.add_argument("--num-test", type=int, default=2000, help="test examples per seed (default 2000)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations (default 100)")
    parser.add_argument("--record-every", type=int, default=10, help="steps between recorded GradNorm weights (default 10)")
    parser.add_argument("--configs", default="T2,T10", help="comma-separated subset of T2,T10 (default both)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the matrices are small)")
    parser.add_argument("--json", type=Path, help="also write all curves and weights to this JSON file")
    parser.add_argument("--image-dir", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (default docs/img)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = parser.parse_args()

    set_threads(args.threads)
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    seeds = list(range(args.seeds))
    print(f"machine: {machine_summary()}")
    print(f"steps {args.steps}, batch {args.batch_size}, Adam lr {args.lr}, alpha {args.alpha}, seeds {seeds}")

    started = time.perf_counter()
    results: dict = {}
    for config, sigmas in configs.items():
        results[config] = {method: {} for method in METHODS}
        for seed in seeds:
            data = make_data(seed, sigmas, args.num_train, args.num_test)
            for method in METHODS:
                results[config][method][seed] = train(method, seed, sigmas, data, args)
    elapsed = time.perf_counter() - started

    print()
    print("| config | sigmas | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for config, sigmas in configs.items():
        cells = [summarise([results[config][method][seed]["curve"][-1] for seed in seeds]) for method in METHODS]
        sigma_text = ", ".join(f"{sigma:.3g}" for sigma in sigmas)
        print(f"| T = {len(sigmas)} | {sigma_text} | " + " | ".join(cells) + " |")
    print()
    for config, sigmas in configs.items():
        for seed in seeds:
            cells = ", ".join(f"{method} {results[config][method][seed]['curve'][-1]:.3f}" for method in METHODS)
            print(f"T = {len(sigmas)} seed {seed}: {cells}")
            for method in METHODS:
                run = results[config][method][seed]
                task_ratios = ", ".join(f"{r:.2f}" for r in run["final_task_ratios"])
                weights = ", ".join(f"{w:.3g}" for w in run["final_weights"])
                print(f"    {method}: test loss / initial per task [{task_ratios}], last weights [{weights}]")
    print(f"\ntotal time {elapsed:.0f} s")

    if not args.no_plots:
        for path in plot(results, configs, seeds, args.image_dir):
            print(f"wrote {path}")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
