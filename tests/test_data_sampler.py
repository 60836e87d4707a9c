"""MultiTaskSampler: passes, reshuffling, resuming, distributed shards, stopping rules and step shapes."""

from __future__ import annotations

import json
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.data import MixingSpec, MixingStage, MultiTaskSampler, annealed_probabilities

LOCAL = {"rank": 0, "world_size": 1}


def task_stream(sampler: MultiTaskSampler, task: str) -> list[int]:
    """Concatenate a task's indices over the whole run, in order."""
    indices: list[int] = []
    for step in sampler:
        draws = step if isinstance(step, list) else [step]
        for draw in draws:
            indices.extend(draw.get(task, []))
    return indices


def chunks(values: list[int], size: int) -> list[list[int]]:
    return [values[start : start + size] for start in range(0, len(values) - size + 1, size)]


# Passes -----------------------------------------------------------------------------------


def test_small_task_seen_once_per_pass() -> None:
    sampler = MultiTaskSampler(
        {"small": 7, "big": 1000}, MixingSpec(strategy="all_tasks"), batch_size=3, max_steps=70, seed=5,
        task_batch_sizes={"small": 3, "big": 4}, **LOCAL,
    )
    stream = task_stream(sampler, "small")
    passes = chunks(stream, 7)
    assert len(passes) == 30
    for order in passes:
        assert sorted(order) == list(range(7))


def test_pass_order_changes_every_pass() -> None:
    sampler = MultiTaskSampler({"small": 7}, MixingSpec(strategy="uniform"), batch_size=5, max_steps=140, seed=1, **LOCAL)
    passes = chunks(task_stream(sampler, "small"), 7)
    for previous, current in zip(passes, passes[1:]):
        assert previous != current
    assert len({tuple(order) for order in passes}) > len(passes) // 2


def test_two_example_task_alternates_orders() -> None:
    sampler = MultiTaskSampler({"pair": 2}, batch_size=1, max_steps=40, seed=0, **LOCAL)
    passes = chunks(task_stream(sampler, "pair"), 2)
    for previous, current in zip(passes, passes[1:]):
        assert previous != current
        assert sorted(current) == [0, 1]


def test_seed_changes_order() -> None:
    first = task_stream(MultiTaskSampler({"a": 50}, batch_size=10, max_steps=5, seed=1, **LOCAL), "a")
    second = task_stream(MultiTaskSampler({"a": 50}, batch_size=10, max_steps=5, seed=2, **LOCAL), "a")
    again = task_stream(MultiTaskSampler({"a": 50}, batch_size=10, max_steps=5, seed=1, **LOCAL), "a")
    assert first != second
    assert first == again


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 40),
    world_size=st.integers(1, 4),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_rank_shards_partition_each_pass(size: int, world_size: int, batch_size: int, seed: int) -> None:
    if size < world_size:
        return
    pass_length = size // world_size
    steps = 3 * pass_length // batch_size + 2
    streams = [
        task_stream(
            MultiTaskSampler({"t": size}, batch_size=batch_size, max_steps=steps, seed=seed, rank=rank, world_size=world_size),
            "t",
        )
        for rank in range(world_size)
    ]
    assert len({len(stream) for stream in streams}) == 1
    per_rank_passes = [chunks(stream, pass_length) for stream in streams]
    for pass_index in range(len(per_rank_passes[0])):
        shards = [passes[pass_index] for passes in per_rank_passes]
        union = [index for shard in shards for index in shard]
        assert len(union) == len(set(union)) == world_size * pass_length
        assert set(union) <= set(range(size))


# Distributed --------------------------------------------------------------------------------


def test_ranks_share_schedule_and_split_examples() -> None:
    sizes = {"a": 101, "b": 40, "c": 9}
    mixing = MixingSpec(strategy="temperature", temperature=2.0)
    runs = [
        list(MultiTaskSampler(sizes, mixing, batch_size=12, max_steps=30, seed=9, rank=rank, world_size=2))
        for rank in range(2)
    ]
    for step_rank0, step_rank1 in zip(*runs):
        assert {task: len(i) for task, i in step_rank0.items()} == {task: len(i) for task, i in step_rank1.items()}
    for task, size in sizes.items():
        seen0 = [i for step in runs[0] for i in step.get(task, [])]
        seen1 = [i for step in runs[1] for i in step.get(task, [])]
        pass_length = size // 2
        for shard0, shard1 in zip(chunks(seen0, pass_length), chunks(seen1, pass_length)):
            assert not set(shard0) & set(shard1)


