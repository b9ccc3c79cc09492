"""CAPO's curvature mask: the worked numbers, edge cases, a slow explicit reference, the Adam model's
state, and the trainer's step with the mask (plain GRPO at infinite thresholds, split invariance,
exact resume, the recipe and its compositions end to end)."""
import math
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.algorithms import aggregate, loss_normalizer, ppo_clip_surrogate
from rlkit.algorithms.capo import (CapoMask, _adam_logit_change, adam_curvature_shifts, curvature_keep,
                                   curvature_shifts, topk_distribution)
from rlkit.algorithms.plugins import TOKEN_MASKS, TokenMaskInputs
from rlkit.registry import PluginSpec
from rlkit.trainer.logprobs import policy_logprobs
from test_logprobs import _gradients, trainer_and_batch  # noqa: F401  (module-scoped fixture: hf engine, tiny model)
from test_trainer_e2e import run

INF = math.inf


# ---------------------------------------------------------------- worked numbers (docs/algorithms.md, CAPO)
def _example(advantage: float, lr: float):
    h = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    probs = torch.tensor([[[0.5, 0.3, 0.2]]], dtype=torch.float64)
    return curvature_shifts(h, probs, torch.tensor([[0]]), torch.tensor([[advantage]], dtype=torch.float64), lr)


@pytest.mark.parametrize("advantage, lr, m_h, m_f, kept", [
    (1.0, 0.1, 0.075976, 0.002888, False),
    (1.0, 1e-3, 7.599976e-4, 2.888e-7, True),
    (-1.0, 0.1, 0.076024, 0.002888, False),
])
def test_worked_example(advantage, lr, m_h, m_f, kept):
    got_h, got_f = _example(advantage, lr)
    assert got_h.item() == pytest.approx(m_h, rel=1e-9) and got_f.item() == pytest.approx(m_f, rel=1e-9)
    assert curvature_keep(got_h, got_f, tau_h=0.01, tau_f=1e-4).item() is kept


def test_zero_advantage_is_kept_and_one_sided_clipping_rejects_negative_shifts():
    m_h, m_f = _example(0.0, 0.1)
    assert m_h.item() == 0.0 and m_f.item() == 0.0
    assert curvature_keep(m_h, m_f, 1e-12, 1e-12, symmetric=True) and curvature_keep(m_h, m_f, 1e-12, 1e-12, symmetric=False)
    m_h = torch.tensor([-1e-3, 1e-3, 2e-2])
    assert curvature_keep(m_h, torch.zeros(3), 0.01, 1e-4, symmetric=True).tolist() == [True, True, False]
    assert curvature_keep(m_h, torch.zeros(3), 0.01, 1e-4, symmetric=False).tolist() == [False, True, False]


def test_topk_distribution_renormalises_and_keeps_the_sampled_token():
    gen = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(5, 4, generator=gen), torch.randn(12, 4, generator=gen)
    logits = hidden @ head.T / 0.7
    order = logits.argsort(-1, descending=True)
    sampled = torch.stack([order[0, 1], order[1, 9], order[2, 0], order[3, 3], order[4, 11]])  # 2nd, 10th, ...
    ids, probs, index, swapped = topk_distribution(hidden, head, sampled, k=4, temperature=0.7)
    assert (ids.gather(-1, index[:, None])[:, 0] == sampled).all()
    assert index.tolist() == [1, 3, 0, 3, 3]  # outside the top-4: in the last slot
    assert swapped.tolist() == [False, True, False, False, True]  # the 10th and 12th were swapped in
    assert ids[1, :3].tolist() == order[1, :3].tolist() and ids[0].tolist() == order[0, :4].tolist()
    torch.testing.assert_close(probs, torch.softmax(logits.gather(-1, ids), -1))


