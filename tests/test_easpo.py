"""EASPO's pure functions (METHOD.md §3): selection, next state, pair timing, objectives, clipping."""

import math

import pytest
import torch

from rlhf_tts.algos import easpo
from rlhf_tts.config import AlignConfig, load_config
from rlhf_tts.rewards.base import ScoreRequest, ScoreResult, concat_requests, split_result
from test_gradtts import text_batch, tiny_model


def align_cfg(**kw) -> AlignConfig:
    return load_config(None, ["preset=smoke", *[f"align.{k}={v}" for k, v in kw.items()]]).align


def emotion_energy_reward(request: ScoreRequest) -> ScoreResult:
    """A deterministic stand-in reward: mean of the masked state (distinct per candidate)."""
    mask = request.mask.expand_as(request.states)
    return ScoreResult((request.states * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)))


def test_align_cache_key_follows_the_resolved_alignment_seed(tmp_path):
    """`align.seed` unset means the run's seed: the same computation, so the same cached model."""
    from rlhf_tts.training.align import align_key

    def key(*overrides: str) -> str:
        return align_key(load_config(None, ["preset=smoke", f"cache_dir={tmp_path}", *overrides]))

    assert key() == key("align.seed=0") != key("align.seed=1")
    assert key("seed=1") == key("seed=1", "align.seed=1") != key("seed=1", "align.seed=0")
    assert key("align.lr=2e-5") != key() != key("align.prompt_emotions=balanced")
    assert key() == key("align.prompt_emotions=iid")
    # an option left at its off value is the computation of the versions before it: the same cached model
    assert key() == key("align.level_target=0") == key("align.level_anchor=0") != key("align.level_target=0.1")


def test_align_cache_key_separates_rollout_schedules_that_train_on_different_pairs(tmp_path):
    """With one rollout actor the pairs depend on how many versions behind the rollouts' weights are, whichever
    loop runs them (test_align_ray checks it): one rollout in flight with `policy_lag=1` trains on the pairs of
    two in flight, the schedule every aligned model was cached with before the key had it."""
    from rlhf_tts.training.align import align_key

    def key(*overrides: str) -> str:
        return align_key(load_config(None, ["preset=smoke", f"cache_dir={tmp_path}", *overrides]))

    one = ("distributed.num_rollout_actors=1", "distributed.max_in_flight=1")
    two = ("distributed.num_rollout_actors=1", "distributed.max_in_flight=2")
    assert key("distributed.mode=local") == key(*one) == key(*one, "distributed.max_staleness=0")
    assert key("distributed.mode=local", "align.policy_lag=1") == key(*one, "align.policy_lag=1") == key(*two)
    assert key(*two) == key(*two, "distributed.max_staleness=1") != key(*two, "distributed.max_staleness=0")
    assert key(*two, "align.policy_lag=1") == key("distributed.max_in_flight=3")  # both two versions behind
    assert len({key(*one), key(*two), key(*two, "align.policy_lag=1"), key("distributed.num_rollout_actors=2")}) == 4
    # the in-process loop ignores the Ray loop's actors
    assert key("distributed.mode=local") == key("distributed.mode=local", "distributed.num_rollout_actors=4")


def test_policy_lag_past_the_staleness_bound_is_refused():
    with pytest.raises(ValueError, match="max_staleness"):
        load_config(None, ["preset=smoke", "align.policy_lag=3", "distributed.max_staleness=2"])


def test_balanced_prompts_give_every_emotion_one_trajectory_per_deck():
    import collections

    from rlhf_tts.training.align import PromptSampler

    class Names:
        emotions, speakers = ("Neutral", "Angry", "Happy", "Sad", "Surprise"), ("spk",)

    rows = [{"speaker": "spk", "utt_id": f"u{i}", "phonemes": [], "word_spans": []} for i in range(3)]
    balanced, iid = PromptSampler(rows, Names, 4, seed=1, emotions="balanced"), PromptSampler(rows, Names, 4, seed=1)

    def counts(sampler: PromptSampler, n: int) -> collections.Counter:
        return collections.Counter(e for i in range(n) for e in sampler.target_emotions(
            i, torch.Generator().manual_seed(i)).tolist())

    assert set(counts(balanced, 60).values()) == {48}  # 240 trajectories: 48 of each emotion, for any seed
    deals = torch.cat([balanced.target_emotions(i, torch.Generator()) for i in range(5)])
    for deck in deals.view(4, 5):  # every 5 consecutive trajectories hold each emotion once
        assert sorted(deck.tolist()) == [0, 1, 2, 3, 4]
    assert not torch.equal(deals.view(4, 5)[0], deals.view(4, 5)[1])  # shuffled per deck
    assert torch.equal(balanced.target_emotions(7, torch.Generator()), balanced.target_emotions(7, torch.Generator()))
    assert len(set(counts(iid, 60).values())) > 1  # the independent draw is not balanced (seed 1: 40 … 56)


def test_preference_steps_follow_kappa_and_range():
    assert easpo.preference_steps(20, 0.0, 0.75) == list(range(5, 20))  # κ = 0.25: skip the first 5 of 20
    assert all(0.25 <= easpo.step_times(20)[i] <= 0.75 for i in easpo.preference_steps(20, 0.25, 0.75))
    assert easpo.preference_steps(20, 0.0, 1.0) == list(range(20))


