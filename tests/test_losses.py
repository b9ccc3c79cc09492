"""Policy loss and aggregation: docs/algorithms.md worked numbers, dual clip, KL, entropy, micro-batch invariance."""
import math

import pytest
import torch
from test_logprobs import _gradients

from rlkit.algorithms import AGGREGATIONS, aggregate, loss_normalizer, policy_loss

LENGTHS = [10, 20, 30, 40]
Z = torch.zeros(2, 3)


def mask_from_lengths(lengths, width):
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


def token(value):
    """A [1,1] tensor."""
    return torch.tensor([[float(value)]])


def single_token_loss(advantage, ratio, **options):
    logprobs = token(math.log(ratio))
    return policy_loss(logprobs, token(0.0), token(advantage), token(1), normalizer=1.0, **options)


# ---------------------------------------------------------------- aggregation worked numbers


@pytest.mark.parametrize(
    "agg, expected",
    [("token-mean", 0.1), ("seq-mean-token-mean", 0.0), ("seq-mean-token-sum", 2.5), ("seq-mean-token-sum-norm", 0.25)],
)
def test_aggregation_worked_example(agg, expected):
    # ratio = 1, so the per-token loss is -A with the Dr. GRPO advantages [0.5, -0.5, 0.5, -0.5]
    mask = mask_from_lengths(LENGTHS, 40)
    advantages = torch.tensor([0.5, -0.5, 0.5, -0.5])[:, None] * mask
    logprobs = torch.full((4, 40), -1.3)
    normalizer = loss_normalizer(mask, agg, loss_scale_factor=40)
    loss, metrics = policy_loss(logprobs, logprobs.clone(), advantages, mask, normalizer=normalizer, agg=agg)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["pg_loss"].item() == pytest.approx(expected, abs=1e-6)
    assert aggregate(-advantages, mask, agg, normalizer).item() == pytest.approx(expected, abs=1e-6)


def test_loss_normalizer_per_aggregation():
    mask = mask_from_lengths([10, 0, 30, 40], 40)
    assert loss_normalizer(mask, "token-mean") == 80.0
    assert loss_normalizer(mask, "seq-mean-token-mean") == 3.0  # the empty row is not a sequence here
    assert loss_normalizer(mask, "seq-mean-token-sum") == 4.0
    assert loss_normalizer(mask, "seq-mean-token-sum-norm", loss_scale_factor=4096) == 4096.0
    assert loss_normalizer(mask.bool(), "token-mean") == 80.0


