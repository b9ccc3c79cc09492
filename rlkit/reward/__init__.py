"""Verifier rewards: one core used in-process (VerifierPool) or behind a service.

Imports nothing of rlkit but the registry, so it can run alone.
"""
from rlkit.reward.pool import VerifierPool
from rlkit.reward.verifiers import VERIFIERS, Score, score_one

__all__ = ["VERIFIERS", "Score", "VerifierPool", "score_one"]
