"""Direct reward ascent (the diagnostic beside EASPO): its gradient raises the reward of the policy's
step, the reward it backpropagates is EASPM's own score, and a policy moved along a reward's gradient
ranks EASPO's fresh pairs the way that reward does — the calibration of the fresh-pair accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import smoke_config
from rlhf_tts.algos import easpo
from rlhf_tts.algos.reward_ascent import reward_ascent_loss
from rlhf_tts.rewards.base import ScoreRequest, ScoreResult
from rlhf_tts.rewards.easpm_reward import EASPMReward
from rlhf_tts.training.align import load_policy
from test_easpm import _model, _states
from test_easpo import align_cfg
from test_gradtts import text_batch, tiny_model


def energy(request: ScoreRequest) -> torch.Tensor:
    """Mean of the masked state, with gradient: one preferred direction in every state."""
    mask = request.mask.expand_as(request.states)
    return (request.states * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))


def test_take_keeps_the_chosen_pairs_in_order():
    cfg = align_cfg(threshold=0.0, sampler_steps=8)
    pairs = easpo.rollout(tiny_model(), text_batch(3, 9), cfg, lambda r: ScoreResult(energy(r)),
                          torch.Generator().manual_seed(0)).batch
    index = torch.tensor([4, 0, 2])
    chosen = pairs.take(index)
    assert len(chosen) == 3 and chosen.version == pairs.version and chosen.rollout_id == pairs.rollout_id
    assert torch.equal(chosen.x_win, pairs.x_win[index]) and torch.equal(chosen.step, pairs.step[index])


def test_differentiable_scores_equal_the_rewards_scores_and_reach_only_real_frames():
    reward = EASPMReward(_model(), form="log_softmax")
    states, mask = _states([30, 22, 17])
    request = ScoreRequest(states=states.clone().requires_grad_(True), mask=mask, t=torch.tensor([0.2, 0.5, 0.7]),
                           emotion=torch.tensor([0, 3, 1]))
    scores = reward.differentiable_scores(request)
    assert torch.allclose(scores.detach(), reward.score(request).scores, atol=1e-6)
    scores.sum().backward()
    grad = request.states.grad
    assert grad.abs().sum() > 0
    assert torch.all(grad * (1 - mask) == 0)  # padding is not a direction the reward can pay for
    assert all(p.grad is None for p in reward.model.parameters())  # EASPM stays frozen


def test_reward_ascent_raises_the_steps_reward_and_ranks_fresh_pairs_better_than_easpo():
    """The same mean-level reward, states, lr and number of updates: EASPO learns from its pairs, reward
    ascent from the reward's gradient on four states per rollout. The policy that followed the gradient
    ranks the next rollouts' pairs (never trained on) clearly better, so a fresh-pair accuracy near 0.5
    is the pairs' noise, not a limit of the metric; and the reward of its step rises."""
    from rlhf_tts.training.align import fresh_pair_accuracy

    cfg = align_cfg(threshold=0.0, sampler_steps=8, objective="reward_matched", lr=3e-3)
    score = lambda request: ScoreResult(energy(request))  # noqa: E731
    readings, rewards = {}, []
    for method in ("easpo", "ascent"):
        learner = easpo.EASPOLearner(tiny_model(), cfg)
        history = []
        for seed in range(30):
            pairs = easpo.rollout(learner.policy, text_batch(3, 9), cfg, score, torch.Generator().manual_seed(seed)).batch
            if method == "easpo":
                history.append(learner.update(pairs) | {"updates": seed + 1})  # reads the pairs before stepping
                continue
            with torch.no_grad():
                l_w, l_l = easpo.pair_log_ratios(learner.policy, learner.reference, pairs, cfg.reduce)
            history.append({"updates": seed + 1, "pairs": len(pairs), "implicit_accuracy": easpo.implicit_accuracy(l_w, l_l)})
            loss, reward = reward_ascent_loss(learner.policy, pairs.take(torch.arange(4)), energy,
                                              torch.Generator().manual_seed(99))
            if seed in (0, 29):  # the same four positions, the same noise: the reward of the policy's step has risen
                rewards.append(float(reward.mean()))
            learner.optimizer.zero_grad()
            loss.backward()
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in learner.policy.encoder.parameters())
            learner.optimizer.step()
        readings[method] = fresh_pair_accuracy(history)["value"]
    assert rewards[1] > rewards[0] + 0.1, rewards
    assert readings["ascent"] > readings["easpo"] + 0.05 and readings["easpo"] > 0.55, readings


def test_reward_ascent_command_on_smoke_caches(tmp_path, smoke_dataset):
    """The tool trains from the align stage's config, writes a model every loader takes, and reuses it."""
    from rlhf_tts.training.align import AlignedModel
    from rlhf_tts.training.easpm import train_easpm
    from rlhf_tts.training.pretrain import run_pretraining
    from rlhf_tts.training.reward_ascent import main

    cfg, dataset = smoke_dataset
    run_pretraining(cfg, dataset.directory)  # the session's smoke base model (a lookup when another test made it)
    train_easpm(cfg)
    args = ["--states", "2", "preset=smoke", f"cache_dir={cfg.cache_dir}", f"output_dir={tmp_path}",
            "tracking.enabled=false"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "reward_ascent" / "ascent_summary.json").read_text())
    assert summary["updates"] == cfg.align.steps == len(summary["history"])
    assert sum(row["pairs"] for row in summary["history"]) > 0 and (tmp_path / "reward_ascent" / "ascent_curves.png").is_file()
    model_dir = Path(summary["model"])
    model, _, _ = AlignedModel(model_dir).as_base().load("cpu")  # the layout evaluate and synthesize load
    base, _, _ = load_policy(cfg)
    moved = [not torch.equal(a, b) for a, b in zip(model.decoder.state_dict().values(), base.decoder.state_dict().values())]
    assert any(moved)  # the decoder was trained
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(), base.encoder.state_dict().values()))
    assert "reward ascent" in json.loads((model_dir / "model.json").read_text())["aligned"]["objective"]
    stamp = (model_dir / "final").stat().st_mtime_ns
    assert main(args) == 0 and (model_dir / "final").stat().st_mtime_ns == stamp  # found, not retrained
    assert main(["--states", "0", *args[2:]]) == 2