def test_sum_norm_needs_loss_scale_factor():
    with pytest.raises(ValueError, match=r"algorithm\.loss\.loss_scale_factor"):
        loss_normalizer(torch.ones(2, 3), "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"algorithm\.loss\.loss_scale_factor"):
        loss_normalizer(torch.ones(2, 3), "seq-mean-token-sum-norm", loss_scale_factor=0.0)


def test_unknown_aggregation_names_the_choices():
    for call in (
        lambda: loss_normalizer(torch.ones(2, 3), "seq-mean"),
        lambda: aggregate(torch.ones(2, 3), torch.ones(2, 3), "seq-mean", 1.0),
        lambda: policy_loss(Z, Z, Z, torch.ones(2, 3), normalizer=1.0, agg="seq-mean"),
    ):
        with pytest.raises(ValueError, match=r"token-mean.*seq-mean-token-sum-norm.*'seq-mean'"):
            call()


def test_seq_mean_token_mean_divides_each_row_by_its_length_and_empty_rows_give_zero():
    values = torch.tensor([[1.0, 3.0, 5.0], [2.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    normalizer = loss_normalizer(mask, "seq-mean-token-mean")
    assert normalizer == 2.0
    assert aggregate(values, mask, "seq-mean-token-mean", normalizer).item() == pytest.approx((2.0 + 2.0) / 2)


def test_masked_positions_never_leak_even_when_inf_or_nan():
    values = torch.tensor([[1.0, float("inf")], [2.0, float("nan")]])
    mask = torch.tensor([[1, 0], [1, 0]])
    for agg in AGGREGATIONS:
        normalizer = loss_normalizer(mask, agg, loss_scale_factor=2.0)
        assert math.isfinite(aggregate(values, mask, agg, normalizer).item())
    logprobs = torch.tensor([[-1.0, float("-inf")], [-2.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0], [-2.0, 0.0]])
    loss, metrics = policy_loss(logprobs, old, torch.ones(2, 2), mask, normalizer=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[:, 1].tolist() == [0.0, 0.0]
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_batch_without_tokens_gives_zero_loss():
    mask = torch.zeros(2, 3)
    for agg in AGGREGATIONS:
        normalizer = loss_normalizer(mask, agg, loss_scale_factor=3.0)
        loss, metrics = policy_loss(Z, Z, torch.ones(2, 3), mask, normalizer=normalizer, agg=agg)
        assert loss.item() == 0.0 and metrics["tokens"].item() == 0.0 and metrics["ratio_max"].item() == 0.0


# ---------------------------------------------------------------- clip numbers (docs/algorithms.md, "Policy loss")


def test_clip_worked_numbers():
    assert single_token_loss(1.0, 1.25)[0].item() == pytest.approx(-1.2)
    assert single_token_loss(1.0, 1.25, eps_low=0.2, eps_high=0.28)[0].item() == pytest.approx(-1.25)
    assert single_token_loss(1.0, 1.5, eps_low=0.2, eps_high=0.28)[0].item() == pytest.approx(-1.28)
    assert single_token_loss(-1.0, 0.5)[0].item() == pytest.approx(0.8)


def test_clip_metrics():
    _, high = single_token_loss(1.0, 1.25)
    assert (high["clip_frac"].item(), high["clip_frac_high"].item(), high["clip_frac_low"].item()) == (1.0, 1.0, 0.0)
    _, low = single_token_loss(-1.0, 0.5)
    assert (low["clip_frac"].item(), low["clip_frac_high"].item(), low["clip_frac_low"].item()) == (1.0, 0.0, 1.0)
    _, inside = single_token_loss(1.0, 1.25, eps_high=0.28)
    assert inside["clip_frac"].item() == 0.0
    # ratio beyond the bound but on the side where the min keeps the unclipped term: clipping changed nothing
    _, harmless = single_token_loss(1.0, 0.5)
    assert harmless["clip_frac"].item() == 0.0


def test_clip_gradient_is_zero_where_clipped_and_minus_advantage_times_ratio_inside():
    logprobs = torch.log(torch.tensor([[1.25, 1.1, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 3), advantages, torch.ones(1, 3), normalizer=1.0)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1.1, 0.0]]))
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)
    assert metrics["ratio_mean"].item() == pytest.approx((1.25 + 1.1 + 0.5) / 3)
    assert metrics["ratio_max"].item() == pytest.approx(1.25)


def test_dual_clip():
    loss, metrics = single_token_loss(-1.0, 5.0, dual_clip_c=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert metrics["dual_clip_frac"].item() == 1.0 and metrics["clip_frac"].item() == 0.0
    assert single_token_loss(-1.0, 5.0)[0].item() == pytest.approx(5.0)  # without it the loss is unbounded
    assert single_token_loss(-1.0, 2.0, dual_clip_c=3.0)[0].item() == pytest.approx(2.0)  # below the bound
    loss, metrics = single_token_loss(1.0, 5.0, dual_clip_c=3.0)  # A > 0 untouched
    assert loss.item() == pytest.approx(-1.2) and metrics["dual_clip_frac"].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip_c"):
        single_token_loss(-1.0, 5.0, dual_clip_c=1.0)


def test_clip_range_errors():
    with pytest.raises(ValueError, match="eps_low"):
        single_token_loss(1.0, 1.0, eps_low=1.0)
    with pytest.raises(ValueError, match="eps_high"):
        single_token_loss(1.0, 1.0, eps_high=-0.1)


# ---------------------------------------------------------------- KL and entropy


def test_k3_kl_hand_number():
    # ref - logp = log 2: kl = 2 - log 2 - 1 = 0.306853
    kl = 2.0 - math.log(2.0) - 1.0
    logprobs = token(math.log(0.25)).requires_grad_()
    ref = token(math.log(0.5))
    loss, metrics = policy_loss(
        logprobs, logprobs.detach(), token(0.0), token(1), normalizer=1.0, ref_logprobs=ref, kl_coef=0.1
    )
    assert metrics["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert round(metrics["kl"].item(), 6) == 0.306853
    assert loss.item() == pytest.approx(0.1 * kl, abs=1e-7)
    loss.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp) = -1: the penalty pulls logp up towards ref
    assert logprobs.grad.item() == pytest.approx(0.1 * -1.0, abs=1e-6)


def test_kl_is_reported_but_not_added_when_coef_is_zero():
    ref = token(math.log(0.5))
    loss, metrics = policy_loss(token(0.0), token(0.0), token(0.0), token(1), normalizer=1.0, ref_logprobs=ref)
    assert loss.item() == 0.0 and metrics["kl"].item() > 0


def test_kl_coef_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(token(0.0), token(0.0), token(1.0), token(1), normalizer=1.0, kl_coef=0.01)


def test_entropy_bonus_lowers_the_loss_and_pushes_entropy_up():
    entropies = token(2.0).requires_grad_()
    loss, metrics = policy_loss(
        token(0.0), token(0.0), token(0.0), token(1), normalizer=1.0, entropies=entropies, entropy_coef=0.1
    )
    assert loss.item() == pytest.approx(-0.2)
    assert metrics["entropy"].item() == pytest.approx(2.0)
    loss.backward()
    assert entropies.grad.item() == pytest.approx(-0.1)  # gradient descent raises the entropy
    with pytest.raises(ValueError, match="entropies"):
        policy_loss(token(0.0), token(0.0), token(0.0), token(1), normalizer=1.0, entropy_coef=0.1)


def test_metrics_are_detached_and_count_tokens():
    logprobs = torch.randn(3, 5, requires_grad=True)
    mask = mask_from_lengths([5, 2, 0], 5)
    _, metrics = policy_loss(
        logprobs, torch.randn(3, 5), torch.randn(3, 5), mask, normalizer=7.0,
        dual_clip_c=3.0, ref_logprobs=torch.randn(3, 5), entropies=torch.rand(3, 5),
    )
    expected = {"pg_loss", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
                "ratio_mean", "ratio_max", "kl", "entropy", "tokens"}
    assert set(metrics) == expected
    assert metrics["tokens"].item() == 7.0
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_shape_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(Z, Z, torch.zeros(2), torch.ones(2, 3), normalizer=1.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(Z, Z, Z, torch.ones(2, 3), normalizer=1.0, ref_logprobs=torch.zeros(2, 2))


# ---------------------------------------------------------------- per-token reference and micro-batch invariance


def slow_token_loss(logp, old, adv, eps_low, eps_high, c):
    ratio = math.exp(logp - old)
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - eps_low), 1 + eps_high))
    if c is not None and adv < 0:
        loss = min(loss, -adv * c)
    return loss


def random_batch(seed, rows=7, width=9):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (rows,), generator=gen)
    lengths[0] = 0  # always one empty response
    mask = mask_from_lengths(lengths.tolist(), width)
    old = -torch.rand(rows, width, generator=gen) * 3
    logprobs = old + torch.randn(rows, width, generator=gen) * 0.4  # many tokens outside the clip range
    advantages = torch.randn(rows, 1, generator=gen).expand(rows, width) * mask
    ref = old + torch.randn(rows, width, generator=gen) * 0.3
    entropies = torch.rand(rows, width, generator=gen) * 2
    return logprobs, old, advantages, mask, ref, entropies


