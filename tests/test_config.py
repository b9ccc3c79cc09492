"""Bad input fails up front with an error that names the key and the fix."""
import subprocess
import sys

import pytest

from rlkit.config import ConfigError, compose
from rlkit.validation import validate


def _cfg(tiny_model_dir, *overrides):
    return compose([f"model.path={tiny_model_dir}", *overrides])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rlkit.train", *args], capture_output=True, text=True, timeout=120)


def test_every_recipe_composes_and_validates(tiny_model_dir):
    from pathlib import Path

    from rlkit.config import CONFIG_DIR

    recipes = sorted(p.stem for p in Path(CONFIG_DIR, "..", "recipes").glob("*.yaml"))
    assert {"grpo", "dr_grpo", "dapo", "opo", "grpo_lambda", "capo", "fr3e", "critique_grpo"} <= set(recipes)
    for recipe in recipes:
        validate(_cfg(tiny_model_dir, f"+recipe={recipe}"))


def test_recipes_set_their_published_numbers(tiny_model_dir):
    dapo = _cfg(tiny_model_dir, "+recipe=dapo", "rollout.max_tokens=100")
    clip = dapo.algorithm.policy_loss.options
    assert (clip.eps_low, clip.eps_high, clip.dual_clip_c) == (0.2, 0.28, 10.0)
    assert dapo.algorithm.loss.agg == "token-mean" and dapo.algorithm.group_filter.name == "zero_variance"
    assert dapo.algorithm.reward_shaper.options.buffer_len == 20  # L_buf = L_max / 5, as 4096 of 20480
    dr = _cfg(tiny_model_dir, "+recipe=dr_grpo")
    assert dr.algorithm.advantage.name == "dr_grpo" and dr.algorithm.loss.agg == "seq-mean-token-sum-norm"


def test_every_config_key_is_commented():
    from pathlib import Path

    from rlkit.config import CONFIG_DIR

    for path in [*Path(CONFIG_DIR).rglob("*.yaml"), *Path(CONFIG_DIR, "..", "recipes").glob("*.yaml")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or stripped.endswith(":"):
                continue  # comments, defaults-list entries, and parents of commented children
            assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        (["rollout.n=1"], "rollout.n", "rollout.n>=2"),
        (["algorithm.advantage=nope"], "algorithm.advantage=nope", "rloo (or give an import path"),
        (["algorithm.loss.agg=mean"], "algorithm.loss.agg", "token-mean"),
        (["trainer.mini_batches=3"], "trainer.mini_batches", "divisor"),
        (["reward.verifier=nope"], "reward.verifier=nope", "known: gsm8k, math"),
        (["algorithm.advantage.name=dr_grpo", "+algorithm.advantage.options.eps=1"], "advantage.options.eps",
         "~algorithm.advantage.options.eps"),
        (["+algorithm.token_mask.options.strength=1"], "algorithm.token_mask.options.strength", "it takes []"),
        (["+algorithm.policy_loss.options.eps_hgh=0.3"], "algorithm.policy_loss.options.eps_hgh",
         "'eps_low', 'eps_high', 'dual_clip_c'"),
        (["algorithm.reward_shaper=overlong"], "algorithm.reward_shaper.options", "max_response_len"),
        (["+rollout.engine.options.gpu_mem=0.5"], "rollout.engine.options.gpu_mem", "gpu_memory_utilization"),
        (["algorithm.group_filter=zero_variance", "rollout.n=1"], "rollout.n", "algorithm.group_filter=zero_variance"),
        (["rollout.temperature=0"], "rollout.temperature", "1.0"),
        (["trainer.micro_batch_tokens=0"], "trainer.micro_batch_tokens", "an integer >= 1 or null"),
        (["trainer.resume=/no/such/dir"], "trainer.resume", "step_N"),
        (["trainer.logprob_head_recompute=sometimes"], "trainer.logprob_head_recompute", "auto, always or never"),
        (["+recipe=opo", "algorithm.loss.entropy_coef=0.01"], "algorithm.loss.entropy_coef",
         "entropy_coef=0, or set algorithm.allow_off_policy=true"),
    ],
)
def test_bad_values_name_key_and_fix(tiny_model_dir, overrides, key, fix):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tiny_model_dir, *overrides))
    assert key in str(err.value) and fix in str(err.value)


def test_missing_model_path_points_to_setup():
    with pytest.raises(ConfigError, match="make setup"):
        validate(compose(["model.path=/no/such/model"]))


def test_cli_misspelt_recipe_gets_one_line_with_the_closest():
    result = _cli("+recipe=opoo", "--cfg", "job")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["rlkit: bad config: recipe=opoo: no recipe named 'opoo' (known: capo, "
                                          "critique_grpo, dapo, dr_grpo, fr3e, grpo, grpo_lambda, opo). Fix: did you "
                                          "mean +recipe=opo?"]