def test_rank_defaults_to_single_process() -> None:
    sampler = MultiTaskSampler({"a": 3}, batch_size=1, max_steps=1)
    assert (sampler.rank, sampler.world_size) == (0, 1)


# Resuming ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mixing",
    [
        MixingSpec(strategy="temperature", temperature=2.0),
        MixingSpec(strategy="round_robin"),
        MixingSpec(strategy="uniform", step_shape="homogeneous", micro_batches_per_step=3),
        MixingSpec(strategy="annealed", anneal_epochs=3),
    ],
    ids=["temperature", "round-robin", "homogeneous", "annealed"],
)
def test_resume_mid_epoch_continues_identically(mixing: MixingSpec) -> None:
    sizes = {"a": 2, "b": 37, "c": 500}
    arguments = {"batch_size": 8, "seed": 4, "max_steps": 90, **LOCAL}
    reference = list(MultiTaskSampler(sizes, mixing, **arguments))

    first = MultiTaskSampler(sizes, mixing, **arguments)
    head = [first.next_step() for _ in range(37)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["tasks"]["b"]["position"] != 0

    resumed = MultiTaskSampler(sizes, mixing, **arguments)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert head + tail == reference
    assert resumed.step == 90


def test_resume_at_pass_boundary() -> None:
    sizes = {"a": 4}
    reference = list(MultiTaskSampler(sizes, batch_size=2, seed=0, max_steps=20, **LOCAL))
    first = MultiTaskSampler(sizes, batch_size=2, seed=0, max_steps=20, **LOCAL)
    head = [first.next_step() for _ in range(6)]
    resumed = MultiTaskSampler(sizes, batch_size=2, seed=0, max_steps=20, **LOCAL)
    resumed.load_state_dict(first.state_dict())
    assert head + list(resumed) == reference


def test_state_from_other_run_rejected() -> None:
    state = MultiTaskSampler({"a": 10}, batch_size=2, seed=0, max_steps=5, **LOCAL).state_dict()
    other = MultiTaskSampler({"a": 11}, batch_size=2, seed=0, max_steps=5, **LOCAL)
    with pytest.raises(ValueError) as error:
        other.load_state_dict(state)
    assert "sizes={'a': 10}" in str(error.value)


def test_state_from_other_rank_restores_this_rank() -> None:
    sizes = {"a": 30, "b": 11}
    rank0 = MultiTaskSampler(sizes, batch_size=4, seed=2, max_steps=25, rank=0, world_size=2)
    rank1_reference = list(MultiTaskSampler(sizes, batch_size=4, seed=2, max_steps=25, rank=1, world_size=2))
    for _ in range(10):
        rank0.next_step()
    rank1 = MultiTaskSampler(sizes, batch_size=4, seed=2, max_steps=25, rank=1, world_size=2)
    rank1.load_state_dict(rank0.state_dict())
    assert list(rank1) == rank1_reference[10:]


def test_reset_restarts_run() -> None:
    sampler = MultiTaskSampler({"a": 9, "b": 5}, batch_size=3, seed=0, max_steps=6, **LOCAL)
    first = list(sampler)
    assert list(sampler) == []
    sampler.reset()
    assert list(sampler) == first


# Run length and stopping ------------------------------------------------------------------


def test_max_steps_sets_length() -> None:
    sampler = MultiTaskSampler({"a": 9, "b": 5}, batch_size=3, seed=0, max_steps=17, **LOCAL)
    assert len(sampler) == 17
    assert len(list(sampler)) == 17


def test_endless_run_has_no_length() -> None:
    sampler = MultiTaskSampler({"a": 9}, batch_size=3, **LOCAL)
    with pytest.raises(TypeError) as error:
        len(sampler)
    assert "max_steps" in str(error.value)
    assert len([sampler.next_step() for _ in range(50)]) == 50


@pytest.mark.parametrize("mixing", [MixingSpec(), MixingSpec(step_shape="homogeneous", micro_batches_per_step=2)])
def test_epochs_of_named_task(mixing: MixingSpec) -> None:
    sizes = {"main": 30, "aux": 400}
    sampler = MultiTaskSampler(sizes, mixing, batch_size=8, seed=1, epochs=3, epoch_task="main", **LOCAL)
    expected_length = len(sampler)
    stream = task_stream(sampler, "main")
    assert len(stream) == 3 * 30
    assert sampler.step == expected_length
    for order in chunks(stream, 30):
        assert sorted(order) == list(range(30))


def test_epochs_default_to_largest_task() -> None:
    sampler = MultiTaskSampler({"small": 5, "large": 12, "medium": 8}, batch_size=4, epochs=1, **LOCAL)
    assert sampler.epoch_task == "large"
    assert len(task_stream(sampler, "large")) == 12


def test_single_task_epochs_need_no_epoch_task() -> None:
    sampler = MultiTaskSampler({"only": 10}, batch_size=4, epochs=2, **LOCAL)
    assert len(sampler) == 5
    assert [len(step["only"]) for step in sampler] == [4, 4, 4, 4, 4]


def test_fractional_epochs() -> None:
    sampler = MultiTaskSampler({"main": 30, "aux": 50}, batch_size=4, epochs=2.5, epoch_task="main", **LOCAL)
    stream = task_stream(sampler, "main")
    assert len(stream) == 75
    assert sorted(stream[:30]) == list(range(30))


def test_first_exhausted_stops_at_first_pass_end() -> None:
    sizes = {"small": 20, "large": 5000}
    sampler = MultiTaskSampler(sizes, MixingSpec(strategy="uniform", stopping="first_exhausted"), batch_size=6, seed=0, **LOCAL)
    length = len(sampler)
    small = task_stream(sampler, "small")
    assert sorted(small) == list(range(20))
    assert sampler.step == length
    assert sampler.finished


def test_all_exhausted_sees_every_example() -> None:
    sizes = {"small": 20, "large": 300}
    sampler = MultiTaskSampler(sizes, MixingSpec(strategy="uniform", stopping="all_exhausted"), batch_size=6, seed=0, **LOCAL)
    length = len(sampler)
    steps = list(sampler)
    assert len(steps) == length
    large = [i for step in steps for i in step.get("large", [])]
    small = [i for step in steps for i in step.get("small", [])]
    assert sorted(large) == list(range(300))
    assert len(small) > 20
    assert set(small) == set(range(20))


def test_max_steps_caps_exhaustion() -> None:
    sampler = MultiTaskSampler(
        {"a": 100, "b": 100}, MixingSpec(stopping="all_exhausted"), batch_size=2, max_steps=7, seed=0, **LOCAL
    )
    assert len(sampler) == 7
    assert len(list(sampler)) == 7


# Step contents ----------------------------------------------------------------------------


def test_round_robin_mixed_assigns_slots_in_turn() -> None:
    sampler = MultiTaskSampler({"a": 50, "b": 50, "c": 50}, MixingSpec(strategy="round_robin"), batch_size=5, max_steps=3, **LOCAL)
    counts = [{task: len(indices) for task, indices in step.items()} for step in sampler]
    # Slots 0-4 go to a b c a b, slots 5-9 to c a b c a, slots 10-14 to b c a b c.
    assert counts == [{"a": 2, "b": 2, "c": 1}, {"a": 2, "b": 1, "c": 2}, {"a": 1, "b": 2, "c": 2}]


def test_round_robin_homogeneous_cycles_tasks() -> None:
    mixing = MixingSpec(strategy="round_robin", step_shape="homogeneous", micro_batches_per_step=2)
    sampler = MultiTaskSampler({"a": 50, "b": 50, "c": 50}, mixing, batch_size=4, max_steps=3, **LOCAL)
    order = [next(iter(micro)) for step in sampler for micro in step]
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_all_tasks_uses_task_batch_sizes() -> None:
    sampler = MultiTaskSampler(
        {"a": 50, "b": 50, "c": 50}, MixingSpec(strategy="all_tasks"), batch_size=4, max_steps=4,
        task_batch_sizes={"b": 9}, **LOCAL,
    )
    for step in sampler:
        assert {task: len(indices) for task, indices in step.items()} == {"a": 4, "b": 9, "c": 4}


def test_homogeneous_steps_are_single_task_micro_batches() -> None:
    mixing = MixingSpec(strategy="uniform", step_shape="homogeneous", micro_batches_per_step=3)
    sampler = MultiTaskSampler({"a": 50, "b": 50}, mixing, batch_size=4, max_steps=10, task_batch_sizes={"b": 2}, **LOCAL)
    for step in sampler:
        assert isinstance(step, list)
        assert len(step) == 3
        for micro_batch in step:
            assert len(micro_batch) == 1
            ((task, indices),) = micro_batch.items()
            assert len(indices) == (2 if task == "b" else 4)


def test_mixed_step_sizes_sum_to_batch_size() -> None:
    sampler = MultiTaskSampler({"a": 5, "b": 700, "c": 40}, batch_size=16, max_steps=50, **LOCAL)
    for step in sampler:
        assert sum(len(indices) for indices in step.values()) == 16
        assert all(indices for indices in step.values())


def test_stages_switch_weights() -> None:
    mixing = MixingSpec(
        strategy="weights", weights={"a": 1.0, "b": 0.0},
        stages=[MixingStage(start_step=10, strategy="weights", weights={"a": 0.0, "b": 1.0})],
    )
    steps = list(MultiTaskSampler({"a": 50, "b": 50}, mixing, batch_size=4, max_steps=20, **LOCAL))
    assert all(set(step) == {"a"} for step in steps[:10])
    assert all(set(step) == {"b"} for step in steps[10:])


def test_task_weights_used_without_mixing_weights() -> None:
    sampler = MultiTaskSampler(
        {"a": 50, "b": 50}, MixingSpec(strategy="weights"), batch_size=4, max_steps=1,
        task_weights={"a": 3.0, "b": 1.0}, **LOCAL,
    )
    assert sampler.probabilities() == pytest.approx({"a": 0.75, "b": 0.25}, abs=1e-15)


def test_annealed_epochs_counted_in_steps() -> None:
    sizes = {"a": 10, "b": 1000}
    sampler = MultiTaskSampler(sizes, MixingSpec(strategy="annealed", anneal_epochs=4), batch_size=4, max_steps=100, **LOCAL)
    for step, epoch in [(0, 1), (24, 1), (25, 2), (50, 3), (99, 4)]:
        expected = annealed_probabilities([10, 1000], epoch, 4)
        assert list(sampler.probabilities(step).values()) == pytest.approx(expected, rel=1e-12)


def test_annealed_epochs_counted_by_epoch_task() -> None:
    sampler = MultiTaskSampler(
        {"a": 10, "b": 1000}, MixingSpec(strategy="annealed"), batch_size=4, epochs=3, epoch_task="a", **LOCAL
    )
    seen_a = 0
    epochs_seen = set()
    while not sampler.finished:
        epoch = seen_a // 10 + 1
        epochs_seen.add(epoch)
        expected = annealed_probabilities([10, 1000], epoch, 3)
        assert list(sampler.probabilities().values()) == pytest.approx(expected, rel=1e-12)
        seen_a += len(sampler.next_step().get("a", []))
    assert seen_a == 30
    assert epochs_seen == {1, 2, 3}


# Validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sizes": {"a": 5}, "epochs": 2, "max_steps": 3}, "set max_steps or epochs, not both"),
        ({"sizes": {"a": 5}, "epoch_task": "a"}, "without epochs"),
        ({"sizes": {"a": 5}, "epochs": 1, "epoch_task": "z"}, "epoch_task 'z' is not a task"),
        ({"sizes": {"a": 1}, "world_size": 2, "rank": 0}, "fewer than the 2 ranks"),
        ({"sizes": {"a": 5}, "rank": 2, "world_size": 2}, "rank must be in [0, world_size)"),
        ({"sizes": {"a": 5}, "mixing": MixingSpec(strategy="weights")}, "no weight for task(s) ['a']"),
        ({"sizes": {"a": 5}, "mixing": MixingSpec(strategy="weights", weights={"a": 1.0, "q": 1.0})}, "unknown task(s) ['q']"),
        ({"sizes": {"a": 5}, "mixing": MixingSpec(strategy="annealed"), "max_steps": 10}, "needs anneal_epochs"),
        ({"sizes": {"a": 5}, "mixing": MixingSpec(strategy="annealed", anneal_epochs=2)}, "needs max_steps or epochs"),
        (
            {"sizes": {"a": 5, "b": 5}, "mixing": MixingSpec(strategy="weights", weights={"a": 1.0, "b": 0.0}, stopping="all_exhausted")},
            "task(s) ['b'] have probability 0",
        ),
        (
            {"sizes": {"a": 5, "b": 5}, "mixing": MixingSpec(strategy="weights", weights={"a": 1.0, "b": 0.0}), "epochs": 1, "epoch_task": "b"},
            "epoch_task 'b' has probability 0",
        ),
        ({"sizes": {"a": 5}, "batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"sizes": {"a": 5}, "task_batch_sizes": {"x": 3}}, "unknown task(s) ['x']"),
        ({"sizes": {}}, "sizes is empty"),
    ],
)
def test_invalid_runs_rejected(arguments: dict, message: str) -> None:
    arguments = {"batch_size": 2, "rank": 0, "world_size": 1, **arguments}
    sizes = arguments.pop("sizes")
    with pytest.raises(ValueError) as error:
        MultiTaskSampler(sizes, **arguments)
    assert message in str(error.value)