def test_selection_respects_threshold():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 500, generator=g) * 2
    win, lose, keep, margin = easpo.select_pairs(scores, 0.3)
    assert torch.equal(win, scores.argmax(0)) and torch.equal(lose, scores.argmin(0))
    gap = scores.max(0).values - scores.min(0).values
    assert torch.allclose(margin, torch.tanh(gap / 2), atol=1e-6)
    assert bool((margin[keep] > 0.3).all()) and bool((margin[~keep] <= 0.3).all())
    assert 0 < int(keep.sum()) < 500
    tie = easpo.select_pairs(torch.zeros(4, 3), 0.0)[2]
    assert not bool(tie.any())  # equal scores never make a pair


def test_next_state_is_uniform_over_candidates():
    k, batch, n = 4, 1, 8000
    candidates = torch.arange(k, dtype=torch.float32).reshape(k, 1, 1, 1).expand(k, batch, 1, 1)
    scores = torch.tensor([[0.0], [5.0], [1.0], [2.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(k)
    for _ in range(n):
        picked, index = easpo.choose_next(candidates, scores, "random", g)
        assert float(picked.flatten()[0]) == float(index[0])
        counts[index] += 1
    chi2 = float(((counts - n / k) ** 2 / (n / k)).sum())
    assert chi2 < 16.27  # χ²(3) at p = 0.001: uniform, not biased toward the winner (index 1)
    _, greedy = easpo.choose_next(candidates, scores, "greedy", g)
    assert int(greedy[0]) == 1


@pytest.mark.parametrize("t_range", [(0.0, 0.75), (0.25, 0.75), (0.4, 0.6)])
def test_no_pair_outside_the_timestep_range(t_range):
    cfg = align_cfg(threshold=0.0, sampler_steps=10, t_range=f"[{t_range[0]},{t_range[1]}]")
    result = easpo.rollout(tiny_model(), text_batch(3, 9), cfg, emotion_energy_reward, torch.Generator().manual_seed(0))
    pairs = result.batch
    assert len(pairs) > 0
    assert bool(((pairs.t >= t_range[0] - 1e-6) & (pairs.t <= t_range[1] + 1e-6)).all())
    expected_steps = easpo.preference_steps(10, *t_range)
    assert set(pairs.step.tolist()) <= set(expected_steps)
    assert bool((pairs.score_win > pairs.score_lose).all())


def test_candidates_are_scored_at_the_time_they_are_states_of():
    """Step i lands on time 1 - (i + 1) h (the drift is taken at the midpoint): the reward sees that
    time, so the last step's candidates are scored at 0, never before it."""
    cfg = align_cfg(threshold=0.0, sampler_steps=10, t_range="[0,0.75]")
    seen: list[float] = []

    def recording_reward(request: ScoreRequest) -> ScoreResult:
        seen.extend(request.t.unique().tolist())
        return emotion_energy_reward(request)

    easpo.rollout(tiny_model(), text_batch(2, 9), cfg, recording_reward, torch.Generator().manual_seed(0))
    steps = easpo.preference_steps(10, 0.0, 0.75)
    assert seen == pytest.approx([1.0 - (i + 1) * 0.1 for i in steps], abs=1e-6)
    assert min(seen) == pytest.approx(0.0, abs=1e-6)


def test_pair_steps_one_yields_one_pair_per_trajectory():
    cfg = align_cfg(threshold=0.0, sampler_steps=10, pair_steps="one")
    result = easpo.rollout(tiny_model(), text_batch(4, 9), cfg, emotion_energy_reward, torch.Generator().manual_seed(3))
    assert sorted(result.batch.trajectory.tolist()) == [0, 1, 2, 3]
    all_cfg = align_cfg(threshold=0.0, sampler_steps=10, pair_steps="all")
    dense = easpo.rollout(tiny_model(), text_batch(4, 9), all_cfg, emotion_energy_reward, torch.Generator().manual_seed(3))
    assert len(dense.batch) == 4 * len(easpo.preference_steps(10, 0.0, 0.75))


def test_rollout_is_deterministic_and_pairs_come_from_one_state():
    cfg = align_cfg(threshold=0.0, sampler_steps=6, k=3)
    a = easpo.rollout(tiny_model(), text_batch(2, 7), cfg, emotion_energy_reward, torch.Generator().manual_seed(5))
    b = easpo.rollout(tiny_model(), text_batch(2, 7), cfg, emotion_energy_reward, torch.Generator().manual_seed(5))
    assert torch.equal(a.batch.x_win, b.batch.x_win) and torch.equal(a.final, b.final)
    # winner and loser were drawn from the same mean: their difference is pure step noise
    var = easpo.diffusion.beta(a.batch.t, 0.05, 20.0) * a.batch.h
    diff = (a.batch.x_win - a.batch.x_lose) * a.batch.mask
    per_elem = diff.pow(2).sum(dim=(1, 2)) / a.batch.mask.expand_as(diff).sum(dim=(1, 2))
    assert torch.allclose(per_elem.mean() / (2 * var).mean(), torch.tensor(1.0), atol=0.15)


def _pairs(model, cfg, seed=0):
    return easpo.rollout(model, text_batch(3, 9), cfg, emotion_energy_reward, torch.Generator().manual_seed(seed)).batch


def _margin(learner, pairs, cfg):
    with torch.no_grad():
        l_w, l_l = easpo.pair_log_ratios(learner.policy, learner.reference, pairs, cfg.reduce)
    return l_w, l_l


def test_reward_matched_gradient_moves_log_ratio_margin_toward_reward_margin():
    cfg = align_cfg(threshold=0.0, sampler_steps=8, objective="reward_matched", lr=3e-3, beta=10.0)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    pairs = _pairs(learner.policy, cfg)
    target = (pairs.score_win - pairs.score_lose) / cfg.reward_scale
    l_w, l_l = _margin(learner, pairs, cfg)
    assert torch.allclose(l_w, torch.zeros_like(l_w)) and torch.allclose(l_l, torch.zeros_like(l_l))  # policy = ref
    before = float((cfg.beta * (l_w - l_l) - target).abs().mean())
    for _ in range(15):
        learner.update(pairs)
    l_w, l_l = _margin(learner, pairs, cfg)
    after = float((cfg.beta * (l_w - l_l) - target).abs().mean())
    assert after < 0.7 * before
    assert float((l_w - l_l).mean()) > 0  # moved toward the (positive) reward margin


def test_rollouts_ship_whole_pools_only_for_the_pool_objective():
    pairs = _pairs(tiny_model(), align_cfg(threshold=0.0, sampler_steps=8, k=5))
    assert pairs.pool.shape[:2] == (len(pairs), 0) and pairs.pool_scores.shape == (len(pairs), 0)
    pooled = _pairs(tiny_model(), align_cfg(threshold=0.0, sampler_steps=8, k=5, objective="pool_matched"))
    assert torch.equal(pooled.x_win, pairs.x_win) and torch.equal(pooled.score_lose, pairs.score_lose)  # same draws
    assert pooled.pool.shape == (len(pairs), 5, *pairs.x_win.shape[1:]) and pooled.pool_scores.shape == (len(pairs), 5)
    rows = torch.arange(len(pairs))
    win, lose = pooled.pool_scores.argmax(dim=1), pooled.pool_scores.argmin(dim=1)
    assert torch.equal(pooled.pool[rows, win], pooled.x_win) and torch.equal(pooled.pool[rows, lose], pooled.x_lose)
    assert torch.equal(pooled.pool_scores.amax(dim=1), pooled.score_win)
    # every candidate of a pool is scored as the reward sees it
    flat = pooled.pool.reshape(-1, *pooled.pool.shape[2:])
    request = ScoreRequest(flat, pooled.mask.repeat_interleave(5, 0), pooled.t.repeat_interleave(5), pooled.emotion.repeat_interleave(5))
    assert torch.allclose(emotion_energy_reward(request).scores.view(-1, 5), pooled.pool_scores, atol=1e-6)


def test_pool_matched_is_reward_matched_over_every_pair_of_the_pool():
    cfg = align_cfg(objective="pool_matched", beta=3.0, reward_scale=2.0)
    g = torch.Generator().manual_seed(0)
    l_pool, scores = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    loss = easpo.pool_matched_loss(l_pool, scores, cfg)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    single = align_cfg(objective="reward_matched", beta=3.0, reward_scale=2.0)
    explicit = torch.stack([easpo.preference_loss(l_pool[:, i], l_pool[:, j], scores[:, i], scores[:, j], single)
                            for i, j in pairs]).mean(dim=0)
    assert torch.allclose(loss, explicit, atol=1e-5)
    # k = 2: the paper's reward_matched on that one pair
    two = easpo.pool_matched_loss(l_pool[:, :2], scores[:, :2], cfg)
    assert torch.allclose(two, easpo.preference_loss(l_pool[:, 0], l_pool[:, 1], scores[:, 0], scores[:, 1], single))
    with pytest.raises(ValueError, match="pools"):
        easpo.pool_matched_loss(l_pool[:, :0], scores[:, :0], cfg)


def test_pool_matched_gradient_moves_every_candidates_log_ratio_toward_its_centred_score():
    cfg = align_cfg(threshold=0.0, sampler_steps=8, k=6, objective="pool_matched", lr=3e-3, beta=10.0)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    pairs = _pairs(learner.policy, cfg)
    target = (pairs.pool_scores - pairs.pool_scores.mean(dim=1, keepdim=True)) / cfg.reward_scale

    def residual() -> float:
        with torch.no_grad():
            l_pool = easpo.step_log_ratios(learner.policy, learner.reference, pairs, cfg.reduce).pool
        centred = cfg.beta * (l_pool - l_pool.mean(dim=1, keepdim=True))
        return float((centred - target).abs().mean()), float((centred * target).sum())

    before, agreement_before = residual()
    assert agreement_before == pytest.approx(0.0, abs=1e-6)  # policy = reference: every log-ratio is 0
    for _ in range(15):
        learner.update(pairs)
    after, agreement_after = residual()
    assert after < 0.7 * before and agreement_after > 0
    # the log-ratios of the whole pool come from one policy call per state, the winner's among them
    ratios = easpo.step_log_ratios(learner.policy, learner.reference, pairs, cfg.reduce)
    rows = torch.arange(len(pairs))
    assert torch.allclose(ratios.pool[rows, pairs.pool_scores.argmax(dim=1)], ratios.win, atol=1e-5)


def test_implicit_accuracy_on_fresh_pairs_rises_only_when_the_preference_carries_across_states():
    from rlhf_tts.training.align import fresh_pair_accuracy, history_row

    def noise_reward(request: ScoreRequest) -> ScoreResult:  # a winner that no direction of the state predicts
        return ScoreResult(torch.randn(len(request), generator=torch.Generator().manual_seed(int(1e6 * request.t[0]))))

    readings = {}
    for name, reward in (("energy", emotion_energy_reward), ("noise", noise_reward)):
        cfg = align_cfg(threshold=0.0, sampler_steps=8, objective="reward_matched", lr=3e-3)
        learner = easpo.EASPOLearner(tiny_model(), cfg)
        history = []
        for seed in range(30):
            generator = torch.Generator().manual_seed(seed)
            pairs = easpo.rollout(learner.policy, text_batch(3, 9), cfg, reward, generator).batch
            # (with autograd on, as the learner reads it: the no-grad kernels round differently, ~1e-8)
            l_w, l_l = easpo.pair_log_ratios(learner.policy, learner.reference, pairs, cfg.reduce)
            before = easpo.implicit_accuracy(l_w, l_l)
            history.append(history_row(learner.update(pairs), 1.0))
            assert history[-1]["implicit_accuracy"] == pytest.approx(before, abs=1e-6)  # read before the step
        readings[name] = fresh_pair_accuracy(history)
        assert readings[name]["updates"] == 15 and readings[name]["pairs"] == sum(r["pairs"] for r in history[15:])
    # The mean-level reward is one direction for every state: what the policy learned ranks new pairs' winners
    # (slowly: each pair's winner differs from its loser mostly by noise the reward does not see).
    assert readings["energy"]["value"] > 0.6
    # A winner drawn by coin: the policy moves (it is trained), but nothing it learned carries to a new state.
    assert 0.4 < readings["noise"]["value"] < 0.6
    assert easpo.implicit_accuracy(torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.zeros(4)) == 0.625  # tie: a half


def test_spo_dpo_gradient_raises_margin_and_clipping_bounds_the_ratio():
    cfg = align_cfg(threshold=0.0, sampler_steps=8, objective="spo_dpo", lr=1e-3, clip_eps=0.1)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    pairs = _pairs(learner.policy, cfg)
    for _ in range(3):
        learner.update(pairs)
    l_w, l_l = _margin(learner, pairs, cfg)
    assert float((l_w - l_l).mean()) > 0
    wide = torch.linspace(-3, 3, 101)
    ratio = easpo.clipped_log_ratio(wide, 0.1).exp()
    assert float(ratio.min()) >= 0.9 - 1e-6 and float(ratio.max()) <= 1.1 + 1e-6
    # outside the clip range the objective gives no gradient (the ratio is held at its bound)
    l = torch.tensor([2.0, -2.0], requires_grad=True)
    easpo.preference_loss(l[:1], l[1:], torch.ones(1), torch.zeros(1), cfg).sum().backward()
    assert torch.equal(l.grad, torch.zeros(2))


def test_learner_trains_only_the_decoder_and_reference_stays_frozen():
    cfg = align_cfg(threshold=0.0, sampler_steps=8, lr=1e-3)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    encoder_before = {k: v.clone() for k, v in learner.policy.encoder.state_dict().items()}
    ref_before = {k: v.clone() for k, v in learner.reference.state_dict().items()}
    learner.update(_pairs(learner.policy, cfg))
    assert all(torch.equal(v, learner.policy.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert all(torch.equal(v, learner.reference.state_dict()[k]) for k, v in ref_before.items())
    assert any(not torch.equal(v, learner.reference.decoder.state_dict()[k])
               for k, v in learner.policy.decoder.state_dict().items())
    assert learner.version == 1 and learner.updates == 1


def test_log_ratio_reduce_sum_is_mean_times_elements():
    cfg = align_cfg(threshold=0.0, sampler_steps=8, lr=1e-3)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    pairs = _pairs(learner.policy, cfg)
    learner.update(pairs)
    mean_w, _ = easpo.pair_log_ratios(learner.policy, learner.reference, pairs, "mean")
    sum_w, _ = easpo.pair_log_ratios(learner.policy, learner.reference, pairs, "sum")
    n = pairs.mask.sum(dim=(1, 2)) * pairs.x_t.shape[1]
    assert torch.allclose(sum_w, mean_w * n, rtol=1e-4)


def test_staleness_bound():
    assert not easpo.is_stale(3, 5, 2) and easpo.is_stale(2, 5, 2) and not easpo.is_stale(5, 5, 0)


def test_batched_requests_split_back_in_order():
    g = torch.Generator().manual_seed(0)
    requests = [ScoreRequest(torch.randn(n, 4, length, generator=g), torch.ones(n, 1, length), torch.full((n,), 0.3),
                             torch.zeros(n, dtype=torch.long)) for n, length in ((2, 5), (3, 8), (1, 4))]
    merged, sizes = concat_requests(requests)
    assert merged.states.shape == (6, 4, 8) and sizes == [2, 3, 1]
    parts = split_result(emotion_energy_reward(merged), sizes)
    for request, part in zip(requests, parts):
        assert torch.allclose(part.scores, emotion_energy_reward(request).scores, atol=1e-6)


def test_crop_pairs_cuts_one_window_inside_each_utterance():
    cfg = align_cfg(threshold=0.0, sampler_steps=8)
    pairs = _pairs(tiny_model(), cfg)
    frames = 8
    assert pairs.x_t.shape[-1] > frames
    cropped = easpo.crop_pairs(pairs, frames, torch.Generator().manual_seed(0))
    again = easpo.crop_pairs(pairs, frames, torch.Generator().manual_seed(0))
    assert torch.equal(cropped.x_win, again.x_win)  # deterministic under the generator
    assert cropped.x_t.shape[-1] == frames and len(cropped) == len(pairs)
    for i in range(len(pairs)):
        window = cropped.x_win[i]
        # the window is a contiguous piece of the pair's own winner, inside its valid frames
        full = pairs.x_win[i]
        starts = [s for s in range(full.shape[-1] - frames + 1) if torch.equal(full[:, s:s + frames], window)]
        assert starts, i
        valid = int(pairs.mask[i].sum())
        assert starts[0] + int(cropped.mask[i].sum()) <= valid
        assert torch.equal(cropped.t[i], pairs.t[i]) and torch.equal(cropped.x_t[i], pairs.x_t[i, :, starts[0]:starts[0] + frames])


def test_crop_pairs_cuts_every_candidate_of_a_pool_at_its_pairs_window():
    cfg = align_cfg(threshold=0.0, sampler_steps=8, k=3, objective="pool_matched")
    pairs = _pairs(tiny_model(), cfg)
    cropped = easpo.crop_pairs(pairs, 8, torch.Generator().manual_seed(0))
    assert cropped.pool.shape == (len(pairs), 3, pairs.x_t.shape[1], 8)
    rows = torch.arange(len(pairs))
    assert torch.equal(cropped.pool[rows, pairs.pool_scores.argmax(dim=1)], cropped.x_win)
    assert torch.equal(cropped.pool[rows, pairs.pool_scores.argmin(dim=1)], cropped.x_lose)


def test_learner_on_cropped_pairs_starts_at_zero_log_ratio_and_moves_the_margin():
    cfg = align_cfg(threshold=0.0, sampler_steps=8, objective="reward_matched", lr=3e-3, learner_crop_frames=8)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    pairs = _pairs(learner.policy, cfg)
    window = easpo.crop_pairs(pairs, 8, torch.Generator().manual_seed(0))
    l_w, l_l = _margin(learner, window, cfg)
    assert torch.allclose(l_w, torch.zeros_like(l_w)) and torch.allclose(l_l, torch.zeros_like(l_l))
    for _ in range(15):
        learner.update(pairs, torch.Generator().manual_seed(0))  # the same window every time
    l_w, l_l = _margin(learner, window, cfg)
    assert float((l_w - l_l).mean()) > 0


def test_placement_bundles_carry_each_actors_resources():
    from actors.orchestrator import bundles

    cfg = load_config(None, ["preset=smoke", "distributed.num_rollout_actors=2", "distributed.rollout_num_gpus=0.5",
                             "distributed.learner_num_gpus=1", "distributed.rollout_resources={rollout_node: 1}",
                             "distributed.learner_resources={learner_node: 1}",
                             "distributed.reward_resources={reward_node: 1}"])
    learner, reward, *rollouts = bundles(cfg, gpus_available=True)
    assert learner == {"CPU": cfg.distributed.learner_num_cpus, "GPU": 1.0, "learner_node": 1.0}
    assert reward == {"CPU": cfg.distributed.reward_num_cpus, "reward_node": 1.0}
    assert rollouts == [{"CPU": 1.0, "GPU": 0.5, "rollout_node": 1.0}] * 2
    cpu_only = bundles(cfg, gpus_available=False)  # a CPU machine: GPU requests are dropped, not unschedulable
    assert all("GPU" not in b for b in cpu_only)


def test_windowed_candidates_differ_only_inside_their_window_and_are_still_the_policys_draws():
    g = torch.Generator().manual_seed(0)
    mean, variance = torch.randn(3, 4, 32, generator=g), torch.tensor(0.25)
    starts = torch.tensor([0, 5, 24])
    draws = easpo.windowed_candidates(mean, variance, 6, starts, 8, g)
    assert draws.shape == (6, 3, 4, 32)
    for b, s in enumerate(starts.tolist()):
        outside = torch.ones(32, dtype=torch.bool)
        outside[s:s + 8] = False
        assert torch.equal(draws[:, b][..., outside], draws[:1, b][..., outside].expand(6, -1, -1))  # common noise
        inside = draws[:, b, :, s:s + 8]
        assert bool((inside[0] != inside[1]).all())  # independent inside
    many = easpo.windowed_candidates(torch.zeros(1, 8, 16), torch.tensor(4.0), 4000, torch.tensor([4]), 8, g)
    assert float(many[:, 0, :, 4:12].mean()) == pytest.approx(0.0, abs=0.02)
    assert float(many[:, 0, :, 4:12].std()) == pytest.approx(2.0, rel=0.02)  # N(mean, variance) per element
    assert float(many[:, 0, :, :4].std(dim=0).max()) == 0.0  # shared outside the window


def test_candidate_window_pairs_differ_only_in_their_window_and_are_cut_there():
    with pytest.raises(ValueError, match="learner_crop_frames"):
        align_cfg(candidate_window=True)
    cfg = align_cfg(threshold=0.0, sampler_steps=8, k=4, objective="pool_matched", candidate_window=True,
                    learner_crop_frames=8, reduce="sum", lr=3e-3)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    pairs = _pairs(learner.policy, cfg)
    assert len(pairs) and pairs.x_t.shape[-1] > 8 and bool((pairs.window_start >= 0).all())
    lengths = pairs.mask.sum(dim=(1, 2)).long()
    assert bool((pairs.window_start + 8 <= lengths.clamp_min(8)).all())  # inside the valid frames
    for i, s in enumerate(pairs.window_start.tolist()):
        outside = torch.ones(pairs.x_t.shape[-1], dtype=torch.bool)
        outside[s:s + 8] = False
        assert torch.equal(pairs.x_win[i][..., outside], pairs.x_lose[i][..., outside])
    cropped = easpo.crop_pairs(pairs, 8, torch.Generator().manual_seed(123))  # the generator is not consulted
    for i, s in enumerate(pairs.window_start.tolist()):
        assert torch.equal(cropped.pool[i], pairs.pool[i, ..., s:s + 8])
    # Any two means: the candidates' log-ratio differences live in the window's frames alone
    from rlhf_tts.models.gradtts import diffusion

    g = torch.Generator().manual_seed(1)
    mean, ref_mean = torch.randn(pairs.x_t.shape, generator=g), torch.randn(pairs.x_t.shape, generator=g)
    in_window = torch.zeros_like(pairs.mask)
    for i, s in enumerate(pairs.window_start.tolist()):
        in_window[i, :, s:s + 8] = pairs.mask[i, :, s:s + 8]

    def ratios(mask):  # in float64: sums of ~10^3 cancel in the differences, past float32's precision on some CPUs
        return torch.stack([diffusion.gaussian_log_ratio(pairs.pool[:, j].double(), mean.double(), ref_mean.double(),
                                                         0.3, mask.double(), "sum") for j in range(4)], dim=1)

    whole, window = ratios(pairs.mask), ratios(in_window)
    assert not torch.allclose(whole, window)  # the log-ratios themselves differ …
    assert torch.allclose(whole - whole[:, :1], window - window[:, :1], atol=1e-3)  # … their differences do not


def test_shared_level_candidates_differ_in_no_overall_level_and_are_still_exact_draws():
    with pytest.raises(ValueError, match="candidate_level"):
        align_cfg(candidate_level="shared", learner_crop_frames=8)
    g = torch.Generator().manual_seed(0)
    draws = easpo.windowed_candidates(torch.zeros(2, 8, 16), torch.tensor(1.0), 500, torch.tensor([0, 8]), 8, g, "shared")
    for b, s in enumerate((0, 8)):
        window = draws[:, b, :, s:s + 8]
        levels = window.mean(dim=(1, 2))
        assert float((levels - levels[0]).abs().max()) < 1e-6  # one level for the whole pool
        assert float(window.std()) == pytest.approx(1.0, rel=0.03)  # the other directions as before
        assert float((window[0] - window[1]).abs().max()) > 0.5  # candidates still differ inside
    # across pools the shared level has the variance of a mean of 64 unit draws: exact N(mean, variance) draws
    levels = torch.stack([easpo.windowed_candidates(torch.zeros(1, 8, 16), torch.tensor(1.0), 2, torch.tensor([4]), 8,
                                                    g, "shared")[0, 0, :, 4:12].mean() for _ in range(3000)])
    assert float(levels.var()) == pytest.approx(1 / 64, rel=0.1)
    own = torch.stack([easpo.windowed_candidates(torch.zeros(1, 8, 16), torch.tensor(1.0), 2, torch.tensor([4]), 8,
                                                 g)[:, 0, :, 4:12].mean(dim=(1, 2)) for _ in range(300)])
    assert float((own[:, 0] - own[:, 1]).abs().mean()) > 0.05  # without it, the candidates' levels differ


def test_band_level_candidates_share_every_bands_window_mean_and_are_still_exact_draws():
    align_cfg(candidate_level="band", candidate_window=True, learner_crop_frames=8)
    with pytest.raises(ValueError, match="candidate_level: band"):
        align_cfg(candidate_level="band", learner_crop_frames=8)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 8, 16, generator=g)
    draws = easpo.windowed_candidates(mean, torch.tensor(4.0), 400, torch.tensor([0, 8]), 8, g, "band")
    for b, s in enumerate((0, 8)):
        window = draws[:, b, :, s:s + 8]
        bands = window.mean(dim=-1)  # (k, n_feats)
        assert float((bands - bands[:1]).abs().max()) < 1e-5  # one mean per band for the whole pool
        assert float((bands[0] - bands[0].mean()).abs().max()) > 0.1  # … which differ between bands (a tilt)
        assert float((window - mean[b, :, s:s + 8]).std()) == pytest.approx(2.0, rel=0.03)
        assert float((window[0] - window[1]).abs().max()) > 0.5
        outside = torch.cat([draws[:, b, :, :s], draws[:, b, :, s + 8:]], dim=-1)
        assert torch.equal(outside, outside[:1].expand_as(outside))  # shared outside the window, as before
    # each band's shared mean is an exact draw: the variance of a mean of 8 frames of variance 4
    band_means = torch.stack([easpo.windowed_candidates(torch.zeros(1, 8, 16), torch.tensor(4.0), 2, torch.tensor([4]),
                                                        8, g, "band")[0, 0, :, 4:12].mean(dim=-1) for _ in range(2000)])
    assert float(band_means.var(dim=0).mean()) == pytest.approx(4 / 8, rel=0.1)
    assert float(band_means[:, 0].mul(band_means[:, 1]).mean()) == pytest.approx(0.0, abs=0.05)  # bands independent


def test_mirrored_candidates_pair_each_window_noise_with_its_negation_and_are_still_exact_draws():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 8, 16, generator=g)
    for level in ("own", "band"):
        draws = easpo.windowed_candidates(mean, torch.tensor(4.0), 400, torch.tensor([0, 8]), 8, g, level, mirrored=True)
        for b, s in enumerate((0, 8)):
            window = draws[:, b, :, s:s + 8] - mean[b, :, s:s + 8]
            centre = window.mean(dim=-1, keepdim=True) if level == "band" else torch.zeros(())
            deviation = window - centre  # band: the shared band means are common, not mirrored
            if level == "band":  # … so the whole pool keeps one mean per band (a mirrored level would rank by level)
                assert float((centre - centre[:1]).abs().max()) < 1e-5
            assert torch.allclose(deviation[:200], -deviation[200:], atol=1e-5)
            # the deviations keep an exact draw's spread: variance 4, less a band mean's 4 / 8 under band
            assert float(deviation.pow(2).mean()) == pytest.approx(4.0 * (7 / 8 if level == "band" else 1), rel=0.05)
            assert float((window[0] - window[1]).abs().max()) > 0.5  # two draws, not one and its copy
            outside = torch.cat([draws[:, b, :, :s], draws[:, b, :, s + 8:]], dim=-1)
            assert torch.equal(outside, outside[:1].expand_as(outside))
    # marginally each candidate is an exact draw: the second half's window has the first half's variance
    second = torch.stack([easpo.windowed_candidates(torch.zeros(1, 8, 16), torch.tensor(4.0), 2, torch.tensor([4]),
                                                    8, g, "band", mirrored=True)[1, 0, :, 4:12] for _ in range(2000)])
    assert float(second.var(dim=0).mean()) == pytest.approx(4.0, rel=0.05)
    assert float(second.mean(dim=-1).var(dim=0).mean()) == pytest.approx(4 / 8, rel=0.1)
    with pytest.raises(ValueError, match="even k"):
        easpo.windowed_candidates(mean, torch.tensor(4.0), 3, torch.tensor([0, 8]), 8, g, mirrored=True)


def test_pool_gradient_estimate_is_unbiased_and_as_noisy_as_the_count_of_candidates_against_dimensions():
    g = torch.Generator().manual_seed(0)
    d, k, var = 400, 16, torch.tensor(0.25)
    direction = torch.randn(d, generator=g)
    mean = torch.randn(d, generator=g)

    def pool_estimate() -> torch.Tensor:
        pool = mean + var.sqrt() * torch.randn(k, d, generator=g)
        return easpo.pool_gradient_estimate(pool, mean, var, pool @ direction)  # a linear reward: gradient = direction

    estimates = torch.stack([pool_estimate() for _ in range(600)])
    cos = torch.nn.functional.cosine_similarity(estimates, direction.expand_as(estimates), dim=1)
    assert float(cos.mean()) == pytest.approx((k / (k + d)) ** 0.5, rel=0.1)  # one pool: mostly noise
    average = estimates.mean(dim=0)  # many pools: the gradient itself, at its own scale (unbiased)
    assert float(torch.nn.functional.cosine_similarity(average, direction, dim=0)) > 0.95
    assert float(average @ direction / direction.pow(2).sum()) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="k >= 2"):
        easpo.pool_gradient_estimate(mean[None], mean, var, torch.zeros(1))


def test_a_candidate_window_smaller_than_the_crop_lies_inside_the_learners_cut():
    with pytest.raises(ValueError, match="must fit in the learner's crop"):
        align_cfg(candidate_window=True, learner_crop_frames=8, candidate_window_frames=12)
    with pytest.raises(ValueError, match="needs candidate_window"):
        align_cfg(learner_crop_frames=8, candidate_window_frames=4)
    cfg = align_cfg(threshold=0.0, sampler_steps=8, k=4, objective="pool_matched", candidate_window=True,
                    learner_crop_frames=8, candidate_window_frames=3, lr=3e-3)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    pairs = _pairs(learner.policy, cfg)
    assert len(pairs) and pairs.x_t.shape[-1] > 8
    for i, s in enumerate(pairs.window_start.tolist()):  # the candidates differ in 3 frames only
        differ = (pairs.pool[i] != pairs.pool[i, :1]).flatten(0, 1).any(dim=0)
        assert differ[s:s + 3].all() and int(differ.sum()) == 3
    offsets = set()
    for seed in range(20):
        cropped = easpo.crop_pairs(pairs, 8, torch.Generator().manual_seed(seed), easpo.candidate_frames(cfg, 8))
        assert cropped.pool.shape[-1] == 8
        for i, s in enumerate(pairs.window_start.tolist()):
            differ = (cropped.pool[i] != cropped.pool[i, :1]).flatten(0, 1).any(dim=0)
            assert int(differ.sum()) == 3  # the whole candidate window is inside the cut …
            start = int(differ.nonzero()[0])
            offsets.add(start)
            # … and the cut is the utterance's own frames around it
            assert torch.equal(cropped.x_t[i], pairs.x_t[i, :, s - start:s - start + 8])
            assert s - start + int(cropped.mask[i].sum()) <= int(pairs.mask[i].sum())
    assert len(offsets) > 3  # placed at random offsets, not always at the cut's edge
    stats = learner.update(pairs, torch.Generator().manual_seed(0))
    assert stats["loss"] > 0 and stats["pairs"] == len(pairs)


def test_ode_plain_steps_bring_the_rollout_to_its_first_preference_step_as_the_evaluations_sampler_does():
    model = tiny_model()
    text = text_batch(3, 9)
    reached = {}
    for plain in ("ode", "stochastic"):
        cfg = align_cfg(threshold=0.0, sampler_steps=8, t_range=[0.0, 0.3], plain_steps=plain)
        pairs = easpo.rollout(model, text, cfg, emotion_energy_reward, torch.Generator().manual_seed(5)).batch
        first = int(pairs.step.min())
        assert first == 6  # t = 0.1875, the first midpoint at or under 0.3
        reached[plain] = pairs.x_t[pairs.step == first]
    # the evaluation's sampler: X_1 from the same generator, then six probability-flow steps
    with torch.no_grad():
        prior = model.encode(text)
        x = model.initial_state(prior, cfg.temperature, torch.Generator().manual_seed(5))
        for i in range(6):
            x = model.ode_step(x, 1.0 - (i + 0.5) / 8, 1.0 / 8, prior)
    assert torch.allclose(reached["ode"], x, rtol=1e-4, atol=1e-3)  # an untrained model's states are large
    # the paper's rollout gets there by the SDE
    assert not torch.allclose(reached["stochastic"], x, rtol=1e-2, atol=1e-1)


def _ratios_after_updates(updates: int = 10, **overrides) -> tuple[easpo.StepLogRatios, dict[str, float]]:
    """A tiny learner's log-ratios on one batch after `updates` steps on it, and the last step's stats."""
    cfg = align_cfg(threshold=0.0, sampler_steps=8, objective="reward_matched", lr=3e-3, **overrides)
    learner = easpo.EASPOLearner(tiny_model(), cfg)
    pairs = _pairs(learner.policy, cfg)
    for _ in range(updates):
        stats = learner.update(pairs, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return easpo.step_log_ratios(learner.policy, learner.reference, pairs, cfg.reduce), stats


def test_band_level_kl_is_the_kl_along_band_means_and_the_anchor_holds_the_decoders_level():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 4, 10, generator=g)
    mask = torch.ones(2, 1, 10)
    mask[1, :, 6:] = 0
    shift = torch.tensor([0.3, -0.2, 0.0, 0.1])
    wiggle = torch.randn(2, 4, 10, generator=g)
    wiggle = wiggle - (wiggle * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)  # no band mean of its own
    kl = easpo.band_level_kl(ref + shift[None, :, None] + wiggle, ref, 0.5, mask, "sum")
    expected = torch.tensor([10.0, 6.0]) * float(shift.pow(2).sum()) / (2 * 0.5)
    assert torch.allclose(kl, expected, rtol=1e-4)
    assert torch.allclose(easpo.band_level_kl(ref + wiggle, ref, 0.5, mask, "sum"), torch.zeros(2), atol=1e-6)
    assert torch.allclose(easpo.band_level_kl(ref + shift[None, :, None], ref, 0.5, mask, "mean"),
                          expected / (torch.tensor([10.0, 6.0]) * 4), rtol=1e-4)
    # in the learner: the same updates with a large anchor leave the step's band means nearer the reference's
    drift = {}
    for anchor in (0.0, 1e3):
        ratios, stats = _ratios_after_updates(level_anchor=anchor)
        drift[anchor] = float(ratios.band_kl.mean())
        assert "band_kl" in stats
    assert drift[1e3] < 0.5 * drift[0.0]


def test_prior_level_gap_is_the_clean_estimates_band_level_against_mu_and_the_target_closes_it():
    from rlhf_tts.models.gradtts import diffusion

    g = torch.Generator().manual_seed(1)
    mu = torch.randn(2, 4, 10, generator=g)
    mask = torch.ones(2, 1, 10)
    mask[1, :, 7:] = 0
    t = torch.tensor([0.1, 0.3])
    x0 = mu + torch.tensor([0.5, -0.3, 0.0, 0.2])[None, :, None] + 0.1 * torch.randn(2, 4, 10, generator=g)
    noise = torch.randn(2, 4, 10, generator=g)
    x_t = diffusion.diffuse(x0, mu, t, noise, 0.05, 20.0)
    variance = 1.0 - torch.exp(-diffusion.cumulative_beta(t, 0.05, 20.0)).reshape(-1, 1, 1)
    exact_score = -noise / variance.sqrt()  # the score that recovers x0 exactly from this x_t
    gap = easpo.prior_level_gap(x_t, mu, exact_score, t, mask, 0.05, 20.0)
    expected = torch.stack([(x0 - mu)[0].mean(-1), (x0 - mu)[1, :, :7].mean(-1)])
    assert torch.allclose(gap, expected, atol=1e-4)
    # in the learner: the same updates with a large target leave the clean estimate's level nearer mu's
    gaps = {}
    for weight in (0.0, 30.0):
        ratios, stats = _ratios_after_updates(level_target=weight)
        gaps[weight] = float(easpo.level_target_penalty(ratios).mean())
        assert "level_gap" in stats
    # on an untrained network most of the gap sits in x_t itself, which no score can move: the part the score
    # controls falls by about 4.6 units in these 10 updates with the target, and does not move without it
    assert gaps[30.0] < gaps[0.0] - 2.0
