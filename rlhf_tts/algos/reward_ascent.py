"""Direct reward ascent through one reverse step: the noiseless direction EASPO's pairs estimate.

EASPO learns from (win, lose) pairs: at policy = reference, the `reward_matched` gradient on the
step's mean is proportional to (S_w - S_l)(x_w - x_l), whose expectation over the candidates is,
for a reward that is locally linear in the next state, proportional to the reward's gradient there
(Stein's lemma: E[S(μ + σε) ε] = σ E[∇S]). Each pair sees that direction through one step's noise
over every mel value, so its estimate needs many pairs. The reparameterised gradient of the same
expected reward, ∇_θ E_ε[S(μ_θ(x_t) + σ ε, t - h/2)], is that direction without the noise. Training the
decoder on it, from EASPO's own rollout states with EASPO's optimiser, answers what EASPO would do
to the judges with unlimited pairs; it is a diagnostic, not part of either paper (DRaFT / ReFL-style
methods use it as their training signal).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhf_tts.algos.easpo import PreferenceBatch, candidate_time
from rlhf_tts.models.gradtts import diffusion
from rlhf_tts.models.gradtts.model import GradTTS
from rlhf_tts.rewards.base import ScoreRequest

DifferentiableRewardFn = Callable[[ScoreRequest], Tensor]


def reward_ascent_loss(policy: GradTTS, states: PreferenceBatch, reward_fn: DifferentiableRewardFn,
                       generator: torch.Generator, guidance: float = 1.0) -> tuple[Tensor, Tensor]:
    """(loss, rewards): minus the mean reward of one reparameterised policy step from each state.

    The next state is μ_θ(x_t) + σ ε (one ε per state from `generator`, the step's own variance), scored
    at its own time as the rollout scores its candidates (`candidate_time`); the gradient reaches the
    decoder through μ_θ only."""
    prior = states.prior()
    score = policy.score(states.x_t, states.t, prior, guidance)
    h = states.h.reshape(-1, 1, 1)
    mean, variance = diffusion.reverse_step_mean(states.x_t, states.mu, score, states.t, h,
                                                 policy.cfg.beta_min, policy.cfg.beta_max)
    noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
    next_state = (mean + variance.sqrt() * noise) * states.mask
    rewards = reward_fn(ScoreRequest(states=next_state, mask=states.mask, t=candidate_time(states.t, states.h),
                                     emotion=states.emotion, mu=states.mu, speaker=states.speaker))
    return -rewards.mean(), rewards.detach()