@pytest.mark.parametrize("seed", range(4))
def test_per_token_loss_matches_slow_reference(seed):
    logprobs, old, advantages, mask, _, _ = random_batch(seed)
    for eps_low, eps_high, c in ((0.2, 0.2, None), (0.2, 0.28, 3.0), (0.1, 0.5, 1.5)):
        loss, _ = policy_loss(logprobs, old, advantages, mask, normalizer=1.0, eps_low=eps_low, eps_high=eps_high,
                              dual_clip_c=c, agg="seq-mean-token-sum")
        expected = sum(
            slow_token_loss(logprobs[i, t].item(), old[i, t].item(), advantages[i, t].item(), eps_low, eps_high, c)
            for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]
        )
        assert loss.item() == pytest.approx(expected, abs=1e-5)


def row_splits(rows, gen):
    """Row index lists for 1, 2 and 3 micro-batches, rows shuffled."""
    perm = torch.randperm(rows, generator=gen)
    yield [perm]
    for parts in (2, 3):
        cuts = sorted(torch.randperm(rows - 1, generator=gen)[: parts - 1].add(1).tolist())
        yield list(torch.tensor_split(perm, cuts))


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", range(3))
def test_aggregate_is_additive_over_micro_batches(agg, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    values = torch.randn(8, 6, generator=gen)
    mask = mask_from_lengths(torch.randint(0, 7, (8,), generator=gen).tolist(), 6)
    normalizer = loss_normalizer(mask, agg, loss_scale_factor=6.0)
    full = aggregate(values, mask, agg, normalizer)
    for split in row_splits(8, gen):
        parts = sum(aggregate(values[idx], mask[idx], agg, normalizer) for idx in split)
        assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def micro_batch_grads(split, logprobs, old, advantages, mask, ref, entropies, agg, normalizer):
    leaf = logprobs.clone().requires_grad_()
    ent = entropies.clone().requires_grad_()
    total = 0.0
    for idx in split:
        loss, _ = policy_loss(
            leaf[idx], old[idx], advantages[idx], mask[idx], normalizer=normalizer, agg=agg,
            eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, ref_logprobs=ref[idx], kl_coef=0.05,
            entropies=ent[idx], entropy_coef=0.01,
        )
        loss.backward()
        total += loss.item()
    return total, leaf.grad, ent.grad


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", range(3))
def test_policy_loss_gradients_do_not_depend_on_micro_batching(agg, seed):
    logprobs, old, advantages, mask, ref, entropies = random_batch(seed)
    normalizer = loss_normalizer(mask, agg, loss_scale_factor=9.0)
    gen = torch.Generator().manual_seed(seed)
    splits = list(row_splits(mask.shape[0], gen))
    args = (logprobs, old, advantages, mask, ref, entropies, agg, normalizer)
    full_loss, full_grad, full_ent_grad = micro_batch_grads([torch.arange(mask.shape[0])], *args)
    assert full_grad.abs().sum() > 0
    for split in splits:
        loss, grad, ent_grad = micro_batch_grads(split, *args)
        assert loss == pytest.approx(full_loss, abs=1e-6)
        torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(ent_grad, full_ent_grad, atol=1e-6, rtol=0)


def test_a_local_mean_would_break_invariance():
    """Guard for the test above: normalising each micro-batch by its own tokens gives a different gradient."""
    logprobs, old, advantages, mask, _, _ = random_batch(0)
    halves = [torch.arange(0, 3), torch.arange(3, 7)]
    local = sum(
        aggregate(-advantages[idx] * torch.exp(logprobs[idx] - old[idx]), mask[idx], "token-mean",
                  loss_normalizer(mask[idx], "token-mean"))
        for idx in halves
    )
    full = aggregate(-advantages * torch.exp(logprobs - old), mask, "token-mean", loss_normalizer(mask, "token-mean"))
    assert abs(local.item() - full.item()) > 1e-3


# ---------------------------------------------------------------- entropy_agg: the entropy bonus's own aggregation


def test_entropy_agg_pins_the_two_scales_with_hand_numbers():
    """Rows of 3 and 1 tokens, entropies 1+2+3 and 4 (sum 10), L = 8, coefficient 0.1, no policy term:
    with the policy's seq-mean-token-sum-norm the bonus is 0.1 * 10/8 = 0.125; token-mean (Critique-GRPO's
    released code) gives 0.1 * 10/4 = 0.25, twice as much here (about 15x on the default task:
    64 responses of ~30 tokens against L = 128)."""
    from rlkit.algorithms import combine_loss

    mask = mask_from_lengths([3, 1], 3)
    entropies = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    args = dict(agg="seq-mean-token-sum-norm", normalizer=8.0, entropies=entropies, entropy_coef=0.1)
    same, _ = combine_loss(torch.zeros(2, 3), mask, **args)
    assert same.item() == pytest.approx(-0.125)
    own, _ = combine_loss(torch.zeros(2, 3), mask, **args, entropy_agg="token-mean", entropy_normalizer=4.0)
    assert own.item() == pytest.approx(-0.25)
    # the trainer's form: normaliser 1, the gradient divided by 8 afterwards, entropy normaliser 4/8
    trainer_form, _ = combine_loss(torch.zeros(2, 3), mask, **{**args, "normalizer": 1.0},
                                   entropy_agg="token-mean", entropy_normalizer=0.5)
    assert trainer_form.item() / 8 == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="together"):
        combine_loss(torch.zeros(2, 3), mask, **args, entropy_agg="token-mean")


