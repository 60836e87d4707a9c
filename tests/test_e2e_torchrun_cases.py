"""Distributed cases on two CPU processes under torchrun (gloo) that once went wrong.

1. A rank whose losses are all non-finite must still make the balancer's collective calls, so
   the ranks agree on the tasks left out of a step.
2. A rank whose batch of a task has no labelled example must not halve that task's loss: two
   ranks match one process with the same global batch, also in steps where a task has few labels.
3. DWA's period statistics are the same on every rank, so a resumed two-rank run matches the
   uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _multidigits_helpers import build_small_multidigits, without_dropout, write_config
from safetensors.torch import load_file

TIMEOUT_S = 60
LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}

NONFINITE_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
from multitune.balancing import build_balancer
from multitune.distributed import init_from_environment, mean_across_ranks

init_from_environment(use_cpu=True)
rank = dist.get_rank()
balancer = build_balancer("task_normalization", ["a", "b"])
balancer.set_reduce_fn(mean_across_ranks)
parameter = torch.nn.Parameter(torch.ones(2))
if rank == 0:
    first = {"a": parameter[0] * float("nan"), "b": parameter[1] * float("inf")}
else:
    first = {"a": parameter[0] * 2.0, "b": parameter[1] * 3.0}
balancer(first)
balancer({"a": parameter[0] * 1.0, "b": parameter[1] * 1.0})
# The trainer's next collective call: the all-reduce of the gradients, of another size.
gradients = torch.ones(5)
dist.all_reduce(gradients)
torch.save(balancer.state_dict(), f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
'''


def _launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, cwd=cwd, env=ENVIRONMENT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} did not finish within {TIMEOUT_S} s (a collective call is waiting)")


def _run(command: list[str], cwd: Path) -> None:
    completed = _launch(command, cwd)
    assert completed.returncode == 0, f"{' '.join(command)} exited with {completed.returncode}:\n{completed.stderr[-3000:]}"


def _train_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [row for row in map(json.loads, lines) if row["type"] == "train"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_multidigits(tmp_path_factory.mktemp("torchrun_cases"))


def test_nonfinite_losses_on_one_rank(tmp_path: Path) -> None:
    script = tmp_path / "nonfinite.py"
    script.write_text(NONFINITE_SCRIPT, encoding="utf-8")

    completed = _launch([*LAUNCHER, str(script), str(tmp_path)], tmp_path)

    assert completed.returncode == 0, f"the ranks' collective calls do not match:\n{completed.stderr[-3000:]}"
    first = torch.load(tmp_path / "rank0.pt")
    second = torch.load(tmp_path / "rank1.pt")
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), f"balancer state {key!r} differs between the ranks"


def test_unlabelled_batch_on_one_rank(root: Path) -> None:
    # Only every 40th row has a 'sum' label, so in some steps one rank's 'sum' batch has none.
    rows = [json.loads(line) for line in (root / "data" / "multidigits" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    for index, row in enumerate(rows):
        if index % 40:
            row["sum"] = None
    sparse = root / "data" / "sparse.jsonl"
    sparse.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    settings = {"max_steps": 8, "eval_steps": 100, "save_steps": 100}
    configs = {}
    for name, batch_size in (("two", 8), ("one", 16)):
        path = write_config(root, f"sparse_{name}.yaml", tasks=("left", "sum"), output_dir=str(root / f"sparse_{name}"), per_device_train_batch_size=batch_size, **settings)
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        config["tasks"]["sum"]["train"] = "data/sparse.jsonl"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        configs[name] = without_dropout(path)

    _run([*LAUNCHER, "-m", "multitune", "-q", "train", str(configs["two"])], root)
    _run([sys.executable, "-m", "multitune", "-q", "train", str(configs["one"])], root)

    two_ranks = _train_rows(root / "sparse_two")
    one_process = _train_rows(root / "sparse_one")
    assert [row["step"] for row in two_ranks] == [row["step"] for row in one_process]
    # A step in which no example of the global batch has a 'sum' label leaves the task out.
    assert any("sum" in row["losses"] for row in one_process)
    assert any("sum" not in row["losses"] for row in one_process)
    for distributed, single in zip(two_ranks, one_process):
        step = single["step"]
        assert distributed["losses"].keys() == single["losses"].keys(), f"step {step}"
        for task, loss in single["losses"].items():
            assert distributed["losses"][task] == pytest.approx(loss, rel=1e-5, abs=1e-7), f"step {step}: {task!r} loss"
            assert distributed["weights"][task] == pytest.approx(single["weights"][task], rel=1e-4), f"step {step}: {task!r} weight"


def test_dwa_resume_mid_period(root: Path) -> None:
    settings = {"max_steps": 12, "eval_steps": 100, "save_steps": 3, "per_device_train_batch_size": 8}
    full = write_config(root, "dwa_full.yaml", output_dir=str(root / "dwa_full"), **settings)
    config = yaml.safe_load(full.read_text(encoding="utf-8"))
    config["balancer"] = {"name": "dwa", "steps_per_epoch": 5}
    full.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    full = without_dropout(full)
    _run([*LAUNCHER, "-m", "multitune", "-q", "train", str(full)], root)

    # A copy of the run cut back to a crash after step 3, in the middle of DWA's first period.
    resumed = root / "dwa_resumed"
    resumed.mkdir()
    shutil.copytree(root / "dwa_full" / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(root / "dwa_full" / "metrics.jsonl", resumed / "metrics.jsonl")
    config = yaml.safe_load(full.read_text(encoding="utf-8"))
    config["training"]["output_dir"] = str(resumed)
    resumed_config = root / "dwa_resumed.yaml"
    resumed_config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    _run([*LAUNCHER, "-m", "multitune", "-q", "train", str(resumed_config), "--resume"], root)

    uninterrupted = load_file(root / "dwa_full" / "checkpoint-12" / "model.safetensors")
    continued = load_file(resumed / "checkpoint-12" / "model.safetensors")
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, continued[name]), f"{name} differs after resuming"
