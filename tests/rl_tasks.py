"""Easy verifiable tasks for end-to-end learning tests on the tiny random model (loaded by import path)."""
from rlkit.reward import Score


def contains_seven(response: str, reference: str) -> Score:
    """Reward 1 when the response contains the digit 7: a random tiny model hits it about half the time,
    so groups carry signal and a learning policy drives the rate up within a few steps."""
    correct = "7" in response
    return Score(1.0 if correct else 0.0, correct, response[-8:], None)


# ---------------------------------------------------------------- toy plug-ins for the plug-point tests
import torch  # noqa: E402

from rlkit.batch import RolloutBatch  # noqa: E402
from rlkit.registry import declare  # noqa: E402
from rlkit.sampling.samplers import sample_groups  # noqa: E402


def reject_every_third(inputs, *, offset: int = 0):
    """Token mask rejecting response positions t with (t + offset) % 3 == 0: 2 in 3 tokens kept."""
    positions = torch.arange(inputs.mask.shape[1], device=inputs.mask.device)
    return inputs.mask * ((positions + offset) % 3 != 0).to(inputs.mask.dtype)


class StepCounter:
    """A stateful token mask that keeps every token and counts the optimizer steps it has seen."""

    def __init__(self, start: int = 0):
        self.steps = start

    def __call__(self, inputs):
        return inputs.mask

    def after_optimizer_step(self) -> None:
        self.steps += 1

    def step_metrics(self) -> dict[str, float]:
        return {"counter/steps": float(self.steps)}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def three_groups_per_prompt(rows, ctx, *, first_group_id):
    """A sampler that makes three groups of n responses for every prompt (FR3E-like branching)."""
    batches = [sample_groups(rows, ctx, first_group_id=first_group_id + k * len(rows)) for k in range(3)]
    return RolloutBatch.concat(batches, ctx.pad_id)


SHAPER_CALLS: list[dict] = []


@declare(needs_groups=True)
def recording_shaper(rewards, correct, lengths, group_ids, *, scorable):
    """Records the batch it shapes (size, groups, scorable) and leaves the rewards as they are."""
    SHAPER_CALLS.append({"size": len(rewards), "groups": group_ids.unique().numel(), "scorable": scorable.clone()})
    return rewards.clone()


def seven_if_even_answer(response: str, reference: str) -> Score:
    """`contains_seven` for prompts whose reference is even; 0 for odd ones, so those groups carry no signal
    and DAPO's dynamic sampling must resample."""
    correct = int(reference) % 2 == 0 and "7" in response
    return Score(1.0 if correct else 0.0, correct, response[-8:], None)


def off_context_sampler(rows, ctx, *, first_group_id):
    """Groups as usual, but odd samples claim another sampling context, with behaviour logprobs that are off."""
    batch = sample_groups(rows, ctx, first_group_id=first_group_id)
    batch.off_context = torch.arange(len(batch)) % 2 == 1
    batch.behavior_logprobs[batch.off_context] -= 3.0
    return batch


@declare(needs_groups=True, needs_on_policy=True)
def on_policy_estimator(rewards, group_ids, response_mask, *, scorable=None):
    """Dr. GRPO's advantage, declared as needing exactly on-policy updates."""
    from rlkit.algorithms import compute_advantages

    return compute_advantages("dr_grpo", rewards, group_ids, response_mask, scorable=scorable)


def empty_sampler(rows, ctx, *, first_group_id):
    """Returns no sample at all (as FR3E does when every state of every prompt is flat)."""
    return sample_groups(rows[:1], ctx, first_group_id=first_group_id).select([])