# ---------------------------------------------------------------- slow, explicit reference
def _slow_token(h, probs, a, adv, lr, direction):
    """One token with explicit loops: g = A v(x)h as a [k][d] table, G from `direction`, <g,G>, u = G h, F."""
    k, d = len(probs), len(h)
    v = [(1.0 if j == a else 0.0) - probs[j] for j in range(k)]
    g = [[adv * v[j] * h[c] for c in range(d)] for j in range(k)]
    big_g = [[direction(j, c, g[j][c]) for c in range(d)] for j in range(k)]
    inner = sum(g[j][c] * big_g[j][c] for j in range(k) for c in range(d))
    u = [sum(big_g[j][c] * h[c] for c in range(d)) for j in range(k)]
    fisher = [[(probs[i] if i == j else 0.0) - probs[i] * probs[j] for j in range(k)] for i in range(k)]
    vu = sum(v[j] * u[j] for j in range(k))
    ufu = sum(u[i] * fisher[i][j] * u[j] for i in range(k) for j in range(k))
    return lr * inner + 0.5 * lr**2 * adv * (vu**2 - ufu), 0.5 * lr**2 * vu**2


def _random_tokens(seed, n, k, d):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    probs = torch.softmax(2 * torch.randn(n, k, generator=gen, dtype=torch.float64), -1)
    index = torch.randint(0, k, (n,), generator=gen)
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    advantages[::3] = 0.0
    return gen, hidden, probs, index, advantages


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), t=st.integers(1, 3), k=st.integers(2, 5),
       d=st.integers(1, 4), lr=st.sampled_from([1e-3, 0.1, 1.0]))
def test_sgd_shifts_match_the_explicit_loop(seed, b, t, k, d, lr):
    _, hidden, probs, index, advantages = _random_tokens(seed, b * t, k, d)
    m_h, m_f = curvature_shifts(hidden.view(b, t, d), probs.view(b, t, k), index.view(b, t), advantages.view(b, t), lr)
    for i in range(b * t):
        want_h, want_f = _slow_token(hidden[i].tolist(), probs[i].tolist(), index[i].item(), advantages[i].item(), lr,
                                     lambda j, c, g: g)
        assert m_h.view(-1)[i].item() == pytest.approx(want_h, rel=1e-9, abs=1e-15)
        assert m_f.view(-1)[i].item() == pytest.approx(want_f, rel=1e-9, abs=1e-15)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 5), k=st.integers(2, 4), d=st.integers(1, 4),
       step=st.integers(1, 5), lr=st.sampled_from([1e-3, 0.1]))
def test_adam_shifts_match_the_explicit_loop(seed, n, k, d, step, lr):
    gen, hidden, probs, index, advantages = _random_tokens(seed, n, k, d)
    first = torch.randn(n, k, d, generator=gen, dtype=torch.float64)
    second = torch.rand(n, k, d, generator=gen, dtype=torch.float64)
    betas, eps = (0.9, 0.99), 1e-8
    m_h, m_f = adam_curvature_shifts(hidden, probs, index, advantages, lr, first_moment=first, second_moment=second,
                                     step=step, betas=betas, eps=eps)
    for i in range(n):
        def adam(j, c, g):
            m = (betas[0] * first[i, j, c].item() + (1 - betas[0]) * g) / (1 - betas[0] ** (step + 1))
            v = (betas[1] * second[i, j, c].item() + (1 - betas[1]) * g * g) / (1 - betas[1] ** (step + 1))
            return m / (math.sqrt(v) + eps)

        want_h, want_f = _slow_token(hidden[i].tolist(), probs[i].tolist(), index[i].item(), advantages[i].item(), lr, adam)
        assert m_h[i].item() == pytest.approx(want_h, rel=1e-9, abs=1e-15)
        assert m_f[i].item() == pytest.approx(want_f, rel=1e-9, abs=1e-15)


# ---------------------------------------------------------------- the plug-in on its own
def _inputs(seed=0, lr=0.05, b=3, t=5, d=6, vocab=20):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    mask[1, 3:] = 0
    advantages = torch.randn(b, 1, generator=gen).expand(b, t) * mask
    param = torch.nn.Parameter(torch.zeros(1))
    return TokenMaskInputs(response_ids=torch.randint(0, vocab, (b, t), generator=gen), mask=mask, advantages=advantages,
                           hidden=torch.randn(b, t, d, generator=gen) * mask[..., None],
                           lm_head=torch.randn(vocab, d, generator=gen),
                           optimizer=torch.optim.AdamW([param], betas=(0.8, 0.95), eps=1e-6), lr=lr)


def _sgd_shifts(inputs, k):
    sel = inputs.mask > 0
    ids, probs, index, _ = topk_distribution(inputs.hidden[sel], inputs.lm_head, inputs.response_ids[sel], k)
    return (ids, probs, index), curvature_shifts(inputs.hidden[sel], probs, index, inputs.advantages[sel], inputs.lr)


