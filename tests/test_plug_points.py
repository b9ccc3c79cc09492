"""Every plug point follows one convention: options from the command line, declared capabilities,
state saved with checkpoints, several groups per prompt, and shapers that see the whole trained batch."""
import pytest
import torch

import rl_tasks
from rlkit.registry import Capabilities, PluginSpec, Registry, declare, plugin_spec
from test_trainer_e2e import run


def test_plugin_spec_forms():
    assert plugin_spec("grpo", "algorithm.advantage") == PluginSpec("grpo", {})
    assert plugin_spec({"name": "grpo", "options": {"eps": 1}}, "k") == PluginSpec("grpo", {"eps": 1})
    assert plugin_spec({"name": "grpo", "options": None}, "k") == PluginSpec("grpo", {})
    for bad in ("", ["grpo"], {"name": "grpo", "optons": {}}, 3):
        with pytest.raises(ValueError, match="k: expected a plug-in name or {name: NAME, options"):
            plugin_spec(bad, "k")
    with pytest.raises(ValueError, match=r"k: has options but no plug-in name .* Fix: k.name=NAME \+k.options.KEY=VALUE"):
        plugin_spec({"options": {"x": 1}}, "k")


def test_registry_builds_functions_and_stateful_classes():
    reg = Registry("thing", inputs=("x",))

    @reg.register("scale", needs_groups=True)
    def scale(x, *, factor: float = 2.0):
        return x * factor

    built = reg.build(PluginSpec("scale", {"factor": 3.0}))
    assert built(2) == 6 and built.capabilities == Capabilities(needs_groups=True) and not built.stateful
    counter = reg.build(PluginSpec("rl_tasks:StepCounter", {"start": 5}))
    counter.after_optimizer_step()
    assert counter.stateful and counter.state_dict() == {"steps": 6}
    counter.load_state_dict({"steps": 1})
    assert counter.impl.steps == 1
    assert declare(needs_hidden=True)(lambda inputs: inputs).capabilities.needs_hidden


def test_registry_option_checks_name_the_plugin_and_its_options():
    reg = Registry("thing", inputs=("x",))
    reg.register("needs_k")(lambda x, *, k: x)

    def scale(x, *, factor: float = 2.0):
        return x

    reg.register("scale")(scale)
    with pytest.raises(ValueError, match=r"key.options.fctor: thing 'scale' takes no option 'fctor' \(it takes \['factor'\]\)"):
        reg.check_options("key", PluginSpec("scale", {"fctor": 1}))
    with pytest.raises(ValueError, match="key.options.x: is filled in by rlkit"):
        reg.check_options("key", PluginSpec("scale", {"x": 1}))
    with pytest.raises(ValueError, match=r"needs \['k'\]. Fix: set key.options.k=VALUE"):
        reg.check_options("key", PluginSpec("needs_k", {}))


def test_stateful_token_mask_survives_resume_with_command_line_options(tmp_path, tiny_model_dir):
    common = ["trainer.total_steps=4", "reward.verifier=rl_tasks:contains_seven",
              "algorithm.token_mask.name=rl_tasks:StepCounter", "+algorithm.token_mask.options.start=10"]
    straight = run(tmp_path, tiny_model_dir, "straight", *common, "trainer.save_every=0")
    run(tmp_path, tiny_model_dir, "split", *common, "trainer.save_every=2", "trainer.total_steps=2")
    resumed = run(tmp_path, tiny_model_dir, "split", *common, "trainer.save_every=2", "trainer.resume=auto")
    assert [m["counter/steps"] for m in straight] == [m["counter/steps"] for m in resumed] == [11, 12, 13, 14]
    for name in ("straight", "split"):
        blob = torch.load(tmp_path / name / "checkpoints" / "step_4" / "optim.pt", weights_only=False)
        assert blob["plugins"]["algorithm.token_mask"] == {"steps": 14}  # 10 + one per optimizer step


def test_sampler_with_three_groups_per_prompt_trains_on_all_of_them(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "branches", "trainer.total_steps=1",
                  "reward.verifier=rl_tasks:contains_seven", "algorithm.sampler=rl_tasks:three_groups_per_prompt")
    step = metrics[0]  # TINY: 4 prompts x n=4
    assert (step["batch/prompts_trained"], step["batch/groups_trained"], step["batch/samples_trained"]) == (4, 12, 48)


def test_shaper_sees_the_whole_joined_batch_after_resampling(tmp_path, tiny_model_dir):
    rl_tasks.SHAPER_CALLS.clear()
    metrics = run(tmp_path, tiny_model_dir, "dapo", "+recipe=dapo", "rollout.n=4", "trainer.total_steps=2",
                  "reward.verifier=rl_tasks:seven_if_even_answer", "algorithm.reward_shaper=rl_tasks:recording_shaper",
                  "algorithm.max_sample_rounds=4")
    assert any(m["batch/sample_rounds"] >= 2 for m in metrics)  # odd answers give flat groups: resampled
    assert len(rl_tasks.SHAPER_CALLS) == 2  # once per step, on the joined batch
    for call, m in zip(rl_tasks.SHAPER_CALLS, metrics):
        assert call["size"] == m["batch/samples_trained"] and call["groups"] == m["batch/groups_trained"]
        assert call["scorable"].dtype == torch.bool and call["scorable"].shape == (call["size"],)


