"""``multitune train`` under torchrun: two CPU processes (gloo) against one process with twice the batch.

Rank ``r`` of ``W`` takes the entries ``r, r + W, ...`` of each task's shared permutation, so at
every step the two ranks' batches of size ``b`` together are exactly the one-process batch of size
``2b``. Every loss is a mean over equally many examples per rank, and the trainer averages the
gradients over the ranks, so both runs take the same optimizer steps up to float rounding. The
heads' dropout is off, because the two runs draw different dropout masks.
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
from _multidigits_helpers import build_small_multidigits, cut_run_before_checkpoint, without_dropout, write_config
from safetensors.torch import load_file

from multitune.training import read_metrics

TIMEOUT_S = 300
STEPS = 6
LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        # Gloo's data connections stay on the loopback interface.
        "GLOO_SOCKET_IFNAME": "lo",
    }
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert completed.returncode == 0, f"{' '.join(command)} exited with {completed.returncode}:\n{completed.stderr[-4000:]}"
    return completed


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = build_small_multidigits(tmp_path_factory.mktemp("torchrun"))
    settings = {"max_steps": STEPS, "eval_steps": 3, "save_steps": 3}
    two_ranks = without_dropout(write_config(root, "two.yaml", output_dir=str(root / "two"), per_device_train_batch_size=8, **settings))
    one_rank = without_dropout(write_config(root, "one.yaml", output_dir=str(root / "one"), per_device_train_batch_size=16, **settings))

    completed = _run([*LAUNCHER, "-m", "multitune", "train", str(two_ranks)], cwd=root)
    (root / "two.stdout").write_text(completed.stdout, encoding="utf-8")
    _run([sys.executable, "-m", "multitune", "-q", "train", str(one_rank)], cwd=root)

    # A copy of the two-rank run cut back to a crash after step 3, with a half-written checkpoint.
    resumed = root / "resumed"
    shutil.copytree(root / "two", resumed)
    cut_run_before_checkpoint(resumed, STEPS)
    config = yaml.safe_load(two_ranks.read_text(encoding="utf-8"))
    config["training"]["output_dir"] = str(resumed)
    resumed_config = root / "resumed.yaml"
    resumed_config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    _run([*LAUNCHER, "-m", "multitune", "-q", "train", str(resumed_config), "--resume"], cwd=root)
    return {"two": root / "two", "one": root / "one", "resumed": resumed, "root": root}


def test_two_ranks_match_one_process(runs: dict[str, Path]) -> None:
    distributed = load_file(str(runs["two"] / "model" / "model.safetensors"))
    single = load_file(str(runs["one"] / "model" / "model.safetensors"))
    assert distributed.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-4, atol=1e-6, msg=lambda message, name=name: f"{name}: {message}")


def test_logged_losses_are_means_over_ranks(runs: dict[str, Path]) -> None:
    distributed = [row for row in read_metrics(runs["two"]) if row["type"] == "train"]
    single = [row for row in read_metrics(runs["one"]) if row["type"] == "train"]
    assert [row["step"] for row in distributed] == list(range(1, STEPS + 1))
    for distributed_row, single_row in zip(distributed, single):
        assert distributed_row["losses"].keys() == single_row["losses"].keys()
        for task, loss in single_row["losses"].items():
            assert distributed_row["losses"][task] == pytest.approx(loss, rel=1e-4), (distributed_row["step"], task)
        assert distributed_row["loss"] == pytest.approx(single_row["loss"], rel=1e-4)


def test_eval_metrics_match(runs: dict[str, Path]) -> None:
    distributed = json.loads((runs["two"] / "results.json").read_text(encoding="utf-8"))
    single = json.loads((runs["one"] / "results.json").read_text(encoding="utf-8"))
    for task, entry in single["tasks"].items():
        for metric, value in entry["metrics"].items():
            assert distributed["tasks"][task]["metrics"][metric] == pytest.approx(value, rel=1e-3, abs=1e-4), (task, metric)


def test_rank_0_alone_writes_and_prints(runs: dict[str, Path]) -> None:
    checkpoints = sorted(path.name for path in runs["two"].glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    eval_rows = [row for row in read_metrics(runs["two"]) if row["type"] == "eval"]
    assert [row["step"] for row in eval_rows] == [3, 6]
    stdout = (runs["root"] / "two.stdout").read_text(encoding="utf-8")
    assert stdout.count("run folder:") == 1


def test_resume_on_two_ranks_matches_uninterrupted(runs: dict[str, Path]) -> None:
    resumed = load_file(str(runs["resumed"] / "model" / "model.safetensors"))
    uninterrupted = load_file(str(runs["two"] / "model" / "model.safetensors"))
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=lambda message, name=name: f"{name}: {message}")
    assert not (runs["resumed"] / "checkpoint-6.tmp").exists()
    steps = [row["step"] for row in read_metrics(runs["resumed"]) if row["type"] == "train"]
    assert steps == list(range(1, STEPS + 1))
