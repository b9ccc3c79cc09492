"""Easy verifiable tasks for end-to-end learning tests on the tiny random model (loaded by import path)."""
from rlkit.reward import Score


def contains_seven(response: str, reference: str) -> Score:
    """Reward 1 when the response contains the digit 7: a random tiny model hits it about half the time,
    so groups carry signal and a learning policy drives the rate up within a few steps."""
    correct = "7" in response
    return Score(1.0 if correct else 0.0, correct, response[-8:], None)