def test_entropy_agg_validation_names_the_key():
    from rlkit.algorithms.losses import entropy_agg_problem

    assert entropy_agg_problem(None, "token-mean", "capo") is None
    assert entropy_agg_problem("token-mean", "token-mean", "capo") is None  # the same as agg: today's path
    assert entropy_agg_problem("token-mean", "seq-mean-token-sum-norm", "none") is None
    assert entropy_agg_problem("mean", "token-mean", "none").startswith("algorithm.loss.entropy_agg: unknown")
    assert entropy_agg_problem("token-mean", "seq-mean-token-sum-norm", "capo") is None  # N is a constant
    assert "token_mask=capo" in entropy_agg_problem("seq-mean-token-sum", "token-mean", "capo")


@pytest.fixture(scope="module")
def entropy_trainer(tiny_model_dir, tmp_path_factory):
    from rlkit.config import compose
    from rlkit.trainer.trainer import Trainer

    cfg = compose([f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path_factory.mktemp('runs')}",
                   "logging.run_name=entropy_agg", "rollout.engine=hf", "rollout.n=4", "rollout.max_tokens=12",
                   "trainer.prompts_per_step=4", "reward.num_workers=0", "data.limit=16", "logging.progress_bar=false",
                   "reward.verifier=rl_tasks:contains_seven", "algorithm.loss.entropy_coef=0.5"])
    trainer = Trainer(cfg)
    batch = trainer.collect().batch
    batch.advantages = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(0))
    batch.advantages *= batch.response_mask
    yield trainer, batch
    trainer.close()


