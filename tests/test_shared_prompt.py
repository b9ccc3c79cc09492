"""The shared-prompt forward (trainer.shared_prompt_forward) gives the per-sequence forward's logprobs, entropies,
hidden states and gradients, groups rows by identical prompt ids, and keeps the step micro-batch invariant."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlkit.config import ConfigError, compose
from rlkit.validation import validate
from rlkit.models.tiny import build_tiny_model
from rlkit.trainer.logprobs import policy_logprobs
from rlkit.trainer.shared_prompt import prompt_groups, row_order

# Rows 0, 1, 3 share a prompt (not adjacent); row 4 extends it by a token (an FR3E branch state); row 2 and 5 share
# another. Responses of different lengths, an empty one and a one-token one.
PROMPTS = [[5, 6, 7], [5, 6, 7], [8], [5, 6, 7], [5, 6, 7, 30], [8], [9, 10, 11, 12, 13]]
RESPONSES = [[20, 21, 22, 23, 24, 25], [24], [25, 26], [], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46], [50, 51]]


def test_prompt_groups_by_identical_ids():
    prompts, group = prompt_groups(PROMPTS)
    assert prompts == [[5, 6, 7], [8], [5, 6, 7, 30], [9, 10, 11, 12, 13]]
    assert group.tolist() == [0, 0, 1, 0, 2, 1, 3]


def test_row_order_keeps_prompts_adjacent():
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES)])  # 9 4 3 3 7 8 7
    assert row_order(PROMPTS, lengths, by_prompt=False).tolist() == [0, 5, 4, 6, 1, 2, 3]
    # groups by their longest row: [5,6,7] (9) rows 0 1 3, [8] (8) rows 5 2, then the two 7s in length order
    assert row_order(PROMPTS, lengths, by_prompt=True).tolist() == [0, 1, 3, 5, 2, 4, 6]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp(f"tiny_{request.param}"), arch=request.param, tie_embeddings=False)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _forward(model, mask, lengths, shared, temperature):
    model.zero_grad(set_to_none=True)
    width = mask.shape[1]
    ids = torch.zeros(len(RESPONSES), width, dtype=torch.long)
    for i, r in enumerate(RESPONSES):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    out = policy_logprobs(model, PROMPTS, ids, mask, pad_id=0, lengths=lengths, temperature=temperature,
                          chunk_tokens=4, return_hidden=True, shared_prompt=shared)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    ((out.logprobs * weights).sum() + (out.entropies * weights.flip(0)).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_forward_equals_per_sequence(model, temperature):
    lengths = torch.tensor([len(r) for r in RESPONSES])
    mask = (torch.arange(8)[None, :] < lengths[:, None]).float()
    mask[0, [1, 4]] = 0  # holes: tokens the forward reads but the loss does not (a token mask's rejections)
    mask[5, 0] = 0
    plain, plain_grads = _forward(model, mask, lengths, False, temperature)
    shared, shared_grads = _forward(model, mask, lengths, True, temperature)
    for field in ("logprobs", "entropies", "hidden"):
        torch.testing.assert_close(getattr(shared, field), getattr(plain, field), rtol=0, atol=1e-5)
    assert (shared.logprobs[mask == 0] == 0).all() and (shared.hidden[mask == 0] == 0).all()
    assert set(shared_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-5, msg=name)
    assert max(g.abs().max() for g in plain_grads.values()) > 1e-3


def test_shared_prompt_forward_without_grad_and_one_token_responses(model):
    lengths = torch.tensor([min(len(r), 1) for r in RESPONSES])  # no response pass: every row reads <= 1 token
    mask = (torch.arange(8)[None, :] < lengths[:, None]).float()
    with torch.no_grad():
        ids = torch.zeros(len(RESPONSES), 8, dtype=torch.long)
        for i, r in enumerate(RESPONSES):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        plain, shared = (policy_logprobs(model, PROMPTS, ids, mask, pad_id=0, lengths=lengths, shared_prompt=s)
                         for s in (False, True))
    torch.testing.assert_close(shared.logprobs, plain.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.entropies, plain.entropies, rtol=0, atol=1e-5)


def test_refused_with_gradient_checkpointing(tiny_model_dir):
    cfg = compose([f"model.path={tiny_model_dir}", "trainer.shared_prompt_forward=true",
                   "model.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="trainer.shared_prompt_forward: .*Fix: "):
        validate(cfg)
