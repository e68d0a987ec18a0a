"""EASPO: stepwise preference optimisation of the Grad-TTS decoder (METHOD §3). Pure functions, no Ray.

A rollout denoises a batch of prompts with the current policy. At each *preference step* (a step
whose time lies in `[t_lo, t_hi]`), k candidates are drawn from the same state with one
score-network call, scored by a reward model at the time they are states of (`candidate_time`), and
the best and worst form a (win, lose) pair that is kept when the softmax margin of their scores
passes a threshold. The next state is one candidate chosen uniformly at random (or the winner,
`greedy`). The learner then moves the policy's log-ratio against a frozen reference on those pairs.
Three options are not the paper's (the tiny preset takes all three): `pool_matched` trains on every
candidate of a kept pool instead of its best/worst pair, `candidate_window` draws a pool's
candidates so that they differ only inside the window the learner crops to, and `candidate_level`
`shared` / `band` gives them one overall level / one level per mel band in that window.

The Ray actors call exactly these functions: `rollout` in a rollout actor (its `score_fn` sends the
request to the reward actor), `EASPOLearner.update` in the learner actor.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_tts.config import AlignConfig
from rlhf_tts.models.gradtts import diffusion
from rlhf_tts.models.gradtts.model import GradTTS, Prior, TextBatch
from rlhf_tts.rewards.base import PoolLayout, ScoreRequest, ScoreResult

ScoreFn = Callable[[ScoreRequest], ScoreResult]


# ---------------------------------------------------------------------------------------- schedule

def step_times(n_steps: int) -> list[float]:
    """Midpoint times t_i = 1 - (i + 0.5) h of Grad-TTS's sampler."""
    h = 1.0 / n_steps
    return [1.0 - (i + 0.5) * h for i in range(n_steps)]


def candidate_time(t: float | Tensor, h: float | Tensor) -> float | Tensor:
    """The time of a state one step on from midpoint time t: 1 - (i + 1) h = t - h / 2.

    The sampler evaluates its drift at the step's midpoint, so the state it lands on belongs to the
    step's end, not to t - h; candidates are scored there (before ALIGN_VERSION 2 they were scored at
    t - h, h / 2 late, and the last step's at t = -h / 2, outside EASPM's training range)."""
    return t - 0.5 * h


def preference_steps(n_steps: int, t_lo: float, t_hi: float) -> list[int]:
    """Indices of sampler steps whose time lies in [t_lo, t_hi] (κ = 0.25 → [0, 0.75], the paper's)."""
    return [i for i, t in enumerate(step_times(n_steps)) if t_lo <= t <= t_hi]


