"""Reward shapers: identity and DAPO overlong shaping (docs/algorithms.md worked numbers)."""
import pytest
import torch

from rlkit.algorithms import SHAPERS, shape_rewards

DAPO = {"max_response_len": 20480, "buffer_len": 4096}


def batch(rewards, lengths):
    n = len(rewards)
    return (
        torch.tensor(rewards),
        torch.tensor([r > 0.5 for r in rewards]),
        torch.tensor(lengths, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
    )


def test_none_returns_a_float32_copy():
    rewards, correct, lengths, group_ids = batch([1.0, 0.0, 0.5], [3, 4, 5])
    out = shape_rewards("none", rewards, correct, lengths, group_ids)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 0.5]
    out[0] = 7.0
    assert rewards[0].item() == 1.0  # input untouched
    ints = shape_rewards(
        "none", torch.tensor([1, 0]), torch.tensor([True, False]), torch.tensor([1, 2]), torch.tensor([0, 0])
    )
    assert ints.dtype == torch.float32 and ints.tolist() == [1.0, 0.0]


def test_none_refuses_options():
    with pytest.raises(TypeError, match="buffer_len"):
        shape_rewards("none", *batch([1.0], [3]), buffer_len=4)


def test_overlong_worked_numbers():
    # L_exp = 20480 - 4096 = 16384; len 18432 -> -(2048/4096) = -0.5; len 16000 -> 0
    penalty = shape_rewards("overlong", *batch([0.0, 0.0], [18432, 16000]), **DAPO)
    assert penalty.tolist() == [-0.5, 0.0]


def test_overlong_adds_to_rewards_correct_or_not():
    out = shape_rewards("overlong", *batch([1.0, 0.0, 1.0, 1.0, 1.0], [18432, 18432, 16384, 20480, 0]), **DAPO)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.5, -0.5, 1.0, 0.0, 1.0]


def test_overlong_penalty_factor():
    out = shape_rewards("overlong", *batch([1.0, 1.0], [18432, 20480]), **DAPO, penalty_factor=0.5)
    assert out.tolist() == [0.75, 0.5]


def test_overlong_option_errors():
    with pytest.raises(ValueError, match="buffer_len"):
        shape_rewards("overlong", *batch([1.0], [3]), max_response_len=100, buffer_len=0)
    with pytest.raises(ValueError, match="buffer_len"):
        shape_rewards("overlong", *batch([1.0], [3]), max_response_len=100, buffer_len=200)
    with pytest.raises(ValueError, match="penalty_factor"):
        shape_rewards("overlong", *batch([1.0], [3]), **DAPO, penalty_factor=-1.0)
    with pytest.raises(TypeError, match="max_response_len"):
        shape_rewards("overlong", *batch([1.0], [3]), buffer_len=4)


def test_shape_mismatch_names_the_argument():
    rewards, correct, lengths, group_ids = batch([1.0, 0.0], [3, 4])
    with pytest.raises(ValueError, match="lengths"):
        shape_rewards("none", rewards, correct, lengths[:1], group_ids)


def test_unknown_shaper_lists_known_names_and_registry_guards_duplicates():
    with pytest.raises(KeyError) as err:
        shape_rewards("kimi_length", *batch([1.0], [3]))
    assert "none" in str(err.value) and "overlong" in str(err.value)
    with pytest.raises(ValueError, match="overlong"):
        SHAPERS.register("overlong")(lambda *a, **k: None)
