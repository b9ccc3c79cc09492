"""The padding-free forward (trainer.padding_free), alone and with the shared prompt, gives the padded forward's
logprobs, entropies, hidden states and parameter gradients (fp32, 1e-5), under SDPA and eager attention; where
no row would hold two sequences it is the padded forward."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlkit.models.tiny import build_tiny_model
from rlkit.trainer.logprobs import policy_logprobs
from rlkit.trainer.packing import attention_mask, first_fit, lay_out, packs

# Rows of different prompt and response lengths; rows 0, 1, 3 share a prompt, row 4 extends it by a token, rows 2
# and 5 share another; an empty response (row 3) and a one-token one (row 1).
PROMPTS = [[5, 6, 7], [5, 6, 7], [8], [5, 6, 7], [5, 6, 7, 30], [8], [9, 10, 11, 12, 13]]
RESPONSES = [[20, 21, 22, 23, 24, 25], [24], [25, 26], [], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46], [50, 51]]


def test_first_fit_places_the_longest_first_each_in_the_first_row_with_room():
    # width 9: 9 -> row 0; 8 -> row 1; 7, 7 -> rows 2, 3; 4 -> row 4; 3 -> row 4 (room 5); 3 -> row 5 (every room < 3)
    sizes = [9, 4, 3, 3, 7, 8, 7]
    row, col = first_fit(sizes, 9)
    assert row == [0, 4, 4, 5, 2, 1, 3] and col == [0, 0, 4, 0, 0, 0, 0]
    assert packs(sizes) and not packs([5, 5, 4]) and packs([5, 3, 2]) and not packs([3, 0, 0]) and not packs([])


def test_rows_hold_each_sequence_behind_a_block_causal_mask():
    rows = lay_out([torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])], first_pos=torch.tensor([0, 7, 2]))
    # width 3: [1,2,3] alone; [5,6] then [4] share row 1
    assert rows.ids.tolist() == [[1, 2, 3], [5, 6, 4]] and rows.row.tolist() == [0, 1, 1] and rows.col.tolist() == [0, 2, 0]
    assert rows.seq.tolist() == [[0, 0, 0], [2, 2, 1]] and rows.pos.tolist() == [[0, 1, 2], [2, 3, 7]]
    assert rows.allowed()[1].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    padded = lay_out([torch.tensor([1, 2, 3]), torch.tensor([4])])  # [4] leaves two padding slots: a sequence of their own
    assert padded.seq.tolist() == [[0, 0, 0], [1, 3, 3]] and padded.allowed()[1].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_attention_mask_conventions():
    allowed = torch.tensor([[[True, False], [True, True]]])
    sdpa, eager = (attention_mask(allowed, type("C", (), {"_attn_implementation": impl}), torch.float32)
                   for impl in ("sdpa", "eager"))
    assert sdpa.shape == (1, 1, 2, 2) and sdpa.dtype == torch.bool
    assert eager.tolist() == [[[[0.0, torch.finfo(torch.float32).min], [0.0, 0.0]]]]
    with pytest.raises(RuntimeError, match="Fix: "):
        attention_mask(allowed, type("C", (), {"_attn_implementation": "flash_attention_2"}), torch.float32)


@pytest.fixture(scope="module", params=[("llama", True, "sdpa"), ("llama", False, "eager"), ("qwen2", False, "sdpa")],
                ids=lambda p: "-".join(map(str, p)))
def model(request, tmp_path_factory):
    arch, tied, attn = request.param
    path = build_tiny_model(tmp_path_factory.mktemp(f"tiny_{arch}"), arch=arch, tie_embeddings=tied)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)


def _forward(model, lengths, mask, **levers):
    model.zero_grad(set_to_none=True)
    ids = torch.zeros(len(RESPONSES), mask.shape[1], dtype=torch.long)
    for i, r in enumerate(RESPONSES):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    out = policy_logprobs(model, PROMPTS, ids, mask, pad_id=0, lengths=lengths, temperature=0.7, chunk_tokens=4,
                          return_hidden=True, **levers)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    ((out.logprobs * weights).sum() + (out.entropies * weights.flip(0)).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_padding_free_equals_padded(model, shared_prompt):
    lengths = torch.tensor([len(r) for r in RESPONSES])
    mask = (torch.arange(8)[None, :] < lengths[:, None]).float()
    mask[0, [1, 4]] = 0  # holes: tokens the forward reads but the loss does not (a token mask's rejections)
    padded, padded_grads = _forward(model, lengths, mask)
    packed, packed_grads = _forward(model, lengths, mask, padding_free=True, shared_prompt=shared_prompt)
    for field in ("logprobs", "entropies", "hidden"):
        torch.testing.assert_close(getattr(packed, field), getattr(padded, field), rtol=0, atol=1e-5)
    assert (packed.logprobs[mask == 0] == 0).all() and (packed.hidden[mask == 0] == 0).all()
    assert set(packed_grads) == set(padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)
    assert max(g.abs().max() for g in padded_grads.values()) > 1e-3


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_padding_free_one_token_and_empty_responses_without_grad(model, shared_prompt):
    lengths = torch.tensor([min(len(r), 1) for r in RESPONSES])  # with the shared prompt: no body row at all
    mask = (torch.arange(8)[None, :] < lengths[:, None]).float()
    with torch.no_grad():
        ids = torch.zeros(len(RESPONSES), 8, dtype=torch.long)
        for i, r in enumerate(RESPONSES):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        padded, packed = (policy_logprobs(model, PROMPTS, ids, mask, pad_id=0, lengths=lengths, padding_free=p,
                                          shared_prompt=shared_prompt and p) for p in (False, True))
    torch.testing.assert_close(packed.logprobs, padded.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.entropies, padded.entropies, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_padding_free_is_the_padded_forward_where_no_row_would_hold_two(model, shared_prompt):
    prompts, responses = [[5, 6, 7], [8, 9, 10]], torch.tensor([[20, 21, 22, 23], [24, 25, 26, 0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])  # 7 and 6 tokens: no room for a second sequence in a row
    with torch.no_grad():
        padded, packed = (policy_logprobs(model, prompts, responses, mask, pad_id=0, padding_free=p,
                                          shared_prompt=shared_prompt) for p in (False, True))
    assert torch.equal(packed.logprobs, padded.logprobs) and torch.equal(packed.entropies, padded.entropies)