def test_misspelt_group_choice_and_plugin_suggest_the_closest():
    from rlkit.choices import unknown_choice

    assert unknown_choice(["model.path=x", "data=gsm9k"]).endswith("Fix: did you mean data=gsm8k?")
    assert "use one of +recipe=capo|" in unknown_choice(["+recipe=zzzzzz"])
    assert unknown_choice(["+recipe=opo", "data=file", "data.source=a,b", "hydra/job_logging=none"]) is None
    with pytest.raises(ConfigError, match=r"^algorithm.advantage=grpoo: unknown advantage estimator 'grpoo'; did you "
                                          r"mean 'grpo'\? known: dr_grpo"):
        validate(compose(["algorithm.advantage=grpoo"]))


def test_cli_unknown_key_is_refused():
    result = _cli("trainer.learning_rat=1", "--cfg", "job")
    assert result.returncode != 0 and "trainer.learning_rat" in result.stderr


def test_cli_bad_config_exits_before_loading_anything(tiny_model_dir):
    result = _cli(f"model.path={tiny_model_dir}", "rollout.n=1")
    assert result.returncode == 2 and "rlkit: bad config: rollout.n" in result.stderr


def test_dataset_without_answer_column_lists_columns(tmp_path, tiny_model_dir):
    from rlkit.trainer.trainer import Trainer

    data = tmp_path / "qs.jsonl"
    data.write_text('{"question": "1+1?", "solution": "2"}\n')
    cfg = _cfg(tiny_model_dir, "data=file", f"data.source={data}", "rollout.engine=hf", f"logging.output_dir={tmp_path}")
    validate(cfg)
    with pytest.raises(ValueError) as err:
        Trainer(cfg)
    assert "solution" in str(err.value) and "data.answer_column" in str(err.value)


def test_arithmetic_options_refused_for_other_sources(tiny_model_dir):
    with pytest.raises(ConfigError, match="data=file"):
        validate(_cfg(tiny_model_dir, "data.source=my.jsonl"))


@pytest.mark.parametrize("override, message", [
    ("+trainer.lrr=1", "trainer.lrr: no part of rlkit reads this key. Fix: did you mean trainer.lr? Set trainer.lr="),
    ("+logging.wandb_projet=x", "logging.wandb_projet: no part of rlkit reads this key. Fix: did you mean "
                                "logging.wandb_project?"),
    ("+rollout.engine.optons={seed: 1}", "did you mean rollout.engine.options?"),
    ("+zzz=1", "zzz: no part of rlkit reads this key. Fix: remove it"),
])
def test_keys_nothing_reads_are_refused_with_the_closest_known_key(tiny_model_dir, override, message):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tiny_model_dir, override))
    assert message in str(err.value)


def test_user_chosen_keys_are_not_refused(tiny_model_dir):
    validate(_cfg(tiny_model_dir, "+eval.suite.mine={source: my.jsonl, split: test}",
                  "+algorithm.advantage.options.eps=0.001", "+recipe=dapo", "data=math"))


def test_an_estimator_needing_sampler_inputs_is_refused_without_that_sampler(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"algorithm.advantage=fr3e: reads base_ids, state_index from the sampler, "
                                          r"which algorithm.sampler=group does not provide. Fix: set algorithm.sampler=fr3e"):
        validate(_cfg(tiny_model_dir, "algorithm.advantage=fr3e"))
    validate(_cfg(tiny_model_dir, "+recipe=fr3e", "algorithm.reward_shaper=grpo_lambda"))


def test_exact_on_policy_departures_are_accepted_knowingly(tiny_model_dir):
    validate(_cfg(tiny_model_dir, "+recipe=opo", "algorithm.loss.entropy_coef=0.01", "algorithm.allow_off_policy=true"))


def test_validation_imports_nothing_of_eval(tiny_model_dir):
    code = ("import sys\nfrom rlkit.config import compose\nfrom rlkit.validation import validate\n"
            f"validate(compose(['model.path={tiny_model_dir}', 'trainer.eval_every=1']))\n"
            "print(sorted(m for m in sys.modules if m.startswith('rlkit.eval')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_cli_bad_eval_settings_are_refused_before_anything_loads(tiny_model_dir):
    result = _cli(f"model.path={tiny_model_dir}", "trainer.eval_every=1", "eval.benchmarks=[gsm9k]")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("rlkit: bad config: eval.benchmarks"), result.stderr


@pytest.mark.parametrize("overrides, message", [
    (["+algorithm.advantage.options.eps=abc"], "algorithm.advantage.options.eps: advantage estimator 'grpo' expects "
                                               "float, got str 'abc'. Fix: give a value of type float"),
    (["+algorithm.advantage.options.norm_by_std=3"], "norm_by_std: advantage estimator 'grpo' expects bool, got int 3"),
    (["algorithm.token_mask.name=capo", "+algorithm.token_mask.options.top_k=1.5"],
     "algorithm.token_mask.options.top_k: token mask 'capo' expects int, got float 1.5"),
])
def test_plugin_option_values_are_checked_against_its_annotations(tiny_model_dir, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tiny_model_dir, *overrides))
    assert message in str(err.value)
