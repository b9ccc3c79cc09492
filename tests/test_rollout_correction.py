"""Rollout correction (docs/algorithms.md, "Rollout correction"): hand-computed weights and masks, validation,
metrics merged over rows and ranks, the update's micro-batch invariance with the correction on, off-context rows,
and an fp32 run whose weights stay at 1."""
import math

import pytest
import torch

from rlkit.algorithms import aggregate, loss_normalizer, ppo_clip_surrogate
from rlkit.algorithms.rollout_correction import (ROLLOUT_CORRECTIONS, log_ratio, seq_mask, sequence_keep, tis,
                                                 token_keep, truncated_weights)
from rlkit.config import ConfigError, compose
from rlkit.validation import validate
from rlkit.registry import PluginSpec
from rlkit.trainer.logprobs import policy_logprobs
from rlkit.trainer.metrics import UpdateStats
from test_logprobs import _gradients, trainer_and_batch  # noqa: F401  (module-scoped fixture: hf engine, tiny model)
from test_trainer_e2e import run


def logs(*ratios):
    """One row [1,T] of log-ratios against behaviour logprobs 0."""
    return torch.tensor([[math.log(r) for r in ratios]])


# ---------------------------------------------------------------- hand-computed weights and masks
def test_tis_weights_are_ratios_truncated_at_c():
    # ratios pi_old / mu = 3, 1, 0.5, 1.5 and a padded position holding ratio 100
    old, behavior = logs(3.0, 1.0, 0.5, 1.5, 100.0), torch.zeros(1, 5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(tis(old, behavior, mask).weight, torch.tensor([[2.0, 1.0, 0.5, 1.5, 1.0]]))
    torch.testing.assert_close(tis(old, behavior, mask, threshold=4.0).weight, torch.tensor([[3.0, 1.0, 0.5, 1.5, 1.0]]))
    torch.testing.assert_close(tis(old, behavior, mask, threshold=1.2).weight, torch.tensor([[1.2, 1.0, 0.5, 1.2, 1.0]]))
    assert tis(old, behavior, mask).keep.tolist() == [[1.0] * 5]  # TIS reweights, never drops
    # a ratio exactly at C keeps C; weights are detached even when the inputs carry gradients
    old = logs(2.0).requires_grad_()
    weight = truncated_weights(old, torch.zeros(1, 1), torch.ones(1, 1), 2.0)
    assert weight.item() == pytest.approx(2.0) and not weight.requires_grad


def test_log_ratio_is_zero_outside_the_mask_and_clamped():
    old = torch.tensor([[30.0, -30.0, float("nan")]])
    lr = log_ratio(old, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]))
    assert lr.tolist() == [[20.0, -20.0, 0.0]]