def test_mask_keeps_what_the_thresholds_keep_and_reports_rejections_by_sign():
    inputs = _inputs()
    _, (m_h, m_f) = _sgd_shifts(inputs, k=8)
    tau_h = m_h.abs().median().item()
    mask = CapoMask(direction="sgd", top_k=8, tau_h=tau_h, tau_f=INF)
    keep = mask(inputs)
    want = curvature_keep(m_h, m_f, tau_h, INF)
    assert keep[inputs.mask > 0].bool().tolist() == want.tolist() and (keep[inputs.mask == 0] == 0).all()
    adv = inputs.advantages[inputs.mask > 0]
    metrics = mask.step_metrics()
    assert metrics["capo/rejected_frac"] == pytest.approx((~want).float().mean().item())
    assert metrics["capo/rejected_frac_pos"] == pytest.approx((~want[adv > 0]).float().mean().item())
    assert metrics["capo/rejected_frac_neg"] == pytest.approx((~want[adv < 0]).float().mean().item())
    assert 0 < metrics["capo/rejected_frac"] < 1
    sel = inputs.mask > 0
    outside = topk_distribution(inputs.hidden[sel], inputs.lm_head, inputs.response_ids[sel], 8)[3]
    assert 0 < metrics["capo/swapped_frac"] == pytest.approx(outside.float().mean().item())  # random ids: often outside
    assert mask.step_metrics()["capo/rejected_frac"] == 0.0  # reset after each step


def test_all_tokens_of_a_sequence_rejected_still_count_in_the_sequence_mean():
    """A sequence whose every token is rejected adds nothing to the loss but still counts in
    seq-mean-token-mean's denominator, as a zero (as in the reference code)."""
    inputs = _inputs()
    inputs.advantages = inputs.advantages.clone()
    inputs.advantages[0] = 0.0  # row 0: A = 0, every token kept at any threshold
    keep = CapoMask(direction="sgd", top_k=8, tau_h=1e-12, tau_f=1e-12)(inputs)
    assert keep[0].tolist() == inputs.mask[0].tolist() and keep[1:].sum() == 0
    per_token = torch.randn(keep.shape)
    normalizer = loss_normalizer(keep, "seq-mean-token-mean", response_mask=inputs.mask)
    loss = aggregate(per_token, keep, "seq-mean-token-mean", normalizer)
    assert normalizer == 3 and loss.item() == pytest.approx(per_token[0].mean().item() / 3)


def test_adam_model_starts_with_sgd_then_steps_its_moments_with_the_kept_gradients():
    inputs = _inputs()
    (ids, probs, index), (m_h, m_f) = _sgd_shifts(inputs, k=5)
    tau_h = m_h.abs().median().item()
    sgd = CapoMask(direction="sgd", top_k=5, tau_h=tau_h, tau_f=INF)
    adam = CapoMask(direction="adam", top_k=5, tau_h=tau_h, tau_f=INF)
    assert torch.equal(adam(inputs), sgd(inputs))  # no moments yet: the SGD direction
    adam.after_optimizer_step()
    kept = curvature_keep(m_h, m_f, tau_h, INF)
    assert 0 < kept.sum() < len(kept)
    h, a = inputs.hidden[inputs.mask > 0], inputs.advantages[inputs.mask > 0]
    sums, counts = {}, {}
    for i in kept.nonzero()[:, 0].tolist():
        for j in range(5):
            row = ids[i, j].item()
            grad = a[i] * ((1.0 if j == index[i] else 0.0) - probs[i, j]) * h[i]
            sums[row] = sums.get(row, 0) + grad
            counts[row] = counts.get(row, 0) + 1
    assert adam.step == 1 and adam.rows.tolist() == sorted(sums)
    mean = torch.stack([sums[r] / counts[r] for r in sorted(sums)])
    torch.testing.assert_close(adam.first_moment, (1 - 0.8) * mean)
    torch.testing.assert_close(adam.second_moment, (1 - 0.95) * mean**2)


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_advantage_tokens_are_kept_by_the_adam_model_with_keep(symmetric):
    """With moments, Adam's direction moves a token even when its own gradient is 0 (m_f > 0): `keep` keeps it,
    the default `judge` (the reference) rejects it like any other token."""
    inputs = _inputs()
    masks = {rule: CapoMask(top_k=5, tau_h=INF, tau_f=INF, symmetric=symmetric, zero_advantage=rule)
             for rule in ("keep", "judge")}
    for mask in masks.values():
        mask(inputs)
        mask.after_optimizer_step()
        assert len(mask.rows) > 0
        mask.tau_h = mask.tau_f = 1e-12
    inputs.advantages = inputs.advantages.clone()
    inputs.advantages[0] = 0.0
    keep = masks["keep"](inputs)
    assert keep[0].tolist() == inputs.mask[0].tolist() and keep[1:].sum() == 0
    assert masks["judge"](inputs).sum() == 0
    sel = inputs.mask[0] > 0
    ids, probs, index, _ = topk_distribution(inputs.hidden[0][sel], inputs.lm_head, inputs.response_ids[0][sel], 5)
    first, second = masks["keep"]._moments(ids)
    _, m_f = adam_curvature_shifts(inputs.hidden[0][sel], probs, index, inputs.advantages[0][sel], inputs.lr,
                                   first_moment=first, second_moment=second, step=1, betas=(0.8, 0.95), eps=1e-6)
    assert (m_f > 1e-12).all()  # the thresholds alone reject them