def crop_frames(cfg: AlignConfig, length_multiple: int) -> int | None:
    """`learner_crop_frames` rounded up to the U-Net's length multiple (None: whole utterances)."""
    if not cfg.learner_crop_frames:
        return None
    return -(-cfg.learner_crop_frames // length_multiple) * length_multiple


def candidate_frames(cfg: AlignConfig, crop: int) -> int:
    """Frames a pool's windowed candidates differ in: `candidate_window_frames`, else the whole crop."""
    return min(cfg.candidate_window_frames or crop, crop)


def window_starts(mask: Tensor, frames: int, generator: torch.Generator) -> Tensor:
    """(B,) start of one uniformly placed window of `frames` inside each item's valid frames (CPU, long);
    an item shorter than the window starts at 0."""
    lengths = mask.sum(dim=(1, 2)).long().cpu()
    draw = torch.rand(len(lengths), generator=generator, device=generator.device).cpu()
    return (draw * (lengths - frames + 1).clamp_min(1)).long()


def window_index(starts: Tensor, frames: int, like: Tensor) -> Tensor:
    """(B, ..., frames) frame indices of each item's window, shaped to gather/scatter along like's last axis."""
    index = (starts.unsqueeze(1) + torch.arange(frames)).to(like.device)
    return index.reshape(index.shape[0], *([1] * (like.dim() - 2)), frames).expand(*like.shape[:-1], frames)


def windowed_candidates(mean: Tensor, variance: Tensor, k: int, starts: Tensor, frames: int,
                        generator: torch.Generator, level: Literal["own", "shared", "band"] = "own",
                        mirrored: bool = False) -> Tensor:
    """k draws of N(mean, variance) (B, n_feats, T) → (k, B, n_feats, T) that share their noise outside
    one window per item (common random numbers).

    Not in the paper. Each candidate is still an exact draw of the policy's step (the next state may be
    any of them), but two candidates differ only inside the window: their score difference is caused
    by those frames alone, and so is the difference of their log-ratios: the learner, cropping to the
    same window, loses none of it (with `reduce=sum`; `mean` divides it by the window's size; up to the
    U-Net seeing the crop's edges) instead of reading a window's share of it. The score-function
    estimate's noise grows with the dimension the candidates differ in, so a 64-frame window of a
    ~265-frame utterance gives each pair about 4x the signal.

    `level="shared"` also gives the candidates one common mean over the window (each one's own noise
    has its mean replaced by a draw shared by the pool, of the same variance, so every candidate is
    still an exact draw): they then cannot differ in the window's overall level, the one direction in
    which a level-sensitive reward's preference is the same at every state and would add up across
    updates (on the tiny preset, a decoder whose level drifts away from the recordings' loses the judge).
    `level="band"` shares each feature row's mean over the window instead (the same construction per
    mel band): no per-band level either, so neither spectral tilt nor any other envelope-wide direction.

    `mirrored=True` (antithetic sampling; k even) draws k/2 window noises and pairs each with its
    negation (the level's shared part, if any, is not negated): every candidate is still an exact draw,
    and each mirrored pair's score difference loses the reward's part that is even in the noise. Not an
    alignment option: on the tiny preset EASPM is locally linear over a step's noise, so the even part
    is negligible and k/2 directions estimate its gradient worse than k (`bench/pool_estimate.py`).
    """
    if mirrored and k % 2:
        raise ValueError(f"mirrored candidates need an even k, got {k}")
    shared = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
    noise = shared.unsqueeze(0).repeat(k, *([1] * mean.dim()))
    drawn = k // 2 if mirrored else k
    own = torch.randn((drawn, *mean.shape[:-1], frames), generator=generator, device=generator.device).to(mean)
    common = None
    if level != "own":
        axes = tuple(range(2, own.dim())) if level == "shared" else (-1,)
        shape = [1, *own.shape[1:]]
        for axis in axes:
            shape[axis] = 1
        pooled = math.prod(own.shape[a] for a in axes)
        common = torch.randn(shape, generator=generator, device=generator.device).to(mean) / math.sqrt(pooled)
        own = own - own.mean(dim=axes, keepdim=True)
    if mirrored:
        own = torch.cat([own, -own])
    if common is not None:
        own = own + common
    noise.scatter_(-1, window_index(starts, frames, noise.transpose(0, 1)).transpose(0, 1), own)
    std = variance.sqrt()
    if std.dim() == 1:  # per-item times
        std = std.reshape(1, -1, *([1] * (mean.dim() - 1)))
    return mean.unsqueeze(0) + std * noise


def pool_gradient_estimate(pool: Tensor, mean: Tensor, variance: Tensor | float, scores: Tensor) -> Tensor:
    """The reward's gradient at the step, estimated from one scored pool: (k, ...) candidates drawn from
    N(mean, variance), (k,) scores → Σ_i (S_i - S̄)(x_i - mean) / ((k - 1) variance), shaped like mean.

    What `pool_matched` pushes into the decoder at the reference (through the step's mean); unbiased
    for the gradient of E_ε[S(mean + σ ε)] (Stein's lemma; k - 1 because S̄ includes S_i). For a locally
    linear reward its cosine with that gradient is about sqrt(n / (n + d)) for n independent candidates
    differing in d numbers: the count `bench/pool_estimate.py` checks EASPM against.
    """
    k = pool.shape[0]
    if k < 2 or scores.shape != (k,):
        raise ValueError(f"need k >= 2 candidates and one score each, got {k} and {tuple(scores.shape)}")
    weights = (scores - scores.mean()).reshape(k, *([1] * (pool.dim() - 1)))
    return (weights * (pool - mean)).sum(dim=0) / ((k - 1) * variance)


# --------------------------------------------------------------------------------------- selection

def select_pairs(scores: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scores (k, B) → (win index, lose index, keep mask, margin), each (B,).

    Win = argmax, lose = argmin; the pair is kept when softmax([S_w, S_l])[0] - softmax(...)[1] >
    threshold (SPO's code), i.e. tanh((S_w - S_l) / 2) > threshold.
    """
    win = scores.argmax(dim=0)
    lose = scores.argmin(dim=0)
    s_w = scores.gather(0, win.unsqueeze(0)).squeeze(0)
    s_l = scores.gather(0, lose.unsqueeze(0)).squeeze(0)
    probs = torch.softmax(torch.stack([s_w, s_l]), dim=0)
    margin = probs[0] - probs[1]
    return win, lose, (margin > threshold) & (win != lose), margin


def choose_next(candidates: Tensor, scores: Tensor, rule: Literal["random", "greedy"],
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """candidates (k, B, ...) → (next state (B, ...), chosen index (B,)).

    `random` (the paper's default) keeps rollouts diverse; `greedy` always follows the winner.
    """
    k, batch = candidates.shape[:2]
    if rule == "random":
        index = torch.randint(k, (batch,), generator=generator, device=generator.device if generator else "cpu")
        index = index.to(candidates.device)
    elif rule == "greedy":
        index = scores.argmax(dim=0)
    else:
        raise ValueError(f"next_state: {rule!r} is not random or greedy")
    picked = candidates[index, torch.arange(batch, device=candidates.device)]
    return picked, index


# ------------------------------------------------------------------------------------------ batches

@dataclass
class PreferenceBatch:
    """Kept (win, lose) pairs with everything the learner needs to recompute both policies' means.

    All tensors share the leading pair axis P. `version` is the policy version the rollout used;
    `rollout_id` names the rollout so the learner never trains on the same one twice. `pool` carries
    all k candidates only for `objective=pool_matched` (empty otherwise: no extra bytes in transport).
    """

    x_t: Tensor  # (P, n_feats, T) state the candidates were drawn from
    t: Tensor  # (P,) its time
    h: Tensor  # (P,) step size
    mu: Tensor  # (P, n_feats, T)
    mask: Tensor  # (P, 1, T)
    speaker: Tensor  # (P,)
    emotion: Tensor  # (P,)
    x_win: Tensor
    x_lose: Tensor
    score_win: Tensor  # (P,)
    score_lose: Tensor  # (P,)
    trajectory: Tensor  # (P,) index of the prompt within its rollout
    step: Tensor  # (P,) sampler step index
    pool: Tensor  # (P, k, n_feats, T) every candidate of the pair's pool; (P, 0, ...) unless the objective uses it
    pool_scores: Tensor  # (P, k) their scores; (P, 0) likewise
    window_start: Tensor  # (P,) first frame of the window the pool's candidates differ in; -1: they differ everywhere
    window_frames: int = 0  # frames of that window (0: the candidates differ everywhere)
    version: int = 0
    rollout_id: str = ""
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "PreferenceBatch":
        """Every tensor field through `fn`; version, id and stats carried over."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PreferenceBatch(**{name: fn(v) if isinstance(v, Tensor) else v for name, v in values.items()})

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return self._map_tensors(lambda v: v.to(device))

    def take(self, index: Tensor) -> "PreferenceBatch":
        """The pairs at `index` (a subset, in that order), with the batch's version, id and stats."""
        return self._map_tensors(lambda v: v[index.to(v.device)])

    def prior(self) -> Prior:
        return Prior.for_decoder(self.mu, self.mask, self.emotion, self.speaker)


def _empty_like_pairs(x: Tensor) -> Tensor:
    return x[:0]


def _concat(parts: list[dict[str, Tensor]], key: str, like: Tensor) -> Tensor:
    values = [p[key] for p in parts]
    return torch.cat(values) if values else _empty_like_pairs(like)


# ------------------------------------------------------------------------------------------ rollout

@dataclass
class RolloutResult:
    batch: PreferenceBatch
    final: Tensor  # (B, n_feats, T) the rollout's last state (its generated mel)
    prior: Prior


@torch.no_grad()
def rollout(
    policy: GradTTS, text: TextBatch, cfg: AlignConfig, score_fn: ScoreFn, generator: torch.Generator,
    version: int = 0, rollout_id: str = "", send_condition: bool = False,
) -> RolloutResult:
    """Denoise `text` with the policy and collect preference pairs at the preference steps.

    `pair_steps = "one"` (the paper's wording) draws one step per trajectory uniformly from the
    preference range; `"all"` (SPO's code, the default) uses every step in range. Steps outside the
    range, and steps of a trajectory that is not at its chosen step, are plain steps: stochastic, or the
    probability-flow ODE's with `plain_steps="ode"` (outside the range only).
    The candidates are scored at `candidate_time(t, h)`, the time they are states of. `send_condition`
    adds each candidate's `mu` and speaker to its score request (a reward scoring the base model's clean
    estimate needs them; others would only carry the extra bytes to the reward actor).
    """
    n = cfg.sampler_steps
    h = 1.0 / n
    t_lo, t_hi = cfg.timestep_range()
    in_range = preference_steps(n, t_lo, t_hi)
    prior = policy.encode(text)
    batch = prior.mu.shape[0]
    device = prior.mu.device
    x = policy.initial_state(prior, cfg.temperature, generator)
    if cfg.pair_steps == "one":
        choice = torch.randint(len(in_range), (batch,), generator=generator, device=generator.device)
        chosen_step = torch.tensor(in_range, device=device)[choice.to(device)]
    active_any = set(in_range)
    keep_pool = uses_pool(cfg)
    window = crop_frames(cfg, policy.length_multiple) if cfg.candidate_window else None
    if window is not None and window >= x.shape[-1]:
        window = None  # the whole (padded) utterance is one window: the learner will not crop either
    if window is not None:
        window = candidate_frames(cfg, window)  # the learner's crop is placed around it (crop_pairs)
    parts: list[dict[str, Tensor]] = []
    produced = scored = 0
    margins: list[Tensor] = []
    for i, t in enumerate(step_times(n)):
        if i not in active_any:
            if cfg.plain_steps == "ode":
                x = policy.ode_step(x, t, h, prior, cfg.guidance)
                continue
            mean, variance = policy.reverse_step_mean(x, t, h, prior, cfg.guidance)
            noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x)
            x = (mean + variance.sqrt() * noise) * prior.mask
            continue
        if window is None:
            candidates, _, _ = policy.candidates(x, t, h, prior, cfg.k, generator, cfg.guidance)
            starts = torch.full((batch,), -1, dtype=torch.long)
        else:
            mean, variance = policy.reverse_step_mean(x, t, h, prior, cfg.guidance)
            starts = window_starts(prior.mask, window, generator)
            candidates = windowed_candidates(mean, variance, cfg.k, starts, window, generator,
                                             cfg.candidate_level) * prior.mask
        k = candidates.shape[0]
        flat = candidates.transpose(0, 1).reshape(batch * k, *candidates.shape[2:])  # item-major
        result = score_fn(ScoreRequest(
            states=flat, mask=prior.mask.repeat_interleave(k, 0),
            t=torch.full((batch * k,), candidate_time(t, h), device=device),
            emotion=prior.emotion.repeat_interleave(k, 0),
            durations=prior.durations.repeat_interleave(k, 0),
            mu=prior.mu.repeat_interleave(k, 0) if send_condition else None,
            speaker=prior.speaker.repeat_interleave(k, 0) if send_condition else None,
            pools=None if window is None else PoolLayout(k, starts, window),
        ))
        scores = result.scores.to(device).reshape(batch, k).T  # (k, B)
        scored += batch * k
        win, lose, keep, margin = select_pairs(scores, cfg.threshold)
        if cfg.pair_steps == "one":
            keep = keep & (chosen_step == i)
            produced_here = int((chosen_step == i).sum())
            margins.append(margin[chosen_step == i])
        else:
            produced_here = batch
            margins.append(margin)
        produced += produced_here
        idx = keep.nonzero().squeeze(1)
        if idx.numel():
            cols = torch.arange(batch, device=device)
            parts.append({
                "x_t": x[idx], "t": torch.full((idx.numel(),), t, device=device),
                "h": torch.full((idx.numel(),), h, device=device),
                "mu": prior.mu[idx], "mask": prior.mask[idx], "speaker": prior.speaker[idx],
                "emotion": prior.emotion[idx],
                "x_win": candidates[win, cols][idx], "x_lose": candidates[lose, cols][idx],
                "score_win": scores[win, cols][idx], "score_lose": scores[lose, cols][idx],
                "trajectory": idx, "step": torch.full((idx.numel(),), i, device=device, dtype=torch.long),
                "pool": (candidates if keep_pool else candidates[:0]).transpose(0, 1)[idx],
                "pool_scores": (scores if keep_pool else scores[:0]).T[idx],
                "window_start": starts.to(device)[idx],
            })
        x, _ = choose_next(candidates, scores, cfg.next_state, generator)
        x = x * prior.mask
    kept = sum(len(p["t"]) for p in parts)
    all_margins = torch.cat(margins) if margins else torch.zeros(0)
    stats = {"pairs_produced": float(produced), "pairs_kept": float(kept),
             "kept_fraction": kept / produced if produced else 0.0, "candidates_scored": float(scored),
             "margin_mean": float(all_margins.mean()) if all_margins.numel() else 0.0}
    like = {"x_t": x, "t": prior.lengths.float(), "h": prior.lengths.float(), "mu": prior.mu, "mask": prior.mask,
            "speaker": prior.speaker, "emotion": prior.emotion, "x_win": x, "x_lose": x,
            "score_win": prior.lengths.float(), "score_lose": prior.lengths.float(),
            "trajectory": prior.lengths, "step": prior.lengths,
            "pool": x.unsqueeze(1)[:, :0], "pool_scores": prior.lengths.float().unsqueeze(1)[:, :0],
            "window_start": prior.lengths}
    pairs = PreferenceBatch(**{key: _concat(parts, key, like[key]) for key in like}, window_frames=window or 0,
                            version=version, rollout_id=rollout_id, stats=stats)
    return RolloutResult(pairs, x, prior)


# --------------------------------------------------------------------------------------------- crop

def crop_pairs(pairs: PreferenceBatch, frames: int, generator: torch.Generator,
               window_frames: int | None = None) -> PreferenceBatch:
    """Each pair cut to one window of `frames` frames of its utterance (shorter ones: from 0).

    The learner's cost is a U-Net forward and backward per pair over the whole utterance; a window
    is an unbiased sample of the mean-reduced log-ratio's elements at a fraction of the cost, the way
    Grad-TTS trains its decoder on random segments. Policy and reference see the same window, so
    the log-ratio is still exactly 0 at the start. Pairs whose candidates were drawn to differ in one
    window (`align.candidate_window`) are cut at that window; others at one drawn from `generator`.
    A candidate window of `window_frames` < `frames` frames lies inside the cut at an offset drawn
    from `generator` (the frames around it are the candidates' common noise: context for the U-Net
    that adds the same log-ratio to every candidate of a pool).
    """
    total = pairs.x_t.shape[-1]
    if frames >= total:
        return pairs
    if len(pairs) and bool((pairs.window_start >= 0).all()):
        starts = pairs.window_start.cpu()
        inner = window_frames or frames
        if inner < frames:
            lengths = pairs.mask.sum(dim=(1, 2)).long().cpu()
            lo = (starts + inner - frames).clamp_min(0)
            hi = torch.maximum(lo, torch.minimum(starts, (lengths - frames).clamp_min(0)))
            draw = torch.rand(len(starts), generator=generator, device=generator.device).cpu()
            starts = lo + (draw * (hi - lo + 1)).long().clamp_max(hi - lo)
    else:
        starts = window_starts(pairs.mask, frames, generator)

    def cut(x: Tensor) -> Tensor:  # (P, ..., T) → (P, ..., frames), the same window along every middle axis
        return torch.gather(x, -1, window_index(starts, frames, x))

    moved = {f.name: getattr(pairs, f.name) for f in fields(pairs)}
    for name in ("x_t", "mu", "mask", "x_win", "x_lose", "pool"):
        moved[name] = cut(moved[name])
    moved["window_frames"] = 0  # window_start counts frames of the uncut utterance: no longer this batch's window
    return PreferenceBatch(**moved)


# --------------------------------------------------------------------------------------------- loss

def clipped_log_ratio(log_ratio: Tensor, eps: float) -> Tensor:
    """Clamp log π/π_ref to [log(1 - eps), log(1 + eps)] (SPO's ratio clipping)."""
    return log_ratio.clamp(torch.log1p(torch.tensor(-eps)).item(), torch.log1p(torch.tensor(eps)).item())


def uses_pool(cfg: AlignConfig) -> bool:
    """Whether rollouts must ship every candidate of a pool (only `pool_matched` reads them)."""
    return cfg.objective == "pool_matched"


@dataclass
class StepLogRatios:
    """log π_θ(x|x_t) - log π_ref(x|x_t) of the pairs' winners, losers and (pool_matched) whole pools."""

    win: Tensor  # (P,)
    lose: Tensor  # (P,)
    pool: Tensor  # (P, k), or (P, 0) when the batch carries no pools
    band_kl: Tensor | None = None  # (P,) KL(π_θ ‖ π_ref) along each mel band's mean over the frames (level_anchor)
    level_gap: Tensor | None = None  # (P, n_feats) π_θ's clean estimate's band levels minus mu's (level_target)
    level_weight: Tensor | None = None  # (P,) ρ_t², the clean estimate's signal fraction at each pair's t


def step_log_ratios(policy: GradTTS, reference: GradTTS, pairs: PreferenceBatch, reduce: str, guidance: float = 1.0
                    ) -> StepLogRatios:
    """Log-ratios of every candidate the batch carries, gradient through π_θ only.

    One policy and one reference call per state whatever k is: the candidates of a pool share x_t, so
    they share both means and differ only in the point the Gaussians are read at.
    """
    prior = pairs.prior()
    score = policy.score(pairs.x_t, pairs.t, prior, guidance)
    with torch.no_grad():
        ref_score = reference.score(pairs.x_t, pairs.t, prior, guidance)
    beta_min, beta_max = policy.cfg.beta_min, policy.cfg.beta_max
    h = pairs.h.reshape(-1, 1, 1)
    mean, variance = diffusion.reverse_step_mean(pairs.x_t, pairs.mu, score, pairs.t, h, beta_min, beta_max)
    ref_mean, _ = diffusion.reverse_step_mean(pairs.x_t, pairs.mu, ref_score, pairs.t, h, beta_min, beta_max)
    variance = variance.reshape(-1) if variance.dim() > 1 else variance
    l_w = diffusion.gaussian_log_ratio(pairs.x_win, mean, ref_mean, variance, pairs.mask, reduce)
    l_l = diffusion.gaussian_log_ratio(pairs.x_lose, mean, ref_mean, variance, pairs.mask, reduce)
    band_kl = band_level_kl(mean, ref_mean, variance, pairs.mask, reduce)
    gap = prior_level_gap(pairs.x_t, pairs.mu, score, pairs.t, pairs.mask, beta_min, beta_max)
    rho_sq = torch.exp(-diffusion.cumulative_beta(pairs.t.reshape(-1), beta_min, beta_max))
    n, k = pairs.pool.shape[:2]
    if k == 0:
        return StepLogRatios(l_w, l_l, l_w.new_zeros(n, 0), band_kl, gap, rho_sq)

    def per_candidate(x: Tensor) -> Tensor:
        return x.repeat_interleave(k, 0)

    l_pool = diffusion.gaussian_log_ratio(
        pairs.pool.reshape(n * k, *pairs.pool.shape[2:]), per_candidate(mean), per_candidate(ref_mean),
        per_candidate(variance) if variance.dim() == 1 else variance, per_candidate(pairs.mask), reduce,
    ).reshape(n, k)
    return StepLogRatios(l_w, l_l, l_pool, band_kl, gap, rho_sq)


def prior_level_gap(x_t: Tensor, mu: Tensor, score: Tensor, t: Tensor, mask: Tensor, beta_min: float,
                    beta_max: float) -> Tensor:
    """(P, n_feats): per mel band, the level of the policy's one-step clean estimate (Tweedie's) minus mu's.

    Grad-TTS trains the encoder's mu as the frame-wise mean of the mel (its prior loss), so mu's band
    levels are the text's, speaker's and emotion's level as the corpus has it (within 0.1-0.2 log-mel of
    the recordings on the tiny preset's base models), while the tiny decoder's outputs sat 0.40 below mu
    on one base model and 0.44 above it on another (docs/findings.md, *A level target*). The gap flows into
    the decoder through the score only: x_t and mu are inputs.
    """
    x0 = diffusion.x0_estimate(x_t, mu, score, t.reshape(-1), beta_min, beta_max)
    return diffusion.band_means(x0 - mu, mask)


def level_target_penalty(ratios: StepLogRatios) -> Tensor:
    """(P,) ρ_t² · mean over bands of the squared prior-level gap: in the noised state's units, so a
    pair at large t, whose clean estimate is 1/ρ_t times noisier, weighs no more than one near t = 0."""
    if ratios.level_gap is None or ratios.level_weight is None:
        raise ValueError("level_target: the step's log-ratios carry no prior-level gap")
    return ratios.level_weight * ratios.level_gap.pow(2).mean(dim=1)


def band_level_kl(mean: Tensor, ref_mean: Tensor, variance: Tensor | float, mask: Tensor, reduce: str) -> Tensor:
    """(P,) KL(π_θ ‖ π_ref) of one step restricted to the mel bands' means over the (masked) frames.

    The two policies are Gaussians of one variance v, so along the mean of band b over n frames the KL
    is n Δ_b² / (2 v), Δ_b the band's mean shift; summed over bands (`reduce="sum"`) or per element
    (`"mean"`, the log-ratios' convention). Under `candidate_level=band` no pool can be ranked by a band's
    level, so the reward carries no preference along these directions: what moves the decoder there is a
    side effect of the other updates (on the tiny preset, the output level drifting off the recordings'
    as Emo SIM falls), which `align.level_anchor` charges at this price, as an RLHF KL term would.
    """
    variance = torch.as_tensor(variance, dtype=mean.dtype, device=mean.device)
    if variance.dim() == 1:
        variance = variance.reshape(-1, 1)
    frames = mask.to(mean.dtype).sum(dim=(1, 2)).clamp_min(1.0)  # (P,)
    shift = diffusion.band_means(mean - ref_mean, mask)  # (P, n_feats)
    kl = (frames.unsqueeze(1) * shift.pow(2) / (2.0 * variance)).sum(dim=1)
    if reduce == "sum":
        return kl
    return kl / (frames * mean.shape[1])


def pair_log_ratios(policy: GradTTS, reference: GradTTS, pairs: PreferenceBatch, reduce: str, guidance: float = 1.0
                    ) -> tuple[Tensor, Tensor]:
    """(l_w, l_l): log π_θ(x|x_t) - log π_ref(x|x_t) of winner and loser, with gradient through π_θ."""
    ratios = step_log_ratios(policy, reference, pairs, reduce, guidance)
    return ratios.win, ratios.lose


def preference_loss(l_w: Tensor, l_l: Tensor, score_w: Tensor, score_l: Tensor, cfg: AlignConfig) -> Tensor:
    """Per-pair loss of a single-pair objective.

    reward_matched (the paper's description): (β (l_w - l_l) - (S_w - S_l) / reward_scale)²;
    spo_dpo (the authors' code): -log σ(β (clip(l_w) - clip(l_l))).
    """
    if cfg.objective == "reward_matched":
        return (cfg.beta * (l_w - l_l) - (score_w - score_l) / cfg.reward_scale).pow(2)
    if cfg.objective == "spo_dpo":
        return -F.logsigmoid(cfg.beta * (clipped_log_ratio(l_w, cfg.clip_eps) - clipped_log_ratio(l_l, cfg.clip_eps)))
    raise ValueError(f"objective: {cfg.objective!r} is not a single-pair objective")


def pool_matched_loss(l_pool: Tensor, scores: Tensor, cfg: AlignConfig) -> Tensor:
    """reward_matched's loss averaged over all k(k-1)/2 pairs of each pool: (P, k) → (P,).

    Not the paper's (it keeps the best/worst pair of a pool); an option for small-compute runs. With
    a_i = β l_i - S_i / reward_scale, mean_{i<j} (a_i - a_j)² = 2 / (k - 1) · Σ_i (a_i - ā)², so at the
    reference (l = 0) the gradient is ∝ -Σ_i (S_i - S̄) ∇ log π_θ(x_i | x_t): the score-function
    estimate of the reward's gradient with the pool's mean as baseline (RLOO/GRPO's), from k
    samples per state instead of the two extremes. For k = 2 it is reward_matched exactly.
    """
    k = l_pool.shape[1]
    if k < 2:
        raise ValueError("pool_matched needs the batch's pools (k >= 2); was it rolled out with another objective?")
    a = cfg.beta * l_pool - scores / cfg.reward_scale
    return (a - a.mean(dim=1, keepdim=True)).pow(2).sum(dim=1) * (2.0 / (k - 1))


def objective_loss(ratios: StepLogRatios, pairs: PreferenceBatch, cfg: AlignConfig) -> Tensor:
    """Per-pair (per-pool) loss of `cfg.objective`, plus `cfg.level_anchor` times the band-level KL and
    `cfg.level_target` times the prior-level penalty."""
    if cfg.objective == "pool_matched":
        loss = pool_matched_loss(ratios.pool, pairs.pool_scores, cfg)
    else:
        loss = preference_loss(ratios.win, ratios.lose, pairs.score_win, pairs.score_lose, cfg)
    if cfg.level_anchor and ratios.band_kl is not None:
        loss = loss + cfg.level_anchor * ratios.band_kl
    if cfg.level_target:
        loss = loss + cfg.level_target * level_target_penalty(ratios)
    return loss


def implicit_accuracy(l_w: Tensor, l_l: Tensor) -> float:
    """Fraction of pairs whose log-ratio already ranks the winner first (ties count half): DPO's reward
    accuracy. Measured before the update, on pairs the learner has never trained on, it says whether
    what the policy learned so far carries to new states; 0.5 is no preference at all."""
    return float(((l_w - l_l).detach().sign() + 1).mean() / 2)


# ------------------------------------------------------------------------------------------ learner

def frozen_copy(model: GradTTS) -> GradTTS:
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def freeze_all_but_decoder(model: GradTTS) -> list[torch.nn.Parameter]:
    """Only the score network is trained (encoder, durations, embeddings frozen, as in the paper)."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(model.decoder.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


class EASPOLearner:
    """Policy (decoder trainable), frozen reference, AdamW; one update per PreferenceBatch."""

    def __init__(self, policy: GradTTS, cfg: AlignConfig) -> None:
        self.cfg = cfg
        self.policy = policy
        self.reference = frozen_copy(policy)
        self.optimizer = torch.optim.AdamW(freeze_all_but_decoder(policy), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.version = 0
        self.updates = 0
        self.pairs_trained = 0

    def update(self, pairs: PreferenceBatch, generator: torch.Generator | None = None) -> dict[str, float]:
        """One optimizer step on all pairs of the batch (none → no step, version unchanged).

        With `learner_crop_frames` set, each pair is cut to a random window drawn from `generator`.
        """
        stats = {"pairs": float(len(pairs))}
        if len(pairs) == 0:  # a rollout whose pairs all fell under the threshold still counts as a step
            self._advance()
            return stats
        device = next(self.policy.parameters()).device
        frames = crop_frames(self.cfg, self.policy.length_multiple)
        if frames:
            pairs = crop_pairs(pairs, frames, generator or torch.Generator().manual_seed(self.updates),
                               candidate_frames(self.cfg, frames))
        pairs = pairs.to(device)
        ratios = step_log_ratios(self.policy, self.reference, pairs, self.cfg.reduce, self.cfg.guidance)
        l_w, l_l = ratios.win, ratios.lose
        loss = objective_loss(ratios, pairs, self.cfg).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.decoder.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.pairs_trained += len(pairs)
        self._advance()
        stats.update({
            "loss": float(loss.detach()), "grad_norm": float(grad_norm),
            "log_ratio_win": float(l_w.detach().mean()), "log_ratio_lose": float(l_l.detach().mean()),
            "log_ratio_margin": float((l_w - l_l).detach().mean()),
            "log_ratio_abs_max": float(torch.cat([l_w, l_l]).detach().abs().max()),
            "implicit_accuracy": implicit_accuracy(l_w, l_l),  # l_w, l_l are from before this step
            "band_kl": float(ratios.band_kl.detach().mean()) if ratios.band_kl is not None else 0.0,
            # signed: where the decoder's clean estimate sits against mu's level (before this step)
            "level_gap": float(ratios.level_gap.detach().mean()) if ratios.level_gap is not None else 0.0,
            "reward_margin": float((pairs.score_win - pairs.score_lose).mean()),
            "win_score": float(pairs.score_win.mean()),
        })
        return stats

    def _advance(self) -> None:
        self.updates += 1
        if self.updates % self.cfg.sync_every == 0:
            self.version += 1

    def decoder_state(self) -> dict[str, Tensor]:
        """The only weights rollouts need: the decoder's (everything else is frozen)."""
        return {k: v.detach().cpu().clone() for k, v in self.policy.decoder.state_dict().items()}

    def state_dict(self) -> dict:
        return {"decoder": self.decoder_state(), "optimizer": self.optimizer.state_dict(),
                "version": self.version, "updates": self.updates, "pairs_trained": self.pairs_trained}

    def load_state_dict(self, state: dict) -> None:
        self.policy.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version, self.updates, self.pairs_trained = state["version"], state["updates"], state["pairs_trained"]


def is_stale(batch_version: int, current_version: int, max_staleness: int) -> bool:
    """A batch drawn with weights more than `max_staleness` versions old is dropped, not trained on."""
    return current_version - batch_version > max_staleness
