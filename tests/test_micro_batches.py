"""Micro-batches by rows or by a token budget (trainer.micro_batch_tokens), and the same count on every rank."""
import pytest
from omegaconf import OmegaConf

import torch

from rlkit.ranks import Ranks
from rlkit.trainer.learner import Learner
from rlkit.trainer.micro_batches import micro_batch_sizes, rank_share, row_tokens, split_to


def test_fixed_rows():
    assert micro_batch_sizes([9, 9, 9, 9, 9], rows=2, budget=None) == [2, 2, 1]
    assert micro_batch_sizes([], rows=2, budget=None) == [] == micro_batch_sizes([], rows=2, budget=10)


def test_token_budget_is_greedy_and_a_longer_row_runs_alone():
    # 12 > 10 alone; 6+4 = 10 fits; 3+3+3 = 9, +2 = 11 does not; 2+1
    assert micro_batch_sizes([12, 6, 4, 3, 3, 3, 2, 1], rows=99, budget=10) == [1, 2, 3, 2]
    assert micro_batch_sizes([5, 5, 5], rows=1, budget=1) == [1, 1, 1]
    assert micro_batch_sizes([12, 6, 4, 3, 3, 3, 2, 1], rows=None, budget=10) == [1, 2, 3, 2]  # no row cap


def test_both_caps_hold_together():
    # budget 10 alone: [1, 2, 3, 2]; at most 2 rows too: 3+3 | 3+2 | 1
    assert micro_batch_sizes([12, 6, 4, 3, 3, 3, 2, 1], rows=2, budget=10) == [1, 2, 2, 2, 1]


def test_split_to_halves_the_largest_in_place():
    assert split_to([1, 4, 2], 4) == [1, 2, 2, 2]
    assert split_to([1, 4, 2], 5) == [1, 1, 1, 2, 2]
    assert split_to([2, 1], 9) == [1, 1, 1]  # no more than one row each
    assert split_to([3], 1) == [3]


class _Ranks:
    def __init__(self, most):
        self.most = most

    def max(self, value):
        return max(value, self.most)


@pytest.mark.parametrize("most", [1, 3, 5])
def test_every_rank_runs_as_many_micro_batches_as_the_one_needing_most(most):
    learner = Learner.__new__(Learner)  # only the config and the rank facts
    learner.cfg = OmegaConf.create({"trainer": {"micro_batch_size": 16, "micro_batch_tokens": 10}})
    learner.ranks = _Ranks(most)
    tokens = [6, 4, 3, 3, 3]  # alone: [2, 3]
    sizes = learner._micro_batch_sizes(tokens, agree=True)
    assert len(sizes) == max(most, 2) and sum(sizes) == len(tokens)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert all(sum(tokens[s : s + n]) <= 10 for s, n in zip(starts, sizes))
    assert learner._micro_batch_sizes(tokens, agree=False) == [2, 3]


def test_rank_share_deals_rows_by_length_round_robin_and_pads_a_short_share():
    """5 rows of 1+4, 2+1, 1+2, 1+3, 2+2 prompt+response tokens: by length (ties in row order) 0 (5), 3 (4),
    4 (4), 1 (3), 2 (3); rank 0 takes 0, 4, 2 and rank 1 takes 3, 1 plus a copy of row 0 that carries no loss."""
    prompts, lengths = [[1], [1, 2], [1], [1], [1, 2]], torch.tensor([4, 1, 2, 3, 2])
    rows = torch.arange(5)
    assert [t.tolist() for t in rank_share(prompts, lengths, rows, Ranks(0, 2), by_prompt=False)] == \
        [[0, 4, 2], [1.0, 1.0, 1.0]]
    assert [t.tolist() for t in rank_share(prompts, lengths, rows, Ranks(1, 2), by_prompt=False)] == \
        [[3, 1, 0], [1.0, 1.0, 0.0]]
    # by prompt: [1] rows (0, 3, 2) stay together, then the [1, 2] rows (4, 1)
    assert rank_share(prompts, lengths, rows, Ranks(), by_prompt=True)[0].tolist() == [0, 3, 2, 4, 1]
    assert row_tokens(prompts, lengths, torch.tensor([1, 0])) == [3, 5]


def test_a_micro_batch_needs_a_row_cap_or_a_token_budget():
    from rlkit.config import compose
    from rlkit.errors import ConfigError
    from rlkit.validation import validate

    validate(compose(["trainer.micro_batch_size=8", "trainer.micro_batch_tokens=null"]))
    validate(compose(["trainer.micro_batch_size=8"]))  # both caps
    with pytest.raises(ConfigError, match=r"both null.*Fix: set trainer.micro_batch_tokens"):
        validate(compose(["trainer.micro_batch_size=null", "trainer.micro_batch_tokens=null"]))
