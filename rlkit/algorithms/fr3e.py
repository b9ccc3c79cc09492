"""FR3E's advantage: centred rewards per branch state, modulated by the value change along the base trajectory.

FR3E (arXiv 2507.07017; docs/algorithms.md, "FR3E") explores from K+1 states of one base trajectory:
state 0 is the prompt, state j the prompt followed by the base response's first c_j tokens. The samples of
one (base trajectory, state) pair form a group. Everything is keyed by the ``base_ids`` and ``state_index``
tensors the sampler hands over, never by batch order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algorithms.advantages import ADVANTAGES
from rlkit.algorithms.groups import GroupStats, check_estimator_options
from rlkit.algorithms.groups import check_group_inputs


def state_values(rewards: Tensor, scorable: Tensor, states: Tensor, num_states: int) -> tuple[Tensor, Tensor]:
    """Mean scorable reward per state. rewards [B], scorable [B] bool, states [B] in [0, S) -> (V [S] float64,
    valid [S] bool: the state has at least one scorable sample; V is 0 where it has none)."""
    r = torch.where(scorable, rewards.to(torch.float64), 0.0)
    sums = torch.zeros(num_states, dtype=torch.float64).index_add(0, states, r)
    counts = torch.zeros(num_states, dtype=torch.float64).index_add(0, states, scorable.to(torch.float64))
    return sums / counts.clamp(min=1), counts > 0


def value_deltas(values: Tensor, bases: Tensor) -> Tensor:
    """δ along each base trajectory. values [S], bases [S], rows sorted by (base, state index) -> δ [S] float64.

    The first state of a base gets 1 − V (state 0, the prompt, when it is present), every later state
    V − V of the state before it in the rows given (the previous surviving state).
    """
    first = torch.ones_like(bases, dtype=torch.bool)
    first[1:] = bases[1:] != bases[:-1]
    return torch.where(first, 1.0 - values, values - values.roll(1))


def sharpen_deltas(deltas: Tensor, bases: Tensor, alpha: float) -> Tensor:
    """δ' = sign(δ)·|δ|^α / Σ_{same base} |δ|^α. deltas [S], bases [S] long -> [S]; 0 where that Σ is 0."""
    powered = deltas.abs().pow(alpha)
    inverse = torch.unique(bases, return_inverse=True)[1]
    totals = torch.zeros_like(powered).index_add(0, inverse, powered)[inverse]
    return torch.where(totals > 0, deltas.sign() * powered / totals.where(totals > 0, 1.0), 0.0)


def _check_keys(group_ids: Tensor, base_ids: Tensor, state_index: Tensor) -> None:
    for name, ids in (("base_ids", base_ids), ("state_index", state_index)):
        if ids.shape != group_ids.shape or ids.is_floating_point():
            raise ValueError(f"{name}: must be an integer tensor of shape {tuple(group_ids.shape)}, got "
                             f"{ids.dtype} {tuple(ids.shape)}. Fix: pass the sampler's estimator_inputs unchanged")
    pairs = torch.stack([base_ids, state_index], 1).unique(dim=0).shape[0]
    triples = torch.stack([group_ids, base_ids, state_index], 1).unique(dim=0).shape[0]
    if not pairs == triples == group_ids.unique().numel():
        raise ValueError("group_ids: must be one group per (base_ids, state_index) pair. Fix: number the groups "
                         "of an FR3E batch by (base trajectory, state), as the fr3e sampler does")


@ADVANTAGES.register("fr3e", needs_groups=True, needs_inputs=("base_ids", "state_index"))
def fr3e(
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    base_ids: Tensor | None = None,
    state_index: Tensor | None = None,
    scorable: Tensor | None = None,
    sharpen: float | None = 1.5,
    tol: float = 1e-6,
) -> Tensor:
    """A' = (r − mean of the state's scorable rewards) / exp(δ'), no std.

    rewards [B], group_ids [B] (one per (base, state)), response_mask [B,T], base_ids [B] long (the base
    trajectory a sample's state was cut from), state_index [B] long (0 = the prompt, increasing along the
    base response), scorable [B] bool or None -> [B,T] float32.

    V(state) = mean scorable reward; over the states of one base that have a scorable sample, in
    state_index order: δ_first = 1 − V, δ_j = V_j − V_previous; δ' = δ, or sharpened with exponent
    `sharpen` (δ' = sign δ·|δ|^α / Σ|δ|^α over the base, 0 when that sum is 0). Unscorable samples get 0 and
    stay out of V and the mean; a state whose scorable rewards span <= tol, or with one scorable sample,
    gets 0. base_ids and state_index come from the fr3e sampler's estimator_inputs, never from the config.
    """
    if base_ids is None or state_index is None:
        raise ValueError("base_ids/state_index: the fr3e estimator needs the branch keys the fr3e sampler adds to "
                         "RolloutBatch.estimator_inputs. Fix: set algorithm.sampler=fr3e (from Python: pass "
                         "base_ids= and state_index=)")
    check_estimator_options(rewards, response_mask, "zero", tol)
    if sharpen is not None and sharpen <= 0:
        raise ValueError(f"sharpen: must be > 0 or None, got {sharpen}. Fix: 1.5 (the released code) or null (off)")
    scorable = check_group_inputs(rewards, group_ids, scorable)
    _check_keys(group_ids, base_ids, state_index)
    groups = GroupStats(rewards, group_ids, scorable, tol)
    centred = torch.where(scorable, groups.r - groups.total / groups.n.clamp(min=1), 0.0)

    keys, states = torch.stack([base_ids, state_index], 1).unique(dim=0, return_inverse=True)  # sorted (base, j)
    values, valid = state_values(rewards, scorable, states, len(keys))
    chain_bases = keys[valid, 0]
    deltas = value_deltas(values[valid], chain_bases)
    if sharpen is not None:
        deltas = sharpen_deltas(deltas, chain_bases, sharpen)
    coefficient = torch.ones(len(keys), dtype=torch.float64)
    coefficient[valid] = deltas.exp()
    return groups.finish(centred / coefficient[states], "zero", response_mask)
