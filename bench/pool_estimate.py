"""How well a pool's candidates estimate the reward's gradient, measured in one run on one config.

    python bench/pool_estimate.py [--states 12] [--pools 4] [--k 32] [--windows 64 32 16 --] [key=value ...]

`pool_matched`'s update at the reference is the score-function estimate of EASPM's gradient with
respect to the next state, Σ_i (S_i - S̄)(x_i - μ) / ((k - 1) σ²), pushed into the decoder through μ_θ
(rlhf_tts/algos/easpo.py::pool_gradient_estimate, pool_matched_loss). This bench measures that
estimate where it is made: on the base model's own rollout states at the preference steps of `align.*` (the train split's
prompts, the rollout's sampler), it draws `--pools` pools of `--k` windowed candidates per state and
compares each pool's estimate, inside the window, with the reward's exact gradient there
(autograd through EASPM, averaged over `--samples` draws of the step: the smoothed gradient the
estimate is unbiased for). Under `candidate_level` shared/band both are compared in the subspace the
candidates vary in (the window's means removed).

For a reward that is linear over the step's noise the cosine is about sqrt(n / (n + d)) for n
independent directions in d dimensions (printed beside it): where the measurement sits on that line
the estimate's error is the candidates' number against the window's size, not the reward's
curvature, and only more candidates or a smaller window (fewer dimensions) reduce it.

Printed per window size (`--windows`, frames; the same states, each window starting where the
rollout's did) and per candidate draw (`independent`: the align stage's; `mirrored`: antithetic pairs,
`easpo.windowed_candidates(mirrored=True)`): the mean cosine between estimate and gradient (1 =
exact, ~0 = noise) with its standard error, the linear count beside it, and the ratios against the
first row's independent draw; then the same cosine where the update happens, both directions pulled
back through the step's mean into the decoder's weights (J^T v, the rollout's whole-utterance U-Net;
heavy-tailed across states, so read it with its standard error). Higher is less noise at the same
scoring cost. Needs the config's cached base model and EASPM
(`python -m rlhf_tts.run stages=[data,pretrain,easpm]`).
"""

from __future__ import annotations

import argparse
import time

import torch