# ---------------------------------------------------------------- two Adam steps by hand (sparse_adam_model.py)
LOG_PI = torch.tensor([0.5, 0.3, 0.2]).log()


def _two_tokens(sampled, advantages, hidden, lr):
    """Two one-token responses on a 3-token vocabulary whose LM head gives pi = [0.5, 0.3, 0.2] wherever h[0] = 1."""
    param = torch.nn.Parameter(torch.zeros(1))
    return TokenMaskInputs(response_ids=torch.tensor(sampled)[:, None], mask=torch.ones(2, 1),
                           advantages=torch.tensor(advantages)[:, None], hidden=torch.tensor(hidden)[:, None, :],
                           lm_head=torch.stack([LOG_PI, torch.zeros(3)], -1),
                           optimizer=torch.optim.AdamW([param], betas=(0.9, 0.999), eps=1e-8), lr=lr)


@pytest.mark.parametrize("rule", ["judge", "keep"])
def test_two_adam_steps_worked_by_hand(rule):
    """The sparse Adam model of the reference (sparse_adam_model.py): an empty model gives G = g; after a step each
    row's moments take the mean gradient of the accepted tokens holding it; a token is judged along the prospective
    moments m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, bias-corrected at t+1, G = m_hat / (sqrt(v_hat) + eps).
    betas (0.9, 0.999), top_k 3 = the whole vocabulary, pi = [0.5, 0.3, 0.2], tau_h 0.01, tau_f 4e-5."""
    mask = CapoMask(top_k=3, tau_h=0.01, tau_f=4e-5, zero_advantage=rule)
    # Step 1, eta 1e-3, no moments: G = g. Token 1 samples row 0 with A = +1, token 2 row 1 with A = -1, h = [1, 2].
    # Token 1: v = [0.5, -0.3, -0.2], u = A|h|^2 v = 5v, v.u = 1.9, u^T F u = 25 * 0.1456 = 3.64,
    # m_h = 1e-3 * 1.9 + 0.5e-6 * (3.61 - 3.64) = 0.001899985, m_f = 0.5e-6 * 3.61 = 1.805e-6. Both tokens kept.
    step1 = _two_tokens([0, 1], [1.0, -1.0], [[1.0, 2.0], [1.0, 2.0]], lr=1e-3)
    assert mask(step1).tolist() == [[1.0], [1.0]]
    mask.after_optimizer_step()
    # Row means of g = A v (x) h over the two tokens: row 0 (0.5 + 0.5)/2 = 0.5, row 1 (-0.3 - 0.7)/2 = -0.5,
    # row 2 (-0.2 + 0.2)/2 = 0, times h. m1 = 0.1 * mean, v1 = 0.001 * mean^2.
    assert mask.step == 1 and mask.rows.tolist() == [0, 1, 2]
    torch.testing.assert_close(mask.first_moment, torch.tensor([[0.05, 0.1], [-0.05, -0.1], [0.0, 0.0]]))
    torch.testing.assert_close(mask.second_moment, torch.tensor([[2.5e-4, 1e-3], [2.5e-4, 1e-3], [0.0, 0.0]]))

    # Step 2, eta 3e-3. Token 1 again (row 0, A = +1, h = [1, 2]): g rows [0.5, 1], [-0.3, -0.6], [-0.2, -0.4];
    # m' / 0.19 = [0.5, 1], [-0.394737, -0.789474], [-0.105263, -0.210526];
    # v' / 0.001999 = [0.25, 1], [0.169960, 0.679840], [0.020010, 0.080040];
    # G = [1, 1], [-0.957490, -0.957490], [-0.744137, -0.744137]; u = G h = [3, -2.872470, -2.232410].
    # Token 2 (row 0, A = 0, h = [1, 5]): g = 0, G = 0.9 m1 / 0.19 over sqrt(0.999 v1 / 0.001999): rows 0.670059,
    # -0.670059, 0, so u = [4.020349, -4.020349, 0].
    step2 = _two_tokens([0, 0], [1.0, 0.0], [[1.0, 2.0], [1.0, 5.0]], lr=3e-3)
    sel = step2.mask > 0
    ids, probs, index, _ = topk_distribution(step2.hidden[sel], step2.lm_head, step2.response_ids[sel], 3)
    assert ids.tolist() == [[0, 1, 2]] * 2
    u = _adam_logit_change(step2.advantages[sel][:, None] * (torch.nn.functional.one_hot(index, 3) - probs),
                           step2.hidden[sel], *mask._moments(ids), mask.step, (0.9, 0.999), 1e-8)
    torch.testing.assert_close(u, torch.tensor([[3.0, -2.872470, -2.232410], [4.020349, -4.020349, 0.0]]),
                               rtol=1e-5, atol=1e-5)
    # Token 1: v.u = 1.5 + 0.861741 + 0.446482 = 2.808223, u^T F u = 7.935279,
    # m_h = 3e-3 * 2.808223 + 4.5e-6 * (7.886162 - 7.935279) = 0.008424448 < 0.01, m_f = 4.5e-6 * 7.886162 = 3.548753e-5.
    # Token 2: m_h = 0, m_f = 4.5e-6 * 3.216280^2 = 4.655004e-5 > tau_f.
    m_h, m_f = adam_curvature_shifts(step2.hidden[sel], probs, index, step2.advantages[sel], 3e-3,
                                     first_moment=mask._moments(ids)[0], second_moment=mask._moments(ids)[1],
                                     step=mask.step, betas=(0.9, 0.999), eps=1e-8)
    torch.testing.assert_close(m_h, torch.tensor([0.008424448, 0.0]), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(m_f, torch.tensor([3.548753e-5, 4.655004e-5]), rtol=1e-5, atol=1e-12)
    assert mask(step2).tolist() == ([[1.0], [0.0]] if rule == "judge" else [[1.0], [1.0]])
    mask.after_optimizer_step()
    if rule == "judge":  # only token 1 counts: m2 = 0.9 m1 + 0.1 g, v2 = 0.999 v1 + 0.001 g^2
        m2, v2 = [[0.095, 0.19], [-0.075, -0.15], [-0.02, -0.04]], [[4.9975e-4, 1.999e-3], [3.3975e-4, 1.359e-3],
                                                                     [4e-5, 1.6e-4]]
    else:  # token 2's zero gradient counts too: the row means are g / 2
        m2, v2 = [[0.07, 0.14], [-0.06, -0.12], [-0.01, -0.02]], [[3.1225e-4, 1.249e-3], [2.7225e-4, 1.089e-3],
                                                                  [1e-5, 4e-5]]
    assert mask.step == 2
    torch.testing.assert_close(mask.first_moment, torch.tensor(m2))
    torch.testing.assert_close(mask.second_moment, torch.tensor(v2))
    assert mask.step_metrics() == {"capo/rejected_frac": 0.25 if rule == "judge" else 0.0,
                                   "capo/rejected_frac_pos": 0.0, "capo/rejected_frac_neg": 0.0,
                                   "capo/swapped_frac": 0.0}


def test_adam_model_keeps_a_micro_batch_whose_advantages_are_all_zero():
    """After a step (moments exist), with zero_advantage=keep a micro-batch of flat groups only (no token to judge)
    is kept whole. Regression: the empty selection once failed to reshape (a CAPO run at lr 3e-4 crashed at step 2)."""
    inputs = _inputs()
    mask = CapoMask(top_k=5, tau_h=INF, tau_f=INF, zero_advantage="keep")
    mask(inputs)
    mask.after_optimizer_step()
    assert len(mask.rows) > 0
    mask.tau_h = mask.tau_f = 1e-12
    inputs.advantages = torch.zeros_like(inputs.advantages)
    assert torch.equal(mask(inputs), inputs.mask)
    mask.after_optimizer_step()
    assert mask.step == 2


def test_adam_state_round_trips():
    inputs, later = _inputs(seed=0), _inputs(seed=1)
    first = CapoMask(top_k=5, tau_h=0.05)
    for _ in range(2):
        first(inputs)
        first.after_optimizer_step()
    second = CapoMask(top_k=5, tau_h=0.05)
    second.load_state_dict(first.state_dict())
    assert torch.equal(first(later), second(later))
    first.after_optimizer_step(), second.after_optimizer_step()
    for key, value in first.state_dict().items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(second.state_dict()[key])), key


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"options.direction: 'rmsprop' .* Fix: one of \['adam', 'sgd'\]"):
        CapoMask(direction="rmsprop")
    with pytest.raises(ValueError, match="options.top_k: 1 leaves no curvature"):
        CapoMask(top_k=1)
    with pytest.raises(ValueError, match=r"options.zero_advantage: 'drop' .* Fix: one of \['judge', 'keep'\]"):
        CapoMask(zero_advantage="drop")
    inputs = _inputs()
    inputs.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="reads betas and eps from the optimizer.*Fix: .*direction=sgd"):
        CapoMask()(inputs)


