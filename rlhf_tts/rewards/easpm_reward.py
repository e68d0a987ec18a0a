"""EASPM as a `RewardModel`: one scalar `S(c, x, t)` per candidate state, batched, eval mode.

The prompt of item i is `request.prompt[i]` when given (free text is accepted; unknown words map to
`<unk>`), else the default prompt of its emotion index in the model's emotion order (the
vocabulary's: ESD's Neutral, Angry, Happy, Sad, Surprise → "a neutral voice", "an angry voice", ...).
The model has no batch-dependent operation, so concatenating requests never changes a score.

Form (`align.reward`): `score` is the paper's `S(c, x, t)`. `log_softmax` is
`S(c, x, t) - logsumexp_e S(c_e, x, t)` over the emotions' default prompts (with the item's own
prompt standing in for its emotion's): the log-probability EASPM's InfoNCE head gives the target
emotion. A policy change that raises every prompt's score alike (a state EASPM finds generically
"speech-like", whatever the emotion) earns nothing under it.

Input (METHOD §2 open choice, `easpm.input`): `noisy` scores the state x_t itself (default, the
paper's wording). `x0_hat` scores the frozen base model's one-step clean estimate, as SPO's code
does; that needs the base model's score and the items' prior (`mu`, speaker, emotion), which a
request carries as `mu` and `speaker` (rollouts fill them), so the reward takes either a callable
`x0_fn(request) -> states` or the base `GradTTS`, which reads them from the request (or from a `Prior`
passed to `score(request, prior=...)`).
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_tts.config import RunConfig
from rlhf_tts.models.easpm import EASPM
from rlhf_tts.models.gradtts.model import GradTTS, Prior
from rlhf_tts.rewards.base import ScoreRequest, ScoreResult

RequestX0Fn = Callable[[ScoreRequest], torch.Tensor]


class EASPMReward:
    """Scores candidate states with a trained EASPM (see module docstring for the input options)."""

    def __init__(self, model: EASPM, x0: RequestX0Fn | GradTTS | None = None, max_batch: int = 256,
                 form: str = "score") -> None:
        if form not in ("score", "log_softmax"):
            raise ValueError(f"form: 'score' or 'log_softmax', got {form!r}")
        self.model = model.eval()
        self.form = form
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.x0 = x0
        if isinstance(x0, GradTTS):  # frozen: a differentiable score reaches the states, not the base model
            x0.eval()
            for p in x0.parameters():
                p.requires_grad_(False)
        self.max_batch = max_batch
        self.device = model.logit_scale.device
        with torch.no_grad():
            self._default = model.embed_prompts(model.default_prompts())  # (n_emotions, D)
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: RunConfig, device: torch.device | str = "cpu",
                    x0: RequestX0Fn | GradTTS | None = None, form: str = "score") -> "EASPMReward":
        """The cached EASPM of `cfg` (train it with the `easpm` stage first)."""
        from rlhf_tts.training.easpm import easpm_location

        model = easpm_location(cfg).load(device)
        if model.cfg.input == "x0_hat" and x0 is None:
            from rlhf_tts.training.pretrain import base_model_location

            x0 = base_model_location(cfg).load(device)[0]
        return cls(model, x0, form=form)

    @property
    def emotions(self) -> tuple[str, ...]:
        return self.model.emotions

    def _prompt_embeddings(self, request: ScoreRequest) -> torch.Tensor:
        if request.prompt is None:
            return self._default[request.emotion.to(self.device).long()]
        if len(request.prompt) != len(request):
            raise ValueError(f"ScoreRequest.prompt has {len(request.prompt)} prompts for {len(request)} states")
        missing = sorted({p for p in request.prompt if p not in self._prompt_cache})
        if missing:
            for text, row in zip(missing, self.model.embed_prompts(missing)):
                self._prompt_cache[text] = row
        return torch.stack([self._prompt_cache[p] for p in request.prompt])

    def _inputs(self, request: ScoreRequest, prior: Prior | None) -> torch.Tensor:
        states = request.states * request.mask
        if self.model.cfg.input == "noisy":
            return states
        if self.x0 is None:
            raise ValueError("this EASPM scores x0_hat: give EASPMReward an x0 callable or the base GradTTS")
        if isinstance(self.x0, GradTTS):
            if prior is None and request.mu is not None and request.speaker is not None:
                prior = Prior.for_decoder(request.mu, request.mask, request.emotion, request.speaker)
            if prior is None:
                raise ValueError("x0_hat from the base model needs the candidates' condition: a Prior "
                                 "(score(request, prior=...)) or the request's mu and speaker")
            t = request.t.to(states.dtype).reshape(-1).expand(len(request))
            return self.x0.x0_estimate(states, t, prior) * request.mask
        return self.x0(request) * request.mask

    @torch.no_grad()
    def score(self, request: ScoreRequest, prior: Prior | None = None) -> ScoreResult:
        return ScoreResult(self.differentiable_scores(request, prior).float())

    def differentiable_scores(self, request: ScoreRequest, prior: Prior | None = None) -> torch.Tensor:
        """The scores of `score` with autograd through the states (EASPM itself stays frozen): what
        direct reward ascent (`rlhf_tts.training.reward_ascent`) backpropagates into the decoder."""
        request = request.to(self.device)
        prompts = self._prompt_embeddings(request)
        states = self._inputs(request, prior)
        t = request.t.to(states.dtype).reshape(-1).expand(len(request))
        scores = []
        for start in range(0, len(request), self.max_batch):
            part = slice(start, start + self.max_batch)
            audio = self.model.embed_audio(states[part], request.mask[part], t[part])
            target = self.model.scale() * (audio * prompts[part]).sum(-1)
            if self.form == "log_softmax":
                others = self.model.logits(audio, self._default)  # (n, n_emotions)
                own = request.emotion.to(self.device).long()[part]
                others = others.scatter(1, own.unsqueeze(1), target.unsqueeze(1))
                target = target - others.logsumexp(1)
            scores.append(target)
        return torch.cat(scores)

    __call__ = score