def test_periodic_eval_at_step_zero_and_every_n_steps_survives_resume(tmp_path, tiny_model_dir):
    common = ["reward.verifier=rl_tasks:contains_seven", "trainer.eval_every=2", "eval.suite.arithmetic.limit=4",
              "eval.max_tokens=8", "trainer.save_every=2"]
    first = run(tmp_path, tiny_model_dir, "evals", *common, "trainer.total_steps=3")
    assert [m["step"] for m in first] == [0, 1, 2, 3]
    assert [("eval/arithmetic/pass@1" in m) for m in first] == [True, False, True, False]
    assert all(0 <= m["eval/arithmetic/pass@1"] <= 1 and m["time/eval"] > 0 for m in first if "time/eval" in m)
    resumed = run(tmp_path, tiny_model_dir, "evals", *common, "trainer.total_steps=4", "trainer.resume=auto")
    assert [m["step"] for m in resumed] == [0, 1, 2, 3, 4]
    assert [("eval/arithmetic/pass@1" in m) for m in resumed] == [True, False, True, False, True]


def test_off_context_samples_get_recomputed_old_logprobs(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "offctx", "trainer.total_steps=1", "reward.verifier=rl_tasks:contains_seven",
                  "algorithm.sampler=rl_tasks:off_context_sampler")
    assert metrics[0]["rollout/logprob_gap_max"] < 1e-4  # off-context rows are left out of the gap
    assert metrics[0]["actor/ratio_max"] == pytest.approx(1.0, abs=1e-3)  # their old logprobs were recomputed


@pytest.mark.parametrize("override, key", [("trainer.ppo_epochs=2", "trainer.ppo_epochs"),
                                           ("trainer.mini_batches=2", "trainer.mini_batches"),
                                           ("algorithm.loss.kl_coef=0.01", "algorithm.loss.kl_coef")])
def test_needs_on_policy_refuses_off_policy_settings(tiny_model_dir, override, key):
    from rlkit.config import ConfigError, compose
    from rlkit.validation import validate

    base = [f"model.path={tiny_model_dir}", "algorithm.advantage=rl_tasks:on_policy_estimator"]
    validate(compose(base))
    with pytest.raises(ConfigError, match=rf"{key}: algorithm.advantage=rl_tasks:on_policy_estimator assumes"):
        validate(compose([*base, override]))
    validate(compose([*base, override, "algorithm.allow_off_policy=true"]))


def test_generated_token_budget_stops_the_run(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "budget", "trainer.total_steps=5", "reward.verifier=rl_tasks:contains_seven",
                  "algorithm.sampler=rl_tasks:three_groups_per_prompt", "trainer.max_generated_tokens=100")
    assert [m["step"] for m in metrics] == [1]  # 4 prompts x 3 groups x 4 samples exceed 100 tokens in one step
    assert metrics[0]["rollout/generated_tokens"] == metrics[0]["response/tokens"] > 100
    assert metrics[0]["rollout/generated_tokens_total"] == metrics[0]["rollout/generated_tokens"]


def test_a_step_with_no_samples_is_logged_and_skipped(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "empty", "trainer.total_steps=2", "reward.verifier=rl_tasks:contains_seven",
                  "algorithm.sampler=rl_tasks:empty_sampler")
    assert [(m["step"], m["batch/samples_trained"], "reward/mean" in m) for m in metrics] == [(1, 0.0, False),
                                                                                            (2, 0.0, False)]


def test_prompts_solved_frac_counts_prompts_with_any_correct_sample_across_their_groups():
    from rlkit.batch import RolloutBatch
    from rlkit.trainer.metrics import rollout_metrics

    # 3 prompts (indices 4, 5, 7 as after a resample round); prompt 4 has two groups, one with a correct sample.
    prompt_index = torch.tensor([4, 4, 4, 4, 5, 5, 7, 7])
    correct = torch.tensor([0, 0, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    batch = RolloutBatch(prompt_ids=[[1]] * 8, response_ids=torch.ones(8, 2, dtype=torch.long),
                         response_mask=torch.ones(8, 2), behavior_logprobs=torch.zeros(8, 2),
                         group_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), prompt_index=prompt_index,
                         truncated=torch.zeros(8, dtype=torch.bool), rows=[{}] * 8, texts=[""] * 8,
                         rewards=correct.float(), correct=correct, scorable=torch.ones(8, dtype=torch.bool),
                         extracted=["1"] * 8)
    metrics = rollout_metrics(batch, batch)
    assert metrics["reward/prompts_solved_frac"] == pytest.approx(2 / 3)
    assert metrics["batch/zero_variance_group_frac"] == pytest.approx(3 / 4)
