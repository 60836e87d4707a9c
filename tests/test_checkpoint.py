"""Tests of crash-safe checkpoints: atomic folders, recovery after an interrupted save, retention."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from multitune.training._checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    STATE_JSON,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_state,
    load_model_weights,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
)


class _Unpicklable:
    """An object whose pickling fails, so torch.save stops after writing part of the file."""

    def __reduce__(self):  # noqa: D105
        raise RuntimeError("simulated crash while writing the trainer state")


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _save(run_dir: Path, step: int, model: nn.Module, **extra: object) -> Path:
    state = {"step": step, "payload": torch.arange(1000.0), **extra}
    return save_checkpoint(run_dir, step, model=model, state=state, summary={"step": step})


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model(0)
    path = _save(tmp_path, 3, model)

    assert path == tmp_path / "checkpoint-3"
    assert {p.name for p in path.iterdir()} == {MODEL_FILE, STATE_FILE, STATE_JSON}
    assert json.loads((path / STATE_JSON).read_text())["step"] == 3

    restored = _model(1)
    load_model_weights(restored, path / MODEL_FILE)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert load_checkpoint_state(path)["step"] == 3


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    model = _model(0)
    first = _save(tmp_path, 1, model)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _save(tmp_path, 2, model, broken=_Unpicklable())

    # The interrupted save left its temporary folder, never a folder under the final name.
    assert (tmp_path / "checkpoint-2.tmp").is_dir()
    assert not (tmp_path / "checkpoint-2").exists()
    assert latest_checkpoint(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_next_save_removes_interrupted_folder(tmp_path: Path) -> None:
    model = _model(0)
    _save(tmp_path, 1, model)
    with pytest.raises(RuntimeError):
        _save(tmp_path, 2, model, broken=_Unpicklable())

    third = _save(tmp_path, 3, model)
    assert not (tmp_path / "checkpoint-2.tmp").exists()
    assert latest_checkpoint(tmp_path) == third


def test_folder_without_state_is_not_a_checkpoint(tmp_path: Path) -> None:
    model = _model(0)
    complete = _save(tmp_path, 1, model)
    incomplete = tmp_path / "checkpoint-5"
    incomplete.mkdir()
    (incomplete / MODEL_FILE).write_bytes(b"")

    assert latest_checkpoint(tmp_path) == complete


def test_saving_same_step_again_replaces_it(tmp_path: Path) -> None:
    model = _model(0)
    _save(tmp_path, 4, model)
    with torch.no_grad():
        model[0].bias.fill_(7.0)
    path = _save(tmp_path, 4, model)

    restored = _model(1)
    load_model_weights(restored, path / MODEL_FILE)
    assert torch.equal(restored[0].bias, torch.full((3,), 7.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_rotation_keeps_best_and_last(tmp_path: Path) -> None:
    model = _model(0)
    paths = [_save(tmp_path, step, model) for step in (10, 20, 30, 40)]

    deleted = rotate_checkpoints(tmp_path, save_total_limit=1, best=paths[1])
    assert deleted == [paths[0], paths[2]]
    assert list_checkpoints(tmp_path) == [paths[1], paths[3]]


def test_rotation_without_limit_keeps_all(tmp_path: Path) -> None:
    model = _model(0)
    paths = [_save(tmp_path, step, model) for step in (1, 2, 3)]
    assert rotate_checkpoints(tmp_path, save_total_limit=None, best=None) == []
    assert list_checkpoints(tmp_path) == paths


def test_rotation_limit_two(tmp_path: Path) -> None:
    model = _model(0)
    paths = [_save(tmp_path, step, model) for step in (1, 2, 3, 4)]
    rotate_checkpoints(tmp_path, save_total_limit=2, best=None)
    assert list_checkpoints(tmp_path) == paths[2:]


def test_weights_mismatch_names_keys(tmp_path: Path) -> None:
    path = _save(tmp_path, 1, _model(0))
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(RuntimeError, match="do not match the model"):
        load_model_weights(other, path / MODEL_FILE)


def test_rng_state_round_trip() -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
