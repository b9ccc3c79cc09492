"""The Learner's interface, the batch's lengths kept apart from its loss mask, and samples stamped with
the policy version that made them."""
import pytest
import torch

from rlkit.batch import RolloutBatch
from rlkit.config import ConfigError, build_plugins, compose
from rlkit.validation import validate
from rlkit.trainer.learner import Learner
from rlkit.trainer.setup import make_accelerator
from rlkit.trainer.logprobs import policy_logprobs


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    cfg = compose([f"model.path={tiny_model_dir}", "trainer.lr=1e-3", "rollout.max_tokens=8"])
    return Learner(cfg, build_plugins(cfg), make_accelerator(cfg))


def _batch(pad_id: int) -> RolloutBatch:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, pad_id, pad_id]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    return RolloutBatch(prompt_ids=[[1, 2, 3], [4]], response_ids=ids, response_mask=mask,
                        behavior_logprobs=torch.zeros(2, 4), group_ids=torch.tensor([0, 0]),
                        prompt_index=torch.tensor([0, 0]), truncated=torch.tensor([False, False]),
                        rows=[{}, {}], texts=["", ""])


def test_rank_facts_of_a_single_process(learner):
    assert (learner.rank, learner.world_size, learner.is_main) == (0, 1, True)


def test_weights_are_the_models_state_dict_with_hf_names(learner):
    state = learner.model.state_dict()
    pushed = dict(learner.weights())
    assert pushed.keys() == state.keys() and "model.embed_tokens.weight" in pushed
    assert all(torch.equal(pushed[name], state[name]) for name in state)


def test_state_dict_round_trip_restores_optimizer_scheduler_and_version(learner, tiny_model_dir):
    batch = _batch(learner.pad_id)
    batch.advantages = torch.tensor([[1.0, 1, 1, 1], [-1, -1, 0, 0]])
    assert learner.version == 0
    metrics = learner.update(batch)
    assert learner.version == 1 and metrics["actor/grad_norm"] > 0
    assert learner.update(batch.select([])) == {} and learner.version == 2  # an empty batch: no step, one version
    state = learner.state_dict()
    cfg = compose([f"model.path={tiny_model_dir}", "trainer.lr=1e-3", "rollout.max_tokens=8"])
    fresh = Learner(cfg, build_plugins(cfg), make_accelerator(cfg))
    fresh.load_state_dict(state)
    assert fresh.version == 2 and fresh.scheduler.state_dict() == learner.scheduler.state_dict()
    moments = [s["exp_avg"] for s in fresh.optimizer.state.values()]
    assert moments and all(torch.equal(a, b["exp_avg"]) for a, b in zip(moments, learner.optimizer.state.values()))
    assert fresh.state_dict(optimizer=False)["optimizer"] is None


def test_tokens_masked_out_of_the_loss_do_not_truncate_the_response(learner):
    """Masking tokens 1 and 2 of row 0 out of the loss leaves them in the forward: token 3's logprob is that of
    the unmasked batch (the forward reads response_lengths, not the mask's row sum)."""
    batch = _batch(learner.pad_id)
    full = learner.token_stats(batch).logprobs
    holed = batch.select([0, 1])
    holed.response_mask = holed.response_mask.clone()
    holed.response_mask[0, 1:3] = 0
    assert holed.lengths.tolist() == [4, 2]
    out = learner.token_stats(holed).logprobs
    torch.testing.assert_close(out[0, [0, 3]], full[0, [0, 3]], rtol=0, atol=1e-6)
    assert (out[0, 1:3] == 0).all() and (full[0, 1:3] != 0).all()
    # Laid out by the mask's row sum (2 tokens), token 3 would be predicted from the wrong position.
    by_mask = policy_logprobs(learner.model, holed.prompt_ids, holed.response_ids, holed.response_mask,
                              pad_id=learner.pad_id).logprobs
    assert abs(float(by_mask[0, 3] - full[0, 3])) > 1e-3


def test_lengths_and_policy_version_travel_through_select_and_concat():
    batch = _batch(0)
    assert batch.lengths.tolist() == [4, 2]  # filled from the mask when not given
    batch.response_mask[0, 1] = 0  # a loss mask with a hole keeps the length
    batch.policy_version = torch.tensor([3, 3])
    joined = RolloutBatch.concat([batch, batch.select([1])])
    assert joined.lengths.tolist() == [4, 2, 2] and joined.policy_version.tolist() == [3, 3, 3]
    assert joined.select([2, 0]).lengths.tolist() == [2, 4]


def test_collected_samples_carry_the_learners_version(tmp_path, tiny_model_dir):
    from rlkit.trainer.trainer import Trainer

    cfg = compose([f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path}", "logging.run_name=v",
                   "rollout.engine=hf", "rollout.n=2", "rollout.max_tokens=4", "trainer.prompts_per_step=2",
                   "reward.num_workers=0", "data.limit=8", "logging.progress_bar=false",
                   "reward.verifier=rl_tasks:contains_seven"])
    trainer = Trainer(cfg)
    try:
        trainer.train_step()
        assert trainer.learner.version == 1
        batch = trainer.collect().batch
        assert batch.policy_version.tolist() == [1] * len(batch)
    finally:
        trainer.close()


def test_a_loss_reading_extras_is_refused_without_the_sampler_that_provides_them(tiny_model_dir):
    cfg = compose([f"model.path={tiny_model_dir}", "algorithm.policy_loss=critique"])
    with pytest.raises(ConfigError, match=r"algorithm.policy_loss=critique: reads is_refinement from the sampler, "
                                          r"which algorithm.sampler=group does not provide. Fix: set "
                                          r"algorithm.sampler=critique"):
        validate(cfg)
    validate(compose([f"model.path={tiny_model_dir}", "+recipe=critique_grpo"]))
