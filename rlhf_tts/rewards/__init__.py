"""Reward models behind one interface (`RewardModel`): EASPM now, HPRO's multi-level codec later."""

from rlhf_tts.rewards.base import RewardModel, ScoreRequest, ScoreResult

__all__ = ["RewardModel", "ScoreRequest", "ScoreResult"]