def test_sequence_keep_uses_the_geometric_mean_over_response_tokens():
    # row 0: ratios 2, 0.5, 1.1 -> geometric mean 1.1^(1/3) = 1.0323
    # row 1: ratios 1.2, 1.2 (the padded third position holds 50, never counted) -> 1.2
    # row 2: ratio 0.7 -> 0.7 (below 1/C for C < 1/0.7 = 1.4286)
    # row 3: no response tokens -> kept
    old = torch.tensor([[math.log(2.0), math.log(0.5), math.log(1.1)],
                        [math.log(1.2), math.log(1.2), math.log(50.0)],
                        [math.log(0.7), 0.0, 0.0],
                        [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    behavior = torch.zeros(4, 3)
    assert math.exp(math.log(1.1) / 3) == pytest.approx(1.0323, abs=1e-4)
    assert sequence_keep(old, behavior, mask, 1.05).tolist() == [True, False, False, True]
    assert sequence_keep(old, behavior, mask, 1.02).tolist() == [False, False, False, True]
    assert sequence_keep(old, behavior, mask, 1.25).tolist() == [True, True, False, True]
    assert sequence_keep(old, behavior, mask, 1.5).tolist() == [True, True, True, True]
    out = seq_mask(old, behavior, mask, threshold=1.05)
    assert out.keep.tolist() == [[1.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3] and out.weight.tolist() == [[1.0] * 3] * 4


def test_token_mask_also_drops_single_tokens_outside_the_band():
    # one row, ratios 3, 1.1, 0.4, 0.9, 1/1.1: geometric mean (3 * 1.1 * 0.4 * 0.9 / 1.1)^(1/5) = 1.08^(1/5) = 1.0155
    old = logs(3.0, 1.1, 0.4, 0.9, 1 / 1.1)
    behavior, mask = torch.zeros(1, 5), torch.ones(1, 5)
    assert token_keep(old, behavior, mask, 2.0).tolist() == [[False, True, False, True, True]]  # 3 > 2, 0.4 < 1/2
    assert token_keep(old, behavior, mask, 3.5).tolist() == [[True] * 5]
    assert seq_mask(old, behavior, mask, threshold=1.02).keep.tolist() == [[1.0] * 5]  # the row passes, no token mask
    kept = seq_mask(old, behavior, mask, threshold=1.02, token_mask=True, token_threshold=2.0).keep
    assert kept.tolist() == [[0.0, 1.0, 0.0, 1.0, 1.0]]
    # a row outside [1/C, C] is dropped whole, token mask or not
    assert seq_mask(old, behavior, mask, threshold=1.01, token_mask=True).keep.tolist() == [[0.0] * 5]
    # token_keep is True outside the mask
    assert token_keep(old, behavior, torch.tensor([[0.0, 1, 1, 1, 1]]), 2.0).tolist() == [[True, True, False, True, True]]


def test_thresholds_must_exceed_one():
    z = torch.zeros(1, 1)
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(ValueError, match=r"^algorithm.rollout_correction.options.threshold: must be a number > 1"):
            tis(z, z, z + 1, threshold=bad)
        with pytest.raises(ValueError, match=r"options.token_threshold: must be a number > 1"):
            seq_mask(z, z, z + 1, token_threshold=bad)
    assert tis(z, logs(0.1), z + 1, threshold=math.inf).weight.item() == pytest.approx(10.0)  # C = inf: plain IS


def test_registry_names_and_capabilities():
    assert {"none", "tis", "seq_mask"} <= set(ROLLOUT_CORRECTIONS.names())
    assert ROLLOUT_CORRECTIONS.build(PluginSpec("none"))(None, None, None) is None
    assert ROLLOUT_CORRECTIONS.build(PluginSpec("tis")).capabilities.needs_recompute
    assert ROLLOUT_CORRECTIONS.build(PluginSpec("seq_mask")).capabilities.needs_recompute
    assert not ROLLOUT_CORRECTIONS.build(PluginSpec("none")).capabilities.needs_recompute
    assert ROLLOUT_CORRECTIONS.option_names("seq_mask")[0] == ["threshold", "token_mask", "token_threshold"]


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ["tis", "seq_mask"])
def test_validation_refuses_a_correction_without_recomputed_old_logprobs(tiny_model_dir, name):
    base = [f"model.path={tiny_model_dir}", f"algorithm.rollout_correction={name}"]
    with pytest.raises(ConfigError, match=rf"^trainer.old_logprobs: algorithm.rollout_correction={name} compares the "
                                          r"trainer's recomputed old logprobs .* Fix: set trainer.old_logprobs=recompute"):
        validate(compose(base))
    validate(compose([*base, "trainer.old_logprobs=recompute"]))
    validate(compose([f"model.path={tiny_model_dir}"]))  # none: behaviour logprobs are fine


@pytest.mark.parametrize("overrides, message", [
    (["+algorithm.rollout_correction.options.threshold=0.5"],
     r"^algorithm.rollout_correction.options.threshold: must be a number > 1, got 0.5. Fix: "),
    (["+algorithm.rollout_correction.options.C=2"], r"takes no option 'C' \(it takes \['threshold'\]\)"),
    (["+algorithm.rollout_correction.options.threshold=abc"], r"options.threshold"),
])
def test_validation_checks_the_options(tiny_model_dir, overrides, message):
    base = [f"model.path={tiny_model_dir}", "trainer.old_logprobs=recompute", "algorithm.rollout_correction.name=tis"]
    with pytest.raises(ConfigError, match=message):
        validate(compose([*base, *overrides]))
    validate(compose([*base, "+algorithm.rollout_correction.options.threshold=3"]))


# ---------------------------------------------------------------- metrics
class _TwoRanks:
    """Stands in for rlkit.ranks.Ranks over two processes: `gather` returns both ranks' statistics."""

    world_size = 2

    def __init__(self, other):
        self.other = other

    def gather(self, obj):
        return [obj, self.other]


def test_correction_metrics_merge_over_rows_and_ranks_as_sums_and_maxima():
    weight = torch.tensor([[2.0, 1.0, 0.5], [1.5, 1.5, 1.0], [3.0, 1.0, 1.0]])
    keep = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # judged tokens 7; kept 4 (2, 1, 0.5, 1.5): kept_frac 4/7, weight_mean 5/4, weight_max 2 (3.0 was dropped)
    whole = UpdateStats()
    whole.add_correction(weight, keep, mask)
    a, b = UpdateStats(), UpdateStats()
    a.add_correction(weight[:1], keep[:1], mask[:1])
    b.add_correction(weight[1:], keep[1:], mask[1:])
    batch = _metric_batch(3)
    for stats in (whole, a.merged(_TwoRanks(b))):
        stats.add_loss(0.0)
        m = stats.result(batch)
        assert m["rollout_correction/kept_frac"] == pytest.approx(4 / 7)
        assert m["rollout_correction/weight_mean"] == pytest.approx(5 / 4)
        assert m["rollout_correction/weight_max"] == pytest.approx(2.0)
    none = UpdateStats()
    none.add_loss(0.0)
    assert not any(k.startswith("rollout_correction/") for k in none.result(batch))  # no correction: no keys


def _metric_batch(rows):
    from types import SimpleNamespace

    return SimpleNamespace(response_mask=torch.ones(rows, 3), advantages=torch.zeros(rows, 3))


# ---------------------------------------------------------------- the update with a correction
@pytest.mark.parametrize("spec", [PluginSpec("tis", {"threshold": 1.5}),
                                  PluginSpec("seq_mask", {"threshold": 1.1, "token_mask": True, "token_threshold": 1.5})],
                         ids=["tis", "seq_mask"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_corrected_update_is_micro_batch_invariant_and_equals_the_weighted_kept_loss(trainer_and_batch, agg, spec):
    """Behaviour logprobs pushed off by noise: the update's gradient does not depend on the micro-batch split and
    equals the gradient of agg(w * surrogate) over the kept tokens, normalised over the kept tokens (rows)."""
    trainer, batch = trainer_and_batch
    noisy = batch.select(torch.arange(len(batch)))
    noise = torch.randn(noisy.response_mask.shape, generator=torch.Generator().manual_seed(1)) * 0.4
    noisy.behavior_logprobs = noisy.behavior_logprobs + noise * noisy.response_mask
    cfg, plugins = trainer.cfg, trainer.plugins
    original = plugins["algorithm.rollout_correction"]
    cfg.algorithm.loss.agg, cfg.trainer.old_logprobs = agg, "recompute"
    plugins["algorithm.rollout_correction"] = ROLLOUT_CORRECTIONS.build(spec)
    try:
        whole = _gradients(trainer, noisy, len(noisy))
        for size in (1, 3):
            for g_whole, g_split in zip(whole, _gradients(trainer, noisy, size)):
                torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-6)
        model, response, scale = trainer.learner.model, noisy.response_mask, cfg.rollout.max_tokens
        old = trainer.learner.token_stats(noisy).logprobs
        correction = plugins["algorithm.rollout_correction"](old, noisy.behavior_logprobs, response)
    finally:
        plugins["algorithm.rollout_correction"], cfg.trainer.old_logprobs = original, "behavior"
    kept = response * correction.keep
    judged = response.sum()
    if spec.name == "seq_mask":  # the noise drops some rows and some tokens, not all
        assert 0 < kept.sum() < judged and (kept.sum(-1) == 0).any() and (kept.sum(-1) > 0).any()
    else:
        assert kept.sum() == judged and ((correction.weight - 1).abs() * response).max() > 0.2
        assert correction.weight.max() <= 1.5
    model.zero_grad(set_to_none=True)
    logprobs = policy_logprobs(model, noisy.prompt_ids, noisy.response_ids, response, pad_id=trainer.pad_id,
                               temperature=cfg.rollout.temperature).logprobs
    per_token, _ = ppo_clip_surrogate(logprobs, old, noisy.advantages, kept)
    aggregate(per_token * correction.weight, kept, agg, loss_normalizer(kept, agg, scale, response_mask=kept)).backward()
    for g_trainer, param in zip(whole, model.parameters()):
        torch.testing.assert_close(g_trainer, param.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- end to end on the tiny model (fp32)
COMMON = ["trainer.total_steps=2", "reward.verifier=rl_tasks:contains_seven", "trainer.old_logprobs=recompute"]


def test_fp32_tis_run_logs_weights_at_one(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "tis", *COMMON, "algorithm.rollout_correction=tis")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["rollout/logprob_gap_max"] < 1e-4  # fp32 engine and trainer agree
        assert m["rollout_correction/kept_frac"] == 1.0
        assert m["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert m["rollout_correction/weight_max"] == pytest.approx(1.0, abs=1e-3)


def test_off_context_rows_weigh_one_and_are_never_dropped(tmp_path, tiny_model_dir):
    """The sampler's odd rows claim another context with behaviour logprobs 3 nats off (ratio e^3 = 20): they are
    not judged, so a tight sequence mask keeps everything and no weight leaves 1."""
    metrics = run(tmp_path, tiny_model_dir, "offctx", *COMMON, "trainer.total_steps=1",
                  "algorithm.sampler=rl_tasks:off_context_sampler", "algorithm.rollout_correction.name=seq_mask",
                  "+algorithm.rollout_correction.options.token_mask=true")
    m = metrics[0]
    assert m["rollout_correction/kept_frac"] == 1.0 and m["actor/tokens_kept_frac"] == 1.0
    assert m["rollout_correction/weight_max"] == 1.0