def window_part(x: torch.Tensor, start: int, frames: int, level: str) -> torch.Tensor:
    """x[..., window] with the means the candidates share removed (none / the window's / each band's)."""
    w = x[..., start:start + frames]
    if level == "shared":
        return w - w.mean(dim=(-2, -1), keepdim=True)
    if level == "band":
        return w - w.mean(dim=-1, keepdim=True)
    return w


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--states", type=int, default=12, help="rollout states (preference steps) to measure at")
    parser.add_argument("--pools", type=int, default=4, help="pools drawn per state, window and candidate draw")
    parser.add_argument("--k", type=int, default=32, help="candidates per pool (even)")
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 32, 16],
                        help="window sizes in frames (at most align.learner_crop_frames)")
    parser.add_argument("--samples", type=int, default=8, help="draws of the step the exact gradient is averaged over")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from rlhf_tts.algos import easpo
    from rlhf_tts.config import load_config
    from rlhf_tts.models.gradtts import diffusion
    from rlhf_tts.rewards.base import ScoreRequest
    from rlhf_tts.training.align import (load_policy, load_prompts, load_reward, reward_needs_condition,
                                         rollout_generator)

    cfg = load_config(None, ["preset=tiny", *args.overrides])
    align = cfg.align
    if not align.candidate_window:
        raise SystemExit("bench/pool_estimate.py measures windowed pools: set align.candidate_window=true")
    torch.manual_seed(0)
    policy, vocab, _ = load_policy(cfg)
    policy.eval()
    reward = load_reward(cfg)
    prompts = load_prompts(cfg, vocab)
    frames = easpo.crop_frames(align, policy.length_multiple)
    if max(args.windows) > frames:
        raise SystemExit(f"--windows: at most the rollout's window, {frames} frames")
    started = time.monotonic()

    # The rollout's states: what the align stage would train on at its first version.
    states = []
    index = 0
    while len(states) < args.states:
        text, _ = prompts.batch(index)
        with torch.no_grad():
            batch = easpo.rollout(policy, text, align, reward.score, rollout_generator(0, index),
                                  send_condition=reward_needs_condition(cfg)).batch
        states += [batch.take(torch.tensor([i])) for i in range(len(batch))]
        index += 1
    states = states[:args.states]

    draws_of = {"independent": False, "mirrored": True}
    cosines = {(w, name): [] for w in args.windows for name in draws_of}
    # The same comparison where the update happens: pulled back through the step's mean into the decoder's weights
    decoder_cosines = {(w, name): [] for w in args.windows for name in draws_of}
    params = list(policy.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    level = align.candidate_level
    for n, state in enumerate(states):
        start = int(state.window_start[0])
        score = policy.score(state.x_t, state.t, state.prior(), align.guidance)  # with the graph, for pull_back
        mean_g, variance = diffusion.reverse_step_mean(state.x_t, state.mu, score, state.t, state.h.reshape(-1, 1, 1),
                                                       policy.cfg.beta_min, policy.cfg.beta_max)
        mean, variance = mean_g.detach(), variance.detach().reshape(())
        t_score = easpo.candidate_time(state.t, state.h)

        def pull_back(v: torch.Tensor, w: int) -> torch.Tensor:
            """J^T v: a (n_feats, w) direction in the window, in the decoder's weights."""
            full = torch.zeros_like(mean_g)
            full[0, :, start:start + w] = v
            grads = torch.autograd.grad(mean_g, params, grad_outputs=full * state.mask, retain_graph=True)
            return torch.cat([x.flatten() for x in grads])

        def request(x: torch.Tensor) -> ScoreRequest:
            m = len(x)
            return ScoreRequest(states=x, mask=state.mask.expand(m, -1, -1), t=t_score.expand(m),
                                emotion=state.emotion.expand(m), mu=state.mu.expand(m, -1, -1),
                                speaker=state.speaker.expand(m))

        # exact: E_ε ∇_x S(μ + σ ε) by autograd, over --samples draws of the step
        draws = (mean + variance.sqrt() * torch.randn((args.samples, *mean.shape[1:]), generator=g)) * state.mask
        draws.requires_grad_(True)
        reward.differentiable_scores(request(draws)).sum().backward()
        gradient = draws.grad.mean(dim=0)
        cosine = torch.nn.functional.cosine_similarity
        for w in args.windows:
            exact = window_part(gradient, start, w, level)
            exact_params = pull_back(exact, w)
            for name, mirrored in draws_of.items():
                for _ in range(args.pools):
                    pool = easpo.windowed_candidates(mean, variance.reshape(1), args.k, torch.tensor([start]), w, g,
                                                     level, mirrored)[:, 0] * state.mask
                    with torch.no_grad():
                        s = reward.score(request(pool)).scores
                    estimate = window_part(easpo.pool_gradient_estimate(pool, mean[0], variance, s), start, w, level)
                    cosines[w, name].append(float(cosine(estimate.flatten(), exact.flatten(), dim=0)))
                    estimate_params = pull_back(estimate, w)
                    decoder_cosines[w, name].append(float(cosine(estimate_params, exact_params, dim=0)))
        print(f"state {n + 1}/{len(states)} (t = {float(state.t):.2f}) measured", flush=True)

    n_feats = states[0].x_t.shape[1]
    base = sum(cosines[args.windows[0], "independent"]) / len(cosines[args.windows[0], "independent"])
    print(f"\n{cfg.preset}: k = {args.k}, candidate_level = {level}, {len(states)} states x {args.pools} pools "
          f"({time.monotonic() - started:.0f} s); cosine(pool estimate, exact gradient), mean ± standard error")
    print("in the window (d numbers) | pulled back into the decoder's weights")
    print(f"{'window':>7} {'d':>6} {'draw':>12} {'cosine':>16} {'linear count':>13} {'ratio':>6} | "
          f"{'decoder':>16} {'ratio':>6}")

    def mean_se(values: list[float]) -> tuple[float, float]:
        v = torch.tensor(values)
        return float(v.mean()), float(v.std()) / len(v) ** 0.5

    decoder_base = mean_se(decoder_cosines[args.windows[0], "independent"])[0]
    for w in args.windows:
        dims = n_feats * w - {"own": 0, "shared": 1, "band": n_feats}[level]
        for name in draws_of:
            (m, se), (dm, dse) = mean_se(cosines[w, name]), mean_se(decoder_cosines[w, name])
            n = args.k // 2 if name == "mirrored" else args.k
            count = (n / (n + dims)) ** 0.5
            print(f"{w:>7} {dims:>6} {name:>12} {m:+.4f} ± {se:.4f} {count:>13.4f} {m / base:>5.2f}x | "
                  f"{dm:+.4f} ± {dse:.4f} {dm / decoder_base:>5.2f}x")


if __name__ == "__main__":
    main()
