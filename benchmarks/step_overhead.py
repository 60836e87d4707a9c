"""Time one training step with every registered balancer against a plain summed-loss step.

One step is: ``.grad`` set to None, the forward pass, the task losses and the backward pass
(no optimizer step, which would add the same time to every variant). The variants are:

- ``plain``: ``sum(losses.values()).backward()``.
- every name in ``multitune.balancing.available_balancers()``: ``balancer(losses).backward()``,
  or ``balancer.backward(losses, features=features)`` for a balancer class that overrides
  :meth:`~multitune.balancing.Balancer.backward` (GradNorm and the gradient-based methods). GradNorm gets the
  weight of the last shared layer as ``shared_parameters``; other methods that need shared
  parameters get all the shared (non-head) parameters.
- two more GradNorm variants: ``update_every=4``, and (BERT only) the weight of the LayerNorm
  that ends the encoder as ``shared_parameters``, a cheaper choice of the last shared layer.

Models (see ``benchmarks/_common.py``):

- ``toy``: the GradNorm paper's MLP (250 inputs, four shared ReLU layers of 100 units), three
  100-output heads, batch 100.
- ``bert``: a MiniLM-shaped ``transformers.BertModel`` (6 layers, hidden 384, 12 attention
  heads, intermediate 1536, random init) with 3-class, 5-class and regression heads on the
  [CLS] state, batch 16 x 64 tokens.

Timing: all variants run in one process with ``torch.set_num_threads(2)``. Each round runs
every variant once, in an order rotated by one per round, after warm-up rounds. The reported
ratio is the median over rounds of (variant time / plain time in the same round), which
cancels slow drifts in machine load. The ratio of fastest steps (minimum over rounds of the
variant over minimum of plain) estimates the cost without interference from other processes.
The CPU-time ratio is the same median over
``time.process_time()`` (all threads of the process), which other processes on the machine
disturb less than wall-clock time; the 1-minute load average is printed with each model.

Memory: each variant also runs in its own subprocess: one warm-up step, then the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``, Linux) and a few more steps run; the
subprocess reports the peak resident set size (``VmHWM``) of those steps. That peak includes
the resident Python, torch and model memory, so the comparison is the difference to the
``plain`` subprocess. Where the reset is not allowed, the whole-process
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is reported instead.

Usage::

    python benchmarks/step_overhead.py [--models toy,bert] [--only gradnorm,task_normalization]
                                       [--rounds N] [--warmup 2] [--memory-steps 3] [--no-memory]
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
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BERT_TASKS, BertMultiTask, ToyMLP, bert_batch, machine_summary, set_threads  # noqa: E402

from multitune.balancing import Balancer, available_balancers, build_balancer, get_balancer_class  # noqa: E402

TOY_TASKS = ("task0", "task1", "task2")
DEFAULT_ROUNDS = {"toy": 200, "bert": 12}
# Hyper-parameters a balancer cannot be built without.
REQUIRED_HYPERPARAMETERS: dict[str, Callable[[tuple[str, ...]], dict]] = {
    "static": lambda tasks: {"weights": dict.fromkeys(tasks, 1.0)},
}
# Methods whose shared_parameters are the last shared layer rather than every shared parameter.
LAST_LAYER_METHODS = {"gradnorm"}
# Extra variants of a registered method: label -> (registry name, hyper-parameters, shared parameters).
# "last_norm" is the LayerNorm weight that ends the BERT encoder (the toy model has none).
EXTRA_VARIANTS: dict[str, tuple[str, dict, str]] = {
    "gradnorm (update_every=4)": ("gradnorm", {"update_every": 4}, "last_layer"),
    "gradnorm (W = last LayerNorm)": ("gradnorm", {}, "last_norm"),
}


class Workload:
    """A model, one fixed batch and the forward pass that returns (features, losses)."""

    def __init__(self, model_name: str) -> None:
        torch.manual_seed(0)
        self.name = model_name
        if model_name == "toy":
            self.tasks = TOY_TASKS
            self.model: nn.Module = ToyMLP(len(TOY_TASKS))
            generator = torch.Generator().manual_seed(0)
            self.x = torch.randn(100, 250, generator=generator)
            self.y = torch.randn(len(TOY_TASKS), 100, 100, generator=generator)
        elif model_name == "bert":
            self.tasks = BERT_TASKS
            self.model = BertMultiTask()
            self.batch = bert_batch()
        else:
            raise ValueError(f"unknown model {model_name!r}; use toy or bert")
        # A training loop has an optimizer. The timed step does not call it, but creating it
        # imports torch._dynamo (about 70 MiB resident in torch 2.13), so every variant's
        # memory baseline includes that import, not only the variants whose balancer has an
        # optimizer of its own (GradNorm).
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def shared_parameters(self) -> list[nn.Parameter]:
        heads = {id(parameter) for parameter in self.model.heads.parameters()}
        return [parameter for parameter in self.model.parameters() if id(parameter) not in heads]

    def forward(self) -> tuple[Tensor, dict[str, Tensor]]:
        if self.name == "toy":
            features, outputs = self.model(self.x)
            losses = {name: nn.functional.mse_loss(outputs[i], self.y[i]) for i, name in enumerate(self.tasks)}
            return features, losses
        return self.model(self.batch)

    def make_balancer(self, variant: str) -> Balancer | None:
        """Build the balancer of a registry name or of an extra variant; None if the model lacks its layer."""
        if variant in EXTRA_VARIANTS:
            name, hyperparameters, shared_kind = EXTRA_VARIANTS[variant]
        else:
            name, hyperparameters = variant, {}
            shared_kind = "last_layer" if variant in LAST_LAYER_METHODS else "all"

        if shared_kind == "last_layer":
            shared = [self.model.last_shared_layer.weight]
        elif shared_kind == "last_norm":
            if self.name != "bert":
                return None
            shared = [self.model.encoder.encoder.layer[-1].output.LayerNorm.weight]
        else:
            shared = self.shared_parameters()
        hyperparameters = {**REQUIRED_HYPERPARAMETERS.get(name, lambda tasks: {})(self.tasks), **hyperparameters}
        return build_balancer(name, self.tasks, shared_parameters=shared, **hyperparameters)

    def step(self, balancer: Balancer | None) -> None:
        self.model.zero_grad(set_to_none=True)
        features, losses = self.forward()
        if balancer is None:
            sum(losses.values()).backward()
        elif type(balancer).backward is not Balancer.backward:
            balancer.backward(losses, features=features)
        else:
            balancer(losses).backward()


def time_variants(
    workload: Workload, names: list[str], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, str]]:
    """Return the wall-clock and CPU times of every variant per round, and the variants that failed."""
    balancers: dict[str, Balancer | None] = {"plain": None}
    failures: dict[str, str] = {}
    for name in names:
        try:
            balancer = workload.make_balancer(name)
            if balancer is None:
                continue
            workload.step(balancer)
            balancers[name] = balancer
        except Exception as error:  # a benchmark reports a broken method and goes on with the rest
            failures[name] = f"{type(error).__name__}: {error}"

    variants = list(balancers)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    cpu_times: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(warmup + rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            started, cpu_started = time.perf_counter(), time.process_time()
            workload.step(balancers[variant])
            elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
            if round_index >= warmup:
                times[variant].append(elapsed)
                cpu_times[variant].append(cpu_elapsed)
    return times, cpu_times, failures


def peak_memory(model_name: str, variant: str, steps: int, threads: int) -> float | None:
    """Run ``steps`` steps of one variant in a subprocess and return its peak RSS during them, in MiB."""
    command = [sys.executable, __file__, "--child", model_name, variant, "--memory-steps", str(steps), "--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        print(f"memory run of {model_name}/{variant} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_kib"] / 1024.0


def run_child(model_name: str, variant: str, steps: int) -> None:
    """Print the peak RSS of ``steps`` training steps, after one warm-up step, as JSON (KiB)."""
    workload = Workload(model_name)
    balancer = None if variant == "plain" else workload.make_balancer(variant)
    workload.step(balancer)
    peak_was_reset = reset_peak_rss()
    for _ in range(steps):
        workload.step(balancer)
    if peak_was_reset:
        peak = read_peak_rss_kib()
    else:
        # Without a reset the peak covers the whole process, imports and model set-up included.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": peak, "peak_covers_steps_only": peak_was_reset}))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; return False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def read_peak_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status")


def paired_ratios(values: list[float], plain: list[float]) -> tuple[float, float, float]:
    """Return the median and the quartiles of the per-round ratios ``values[r] / plain[r]``."""
    ratios = sorted(value / base for value, base in zip(values, plain))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high


def report(
    model_name: str,
    times: dict[str, list[float]],
    cpu_times: dict[str, list[float]],
    failures: dict[str, str],
    memory: dict[str, float | None],
) -> None:
    print(f"\n### {model_name}: {len(times['plain'])} rounds\n")
    print(
        "| variant | median step (ms) | ratio to plain | ratio IQR | ratio of fastest steps | CPU-time ratio "
        "| peak RSS of the steps (MiB) | RSS - plain (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    plain_memory = memory.get("plain")
    for variant, values in times.items():
        ratio, low, high = paired_ratios(values, times["plain"])
        cpu_ratio, _, _ = paired_ratios(cpu_times[variant], cpu_times["plain"])
        rss = memory.get(variant)
        rss_text = f"{rss:.0f}" if rss is not None else "-"
        delta = f"{rss - plain_memory:+.0f}" if rss is not None and plain_memory is not None else "-"
        fastest_ratio = min(values) / min(times["plain"])
        print(
            f"| {variant} | {statistics.median(values) * 1e3:.2f} | {ratio:.3f} | {low:.3f}–{high:.3f} "
            f"| {fastest_ratio:.3f} | {cpu_ratio:.3f} | {rss_text} | {delta} |"
        )
    for name, message in failures.items():
        print(f"| {name} | failed: {message} | | | | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="toy,bert", help="comma-separated subset of toy,bert (default both)")
    parser.add_argument("--only", help="comma-separated balancer names (default: every registered balancer)")
    parser.add_argument("--rounds", type=int, help="timed rounds per model (default 200 for toy, 12 for bert)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each memory subprocess (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)

    if args.child:
        run_child(args.child[0], args.child[1], args.memory_steps)
        return

    names = available_balancers()
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        for name in names:
            get_balancer_class(name)
    names += [label for label, (name, _, _) in EXTRA_VARIANTS.items() if name in names]

    print(f"machine: {machine_summary()}")
    print(f"balancers: {', '.join(names)}")
    for model_name in args.models.split(","):
        rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS[model_name]
        started = time.perf_counter()
        load_before = os.getloadavg()[0]
        times, cpu_times, failures = time_variants(Workload(model_name), names, rounds, args.warmup)
        load_after = os.getloadavg()[0]
        memory: dict[str, float | None] = {}
        if not args.no_memory:
            for variant in times:
                memory[variant] = peak_memory(model_name, variant, args.memory_steps, args.threads)
        report(model_name, times, cpu_times, failures, memory)
        print(
            f"\n({model_name} took {time.perf_counter() - started:.0f} s; "
            f"1-minute load average {load_before:.2f} before the timing, {load_after:.2f} after)"
        )


if __name__ == "__main__":
    main()
