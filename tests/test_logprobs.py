"""The trainer's chunked, padding-trimmed logprobs equal a naive full-logits computation, and the
update's gradient does not depend on how a mini-batch is split into micro-batches."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlkit.algorithms.plugins import TOKEN_MASKS
from rlkit.config import compose
from rlkit.trainer.learner import Learner
from rlkit.trainer.logprobs import pack_inputs, policy_logprobs
from rlkit.trainer.micro_batches import row_tokens
from rlkit.trainer.trainer import Trainer


def _naive(model, prompts, responses, temperature):
    """One unpadded forward per sequence over the full vocabulary."""
    rows = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
        rows.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0])
    return rows


def _batch(responses, width):
    ids = torch.zeros(len(responses), width, dtype=torch.long)
    mask = torch.zeros(len(responses), width)
    for i, r in enumerate(responses):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def test_pack_inputs_positions():
    ids, mask = _batch([[7, 8], [9]], 3)
    input_ids, attention, positions = pack_inputs([[1, 2, 3], [4]], ids, mask.sum(-1), pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 0, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert positions[0, :2].tolist() == [2, 3] and positions[1, 0].item() == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_policy_logprobs_match_naive(tiny_model_dir, temperature, chunk):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    responses = [[20, 21, 22, 23], [24], [25, 26], []]
    ids, mask = _batch(responses, 5)
    out = policy_logprobs(model, prompts, ids, mask, pad_id=0, temperature=temperature, chunk_tokens=chunk)
    for row, expected in enumerate(_naive(model, prompts, responses, temperature)):
        torch.testing.assert_close(out.logprobs[row, : len(responses[row])], expected, rtol=0, atol=1e-5)
    assert (out.logprobs[mask == 0] == 0).all() and (out.entropies[mask == 0] == 0).all()
    assert (out.entropies[mask == 1] > 0).all()

    grads = torch.autograd.grad(out.logprobs.sum(), model.model.embed_tokens.weight)[0]
    naive_grads = torch.autograd.grad(torch.cat(_naive(model, prompts, responses, temperature)).sum(),
                                      model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(grads, naive_grads, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("chunk", [3, 1024])
def test_head_recompute_gives_the_same_logprobs_and_gradients(tiny_model_dir, monkeypatch, chunk):
    """trainer.logprob_head_recompute: always, never and auto give the same logprobs, entropies and gradients;
    auto recomputes only when the forward has more than one chunk (8 response tokens here: 3 chunks of 3, or 1)."""
    import rlkit.trainer.logprobs as logprobs_module

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    ids, mask = _batch([[20, 21, 22, 23], [24], [25, 26, 27]], 4)
    calls = []
    real_checkpoint = logprobs_module.checkpoint
    monkeypatch.setattr(logprobs_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    results, checkpointed = {}, {}
    for mode in ("always", "never", "auto"):
        calls.clear()
        out = policy_logprobs(model, prompts, ids, mask, pad_id=0, chunk_tokens=chunk, head_recompute=mode)
        loss = (out.logprobs * torch.linspace(-1, 1, ids.numel()).view_as(ids)).sum() + out.entropies.sum()
        grads = torch.autograd.grad(loss, [model.lm_head.weight, model.model.embed_tokens.weight])
        results[mode], checkpointed[mode] = (out.logprobs, out.entropies, *grads), len(calls)
    chunks = -(-int(mask.sum()) // chunk)
    assert checkpointed == {"always": chunks, "never": 0, "auto": chunks if chunks > 1 else 0}
    for mode in ("never", "auto"):
        for got, expected in zip(results[mode], results["always"]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert results["always"][2].abs().max() > 1e-4  # a real gradient

@pytest.fixture(scope="module")
def trainer_and_batch(tiny_model_dir, tmp_path_factory):
    cfg = compose([f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path_factory.mktemp('runs')}",
                   "logging.run_name=invariance", "rollout.engine=hf", "rollout.n=4", "rollout.max_tokens=12",
                   "trainer.prompts_per_step=4", "reward.num_workers=0", "data.limit=16", "logging.progress_bar=false",
                   "reward.verifier=rl_tasks:contains_seven",
                   # the plain layout (padded rows, each prompt per row) that the levers' tests compare against
                   "trainer.shared_prompt_forward=false", "trainer.padding_free=false",
                   "trainer.micro_batch_tokens=null", "trainer.micro_batch_size=8"])
    trainer = Trainer(cfg)
    batch = trainer.collect().batch
    batch.advantages = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(0))
    batch.advantages *= batch.response_mask
    yield trainer, batch
    trainer.close()


def _gradients(trainer, batch, micro_batch_size):
    captured = []
    trainer.cfg.trainer.micro_batch_size = micro_batch_size
    trainer.learner.optimizer.step = lambda *a, **k: captured.append([p.grad.clone() for p in trainer.learner.model.parameters()])
    trainer.cfg.trainer.max_grad_norm = None
    version = trainer.learner.version
    trainer.learner.update(batch)
    trainer.learner.version = version  # the same step again: the same mini-batch order
    return captured[0]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_gradient_invariant_to_micro_batch_split(trainer_and_batch, agg):
    trainer, batch = trainer_and_batch
    trainer.cfg.algorithm.loss.agg = agg
    whole = _gradients(trainer, batch, len(batch))
    for size in (1, 3):
        split = _gradients(trainer, batch, size)
        for g_whole, g_split in zip(whole, split):
            torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-6)
    assert max(g.abs().max() for g in whole) > 1e-4  # the gradient is not trivially zero


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_rejecting_token_mask_is_invariant_and_leaves_the_denominator(trainer_and_batch, agg):
    """With a mask that rejects one token in three, the update's gradient does not depend on the
    micro-batch split and equals the gradient of the loss over the kept tokens only (rejected tokens
    leave numerator and denominator)."""
    from rlkit.algorithms import aggregate, loss_normalizer, ppo_clip_surrogate
    from rlkit.registry import PluginSpec

    trainer, batch = trainer_and_batch
    trainer.cfg.algorithm.loss.agg = agg
    original = trainer.plugins["algorithm.token_mask"]
    trainer.plugins["algorithm.token_mask"] = TOKEN_MASKS.build(PluginSpec("rl_tasks:reject_every_third"))
    try:
        whole = _gradients(trainer, batch, len(batch))
        for size in (1, 3):
            for g_whole, g_split in zip(whole, _gradients(trainer, batch, size)):
                torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-6)
    finally:
        trainer.plugins["algorithm.token_mask"] = original

    model = trainer.learner.model
    model.zero_grad(set_to_none=True)
    out = policy_logprobs(model, batch.prompt_ids, batch.response_ids, batch.response_mask, pad_id=trainer.pad_id)
    keep = (torch.arange(batch.response_mask.shape[1]) % 3 != 0).float()
    mask = batch.response_mask * keep
    per_token, _ = ppo_clip_surrogate(out.logprobs, batch.behavior_logprobs, batch.advantages, mask)
    normalizer = loss_normalizer(mask, agg, trainer.cfg.rollout.max_tokens, response_mask=batch.response_mask)
    aggregate(per_token, mask, agg, normalizer).backward()
    for g_trainer, param in zip(whole, model.parameters()):
        torch.testing.assert_close(g_trainer, param.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mask_name", ["none", "rl_tasks:reject_every_third"])
def test_shared_prompt_forward_gives_the_same_step(trainer_and_batch, mask_name):
    """trainer.shared_prompt_forward=true: the per-sequence forward's gradient, whatever the micro-batch split
    (a split may cut a group: its prompt then runs once per micro-batch)."""
    from rlkit.registry import PluginSpec

    trainer, batch = trainer_and_batch
    trainer.cfg.algorithm.loss.agg = "seq-mean-token-mean"
    original = trainer.plugins["algorithm.token_mask"]
    trainer.plugins["algorithm.token_mask"] = TOKEN_MASKS.build(PluginSpec(mask_name))
    try:
        plain = _gradients(trainer, batch, len(batch))
        trainer.cfg.trainer.shared_prompt_forward = True
        for size in (len(batch), 3):  # 3 cuts groups of 4
            for g_plain, g_shared in zip(plain, _gradients(trainer, batch, size)):
                torch.testing.assert_close(g_shared, g_plain, rtol=0, atol=1e-6)
    finally:
        trainer.cfg.trainer.shared_prompt_forward = False
        trainer.plugins["algorithm.token_mask"] = original


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_padding_free_gives_the_same_step(trainer_and_batch, shared_prompt):
    """trainer.padding_free=true (alone and with the shared prompt): the padded forward's gradient, whatever the
    micro-batch split."""
    trainer, batch = trainer_and_batch
    trainer.cfg.algorithm.loss.agg = "seq-mean-token-mean"
    try:
        padded = _gradients(trainer, batch, len(batch))
        trainer.cfg.trainer.padding_free, trainer.cfg.trainer.shared_prompt_forward = True, shared_prompt
        for size in (len(batch), 3):
            for g_padded, g_packed in zip(padded, _gradients(trainer, batch, size)):
                torch.testing.assert_close(g_packed, g_padded, rtol=0, atol=1e-6)
    finally:
        trainer.cfg.trainer.padding_free = trainer.cfg.trainer.shared_prompt_forward = False


@pytest.mark.parametrize("rows", [0, 2.5, 6])
def test_token_budget_gives_the_same_step_within_budget(trainer_and_batch, rows):
    """trainer.micro_batch_tokens: micro-batches of at most `budget` prompt+response tokens (a longer row alone,
    budget 1: every row alone), and the gradient of fixed micro-batches."""
    trainer, batch = trainer_and_batch
    budget = max(1, int(rows * max(row_tokens(batch.prompt_ids, batch.lengths, torch.arange(len(batch))))))
    trainer.cfg.algorithm.loss.agg = "seq-mean-token-mean"
    learner, seen, default_budget = trainer.learner, [], trainer.cfg.trainer.micro_batch_tokens
    micro_loss = learner._micro_loss
    learner._micro_loss = lambda part, *a: seen.append(row_tokens(part.prompt_ids, part.lengths, torch.arange(len(part)))) or micro_loss(part, *a)
    try:
        whole = _gradients(trainer, batch, len(batch))
        seen.clear()
        trainer.cfg.trainer.micro_batch_tokens = budget
        for g_whole, g_budget in zip(whole, _gradients(trainer, batch, len(batch))):
            torch.testing.assert_close(g_budget, g_whole, rtol=0, atol=1e-6)
    finally:
        trainer.cfg.trainer.micro_batch_tokens = default_budget
        del learner._micro_loss
    assert sum(map(len, seen)) == len(batch) and (budget > 1) == (len(seen) < len(batch))
    assert all(sum(tokens) <= budget or len(tokens) == 1 for tokens in seen)
    assert all(sum(tokens + [nxt[0]]) > budget for tokens, nxt in zip(seen, seen[1:]))  # greedy: as full as they go


def test_rejected_tokens_leave_the_token_mean_denominator():
    """8 tokens with loss -1 each, 2 rejected: the token-mean loss is -1.0 (6/6), not -0.75 (6/8)."""
    from rlkit.algorithms import combine_loss, loss_normalizer

    per_token = -torch.ones(1, 8)
    mask = torch.ones(1, 8)
    mask[0, [2, 5]] = 0
    loss, _ = combine_loss(per_token, mask, agg="token-mean", normalizer=loss_normalizer(mask, "token-mean"))
    assert loss.item() == pytest.approx(-1.0)