# ---------------------------------------------------------------- the trainer's step with the mask
@contextmanager
def _token_mask(trainer, **options):
    original = trainer.plugins["algorithm.token_mask"]
    trainer.plugins["algorithm.token_mask"] = TOKEN_MASKS.build(PluginSpec("capo", options))
    try:
        yield trainer.plugins["algorithm.token_mask"]
    finally:
        trainer.plugins["algorithm.token_mask"] = original


def test_infinite_thresholds_give_exactly_the_plain_grpo_step(trainer_and_batch):
    trainer, batch = trainer_and_batch
    trainer.cfg.algorithm.loss.agg = "seq-mean-token-mean"
    plain = _gradients(trainer, batch, 4)
    with _token_mask(trainer, tau_h=INF, tau_f=INF) as capo:
        for _ in range(2):  # the SGD direction, then the Adam direction
            for g_plain, g_capo in zip(plain, _gradients(trainer, batch, 4)):
                assert torch.equal(g_plain, g_capo)
        assert capo.impl.step == 2 and capo.step_metrics()["capo/rejected_frac"] == 0.0


@pytest.mark.parametrize("direction", ["sgd", "adam"])
def test_rejecting_step_is_split_invariant_and_equals_the_kept_token_loss(trainer_and_batch, direction):
    trainer, batch = trainer_and_batch
    trainer.cfg.algorithm.loss.agg = "seq-mean-token-mean"
    model, temperature = trainer.learner.model, trainer.cfg.rollout.temperature
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = policy_logprobs(model, batch.prompt_ids, batch.response_ids, batch.response_mask, pad_id=trainer.pad_id,
                              temperature=temperature, return_hidden=True)
    inputs = TokenMaskInputs(response_ids=batch.response_ids, mask=batch.response_mask, advantages=batch.advantages,
                             hidden=out.hidden, lm_head=model.get_output_embeddings().weight,
                             optimizer=trainer.learner.optimizer, lr=trainer.learner.scheduler.get_last_lr()[0], temperature=temperature)
    _, (m_h, _) = _sgd_shifts(inputs, k=50)
    with _token_mask(trainer, direction=direction, tau_h=m_h.abs().median().item(), tau_f=INF) as capo:
        if direction == "adam":
            _gradients(trainer, batch, len(batch))  # one step of the Adam model
        state = capo.state_dict()
        whole = _gradients(trainer, batch, len(batch))
        for size in (1, 5):
            capo.load_state_dict(state)
            for g_whole, g_split in zip(whole, _gradients(trainer, batch, size)):
                torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-6)
        capo.load_state_dict(state)
        keep = capo(inputs)
    kept = keep.sum() / batch.response_mask.sum()
    assert 0.2 < kept < 0.9, kept

    mask = batch.response_mask * keep
    with torch.enable_grad():
        logprobs = policy_logprobs(model, batch.prompt_ids, batch.response_ids, batch.response_mask,
                                   pad_id=trainer.pad_id, temperature=temperature).logprobs
        per_token, _ = ppo_clip_surrogate(logprobs, batch.behavior_logprobs, batch.advantages, mask)
        normalizer = loss_normalizer(mask, "seq-mean-token-mean", response_mask=batch.response_mask)
        aggregate(per_token, mask, "seq-mean-token-mean", normalizer).backward()
    for g_trainer, param in zip(whole, model.parameters()):
        torch.testing.assert_close(g_trainer, param.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- the recipe's sampling and schedule
def test_recipe_samples_and_schedules_as_the_reference():
    """top-k 50, T 0.9 (the pinned TRL's HF-generate defaults), cosine with warmup_ratio 0.1: 4 of the default 40
    steps (at least 1). Rates by hand at lr 2e-5: warmup 0, 5e-6, 1e-5, 1.5e-5, then 2e-5 * (1 + cos(pi * s / 36)) / 2."""
    from transformers import get_scheduler

    from rlkit.config import compose
    cfg = compose(["+recipe=capo"])
    assert (cfg.rollout.top_k, cfg.rollout.temperature, cfg.trainer.lr_scheduler) == (50, 0.9, "cosine")
    assert cfg.trainer.old_logprobs == "recompute" and cfg.algorithm.token_mask.options.zero_advantage == "judge"
    assert [compose(["+recipe=capo", f"trainer.total_steps={n}"]).trainer.warmup_steps for n in (2, 40, 100)] == [1, 4, 10]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.trainer.lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.trainer.warmup_steps,
                              num_training_steps=cfg.trainer.total_steps)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    assert rates == pytest.approx([0.0, 5e-6, 1e-5, 1.5e-5, 2e-5, 1.9961946e-5], rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------- end to end (vLLM, tiny model)
def test_capo_recipe_runs_and_its_adam_model_resumes_exactly(tmp_path, tiny_model_dir):
    # The split run stops at total_steps=2, and the recipe's cosine decay depends on total_steps: keep the rate flat
    # after the recipe's one warmup step (lr 0 at step 1), so both runs see the same rates.
    common = ["+recipe=capo", "rollout.n=4", "trainer.total_steps=3", "trainer.lr=1e-3", "trainer.warmup_steps=1",
              "trainer.lr_scheduler=constant_with_warmup", "algorithm.token_mask.options.tau_h=0.5",
              "reward.verifier=rl_tasks:contains_seven"]
    straight = run(tmp_path, tiny_model_dir, "straight", *common, "trainer.save_every=0")
    run(tmp_path, tiny_model_dir, "split", *common, "trainer.save_every=2", "trainer.total_steps=2")
    resumed = run(tmp_path, tiny_model_dir, "split", *common, "trainer.save_every=2", "trainer.resume=auto")
    assert [m["step"] for m in straight] == [m["step"] for m in resumed] == [1, 2, 3]
    for m in straight:  # top-k 50: the engine's logprobs are truncated, so the recipe recomputes old logprobs
        assert m["rollout/logprob_gap_max"] > 1e-3 and m["actor/clip_frac"] == 0.0  # ratio 1: the clip never fires
        assert {"capo/rejected_frac_pos", "capo/rejected_frac_neg"} <= m.keys()
    assert any(0 < m["capo/rejected_frac"] < 1 for m in straight)
    for a, b in zip(straight, resumed):  # step 3 masks with the Adam moments restored from step 2
        for key, value in a.items():
            if not key.startswith(("time/", "perf/")):
                assert b[key] == pytest.approx(value, abs=1e-6), (a["step"], key)
    for name in ("straight", "split"):
        state = torch.load(tmp_path / name / "checkpoints" / "step_3" / "optim.pt", weights_only=False)
        capo = state["plugins"]["algorithm.token_mask"]
        assert capo["step"] == 3 and len(capo["rows"]) > 0


# The compositions with OPO and GRPO-λ run in tests/test_opo.py and tests/test_grpo_lambda.py.