@pytest.mark.parametrize("agg, entropy_agg", [("seq-mean-token-sum-norm", "token-mean"),
                                              ("token-mean", "seq-mean-token-sum"),
                                              ("seq-mean-token-mean", "seq-mean-token-sum-norm")])
def test_entropy_agg_update_is_micro_batch_invariant_and_uses_its_own_normaliser(entropy_trainer, agg, entropy_agg):
    """The update's gradient with entropy_agg != agg does not depend on the micro-batch split, and equals the
    gradient of agg(surrogate)/N_agg - 0.5 * entropy_agg(entropies)/N_entropy_agg over the whole batch."""
    from rlkit.algorithms import ppo_clip_surrogate
    from rlkit.trainer.logprobs import policy_logprobs

    trainer, batch = entropy_trainer
    trainer.cfg.algorithm.loss.agg, trainer.cfg.algorithm.loss.entropy_agg = agg, entropy_agg
    try:
        whole = _gradients(trainer, batch, len(batch))
        for size in (1, 3):
            for g_whole, g_split in zip(whole, _gradients(trainer, batch, size)):
                torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-6)
    finally:
        trainer.cfg.algorithm.loss.entropy_agg = None
    model, mask, scale = trainer.learner.model, batch.response_mask, trainer.cfg.rollout.max_tokens
    model.zero_grad(set_to_none=True)
    out = policy_logprobs(model, batch.prompt_ids, batch.response_ids, mask, pad_id=trainer.pad_id)
    per_token, _ = ppo_clip_surrogate(out.logprobs, batch.behavior_logprobs, batch.advantages, mask)
    loss = aggregate(per_token, mask, agg, loss_normalizer(mask, agg, scale)) \
        - 0.5 * aggregate(out.entropies, mask, entropy_agg, loss_normalizer(mask, entropy_agg, scale))
    loss.backward()
    for g_trainer, param in zip(whole, model.parameters()):
        torch.testing.assert_close(g_trainer, param.grad, rtol=1e-4, atol=1e-6)
    assert loss_normalizer(mask, agg, scale) != loss_normalizer(mask, entropy_agg, scale)  # the two scales differ
    model.zero_grad(set_to_none=True)


def test_entropy_agg_with_a_token_mask_covers_every_response_token(entropy_trainer):
    """CAPO-style rejection (one token in three) with agg seq-mean-token-sum-norm and entropy_agg token-mean:
    the surrogate counts kept tokens over L, the bonus every response token over their number, for any split."""
    from rlkit.algorithms import ppo_clip_surrogate
    from rlkit.algorithms.plugins import TOKEN_MASKS
    from rlkit.registry import PluginSpec
    from rlkit.trainer.logprobs import policy_logprobs

    trainer, batch = entropy_trainer
    loss_cfg = trainer.cfg.algorithm.loss
    loss_cfg.agg, loss_cfg.entropy_agg = "seq-mean-token-sum-norm", "token-mean"
    original = trainer.plugins["algorithm.token_mask"]
    trainer.plugins["algorithm.token_mask"] = TOKEN_MASKS.build(PluginSpec("rl_tasks:reject_every_third"))
    try:
        whole = _gradients(trainer, batch, len(batch))
        for size in (1, 3):
            for g_whole, g_split in zip(whole, _gradients(trainer, batch, size)):
                torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-6)
    finally:
        trainer.plugins["algorithm.token_mask"], loss_cfg.entropy_agg = original, None
    model, response, scale = trainer.learner.model, batch.response_mask, trainer.cfg.rollout.max_tokens
    model.zero_grad(set_to_none=True)
    out = policy_logprobs(model, batch.prompt_ids, batch.response_ids, response, pad_id=trainer.pad_id)
    kept = response * (torch.arange(response.shape[1]) % 3 != 0).float()
    per_token, _ = ppo_clip_surrogate(out.logprobs, batch.behavior_logprobs, batch.advantages, kept)
    (aggregate(per_token, kept, "seq-mean-token-sum-norm", float(scale))
     - 0.5 * aggregate(out.entropies, response, "token-mean", float(response.sum()))).backward()
    for g_trainer, param in zip(whole, model.parameters()):
        torch.testing.assert_close(g_trainer, param.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
