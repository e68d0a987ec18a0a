"""EASPM: time-FiLM starts untimed, scores ignore padding and batching, losses learn, the stage
writes its checkpoint and accuracy-vs-t curve and resumes exactly."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import smoke_config
from rlhf_tts.config import EASPMConfig, load_config
from rlhf_tts.models.easpm import EASPM, PromptTokenizer, default_prompt, paraphrases, prompt_vocabulary
from rlhf_tts.rewards.base import ScoreRequest, concat_requests, split_result
from rlhf_tts.rewards.easpm_reward import EASPMReward
from rlhf_tts.training.easpm import (
    NoisedItem, accuracy_curve, easpm_losses, easpm_location, sample_pairs, shared_timing_accuracy, train_easpm,
    warp_to_durations,
)

SMALL = EASPMConfig(dim=32, layers=2, heads=2, time_dim=16, text_dim=16, text_heads=2, embed_dim=16,
                    batch_pairs=8, max_frames=48, dropout=0.0)


def _model(seed: int = 0, cfg: EASPMConfig = SMALL) -> EASPM:
    torch.manual_seed(seed)
    return EASPM(cfg, n_feats=20)


def _states(lengths: list[int], n_feats: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    states = torch.randn(len(lengths), n_feats, width, generator=g)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).unsqueeze(1).float()
    return states, mask


# ---------------------------------------------------------------------------------------- model

def test_time_modulation_is_zero_initialised_and_then_used():
    model = _model().eval()
    states, mask = _states([40, 33, 17])
    prompts = ["a happy voice", "an angry voice", "a sad voice"]
    reference = model.score(prompts, states, mask, torch.zeros(3))
    for t in (torch.full((3,), 0.37), torch.ones(3), torch.tensor([0.1, 0.9, 0.5])):
        assert torch.equal(model.score(prompts, states, mask, t), reference)
    # Once the modulation is not zero, t changes the score: the time path is wired in.
    with torch.no_grad():
        for block in model.audio.blocks:
            block.modulation.weight.normal_(0, 0.5)
    assert not torch.allclose(model.score(prompts, states, mask, torch.zeros(3)),
                              model.score(prompts, states, mask, torch.full((3,), 0.8)), atol=1e-4)


def test_score_ignores_padding_and_batch_composition():
    model = _model().eval()
    lengths = [31, 48, 9, 22]
    states, mask = _states(lengths)
    states = states + 5.0 * (1 - mask)  # garbage in the padding must not matter
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    prompts = ["a happy voice", "some utterly unknown words", "an angry voice", "a sad voice"]
    batched = model.score(prompts, states, mask, t)
    for i, n in enumerate(lengths):
        alone = model.score([prompts[i]], states[i : i + 1, :, :n], mask[i : i + 1, :, :n], t[i : i + 1])
        assert torch.allclose(alone, batched[i : i + 1], atol=1e-5), (i, alone, batched[i])
    # Through the reward interface: concatenated requests score exactly as separate ones.
    reward = EASPMReward(model)
    r1 = ScoreRequest(states[:2, :, :48], mask[:2, :, :48], t[:2], torch.tensor([2, 1]))
    r2 = ScoreRequest(states[2:, :, :22] * mask[2:, :, :22], mask[2:, :, :22], t[2:], torch.tensor([1, 3]))
    merged, sizes = concat_requests([r1, r2])
    for part, request in zip(split_result(reward.score(merged), sizes), (r1, r2)):
        assert torch.allclose(part.scores, reward.score(request).scores, atol=1e-5)
    # Default prompts follow the emotion index; an explicit prompt list gives the same scores.
    explicit = ScoreRequest(r1.states, r1.mask, r1.t, r1.emotion, prompt=["a happy voice", "an angry voice"])
    assert torch.allclose(reward.score(explicit).scores, reward.score(r1).scores, atol=1e-6)


def test_level_invariant_scores_ignore_each_states_own_level_and_nothing_else():
    prompts = ["a happy voice", "an angry voice", "a sad voice"]
    lengths = [40, 25, 33]
    states, mask = _states(lengths, seed=3)
    t = torch.tensor([0.0, 0.4, 0.8])
    shift = torch.tensor([1.5, -2.0, 0.7]).reshape(-1, 1, 1)  # a different level offset per state
    for invariant in (False, True):
        model = _model(cfg=SMALL.model_copy(update={"level_invariant": invariant})).eval()
        with torch.no_grad():  # per-bin stats as a trained model has them: recentring must respect them
            model.set_normalisation(torch.linspace(-6.0, -2.0, 20), torch.linspace(1.0, 2.0, 20))
        before = model.score(prompts, states, mask, t)
        after = model.score(prompts, (states + shift) * mask, mask, t)
        assert torch.allclose(before, after, atol=1e-4) == invariant
        # Anything but a common offset still moves the score: a louder upper half of the bins.
        tilted = states.clone()
        tilted[:, 10:] += 1.0
        assert not torch.allclose(before, model.score(prompts, tilted * mask, mask, t), atol=1e-3)
    # Padding is outside the level: garbage there changes nothing.
    padded = states + 9.0 * (1 - mask)
    assert torch.allclose(model.score(prompts, padded, mask, t), before, atol=1e-5)


def test_level_sensitivity_reads_each_emotions_target_log_probability_per_offset():
    from types import SimpleNamespace

    from rlhf_tts.eval.reward_view import level_sensitivity

    states, _ = _states([30, 30, 30, 30], seed=5)
    emotions = ["Neutral", "Angry", "Sad", "Sad"]
    utterances = [SimpleNamespace(mel=states[i].numpy(), emotion=e) for i, e in enumerate(emotions)]
    for invariant in (False, True):
        model = EASPM(SMALL.model_copy(update={"level_invariant": invariant}), n_feats=20,
                      emotions=("Neutral", "Angry", "Happy", "Sad", "Surprise")).eval()
        result = level_sensitivity(model, utterances, offsets=(-1.0, 0.0, 2.0))
        prompts = model.embed_prompts(model.default_prompts())
        with torch.no_grad():  # offset 0, Sad: the mean of its two utterances' target log-probabilities, by hand
            audio = model.embed_audio(states[2:], torch.ones(2, 1, 30), 0.0)
            logp = torch.log_softmax(model.logits(audio, prompts), -1)
        assert result["log_prob"]["Sad"][1] == pytest.approx(float(logp[:, 3].mean()), abs=1e-5)
        assert np.isnan(result["log_prob"]["Happy"]).all() and [sum(r) for r in result["named"]] == [4, 4, 4]
        flat = np.allclose(result["log_prob"]["Sad"], result["log_prob"]["Sad"][1], atol=1e-4)
        assert flat == invariant  # a level-invariant EASPM cannot be moved by the level; the default can


def test_log_softmax_reward_is_the_target_emotions_log_probability_and_ignores_a_shift_of_every_prompt():
    model = _model().eval()
    states, mask = _states([20, 30, 25])
    t = torch.tensor([0.1, 0.5, 0.7])
    request = ScoreRequest(states, mask, t, torch.tensor([0, 3, 4]))
    raw = EASPMReward(model).score(request).scores
    logp = EASPMReward(model, form="log_softmax").score(request).scores
    with torch.no_grad():
        logits = model.logits(model.embed_audio(states, mask, t), model.embed_prompts(model.default_prompts()))
    expected = logits.log_softmax(1)[torch.arange(3), request.emotion]
    assert torch.allclose(logp, expected, atol=1e-5) and torch.allclose(raw, logits[torch.arange(3), request.emotion], atol=1e-5)
    # one state scored for each of the five emotions: probabilities that sum to one
    every = ScoreRequest(states[:1].expand(5, -1, -1), mask[:1].expand(5, -1, -1), t[:1].expand(5), torch.arange(5))
    probabilities = EASPMReward(model, form="log_softmax").score(every).scores.exp()
    assert abs(float(probabilities.sum()) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="form"):
        EASPMReward(model, form="probability")


def test_prompt_tokenizer_accepts_free_text():
    tokenizer = PromptTokenizer(prompt_vocabulary())
    assert tokenizer.ids("A HAPPY voice!") == tokenizer.ids("a happy voice")
    assert tokenizer.ids("a zyzzyva voice")[1] == 1  # unknown word → <unk>
    assert tokenizer.ids("") == [1] and tokenizer.ids("🎉") == [1]
    assert [default_prompt(e) for e in ("Neutral", "Angry", "Happy", "Sad", "Surprise")] == [
        "a neutral voice", "an angry voice", "a happy voice", "a sad voice", "a surprised voice"]
    assert len(set(paraphrases("Angry"))) >= 20 and all(1 not in tokenizer.ids(p) for p in paraphrases("Sad"))


def _durations(length: int, phonemes: int, g: torch.Generator) -> torch.Tensor:
    """Random frames per phoneme (each at least one) that add up to `length`."""
    cuts = torch.randperm(length - 1, generator=g)[: phonemes - 1].sort().values + 1
    edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([length])])
    return edges.diff()


def _synthetic_items(n_groups: int = 6, n_feats: int = 20, seed: int = 0) -> tuple[list[NoisedItem], list[list[int]]]:
    """Each emotion shifts a different band of bins: learnable, so the losses must fall."""
    g = torch.Generator().manual_seed(seed)
    items, groups = [], []
    for group in range(n_groups):
        members = []
        base = torch.randn(n_feats, 40, generator=g)
        for emotion in range(5):
            mel = base.clone()
            mel[4 * emotion : 4 * emotion + 4] += 1.5
            length = 30 + int(torch.randint(10, (1,), generator=g))
            members.append(len(items))
            items.append(NoisedItem(f"{group}_{emotion}", group % 2, emotion, 0, mel[:, :length], base[:, :length] * 0.5,
                                    _durations(length, 6, g)))
        groups.append(members)
    return items, groups


def test_infonce_and_bradley_terry_losses_decrease():
    items, groups = _synthetic_items()
    model = _model(1)
    cfg = SMALL.model_copy(update={"lr": 3e-3})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    prompts = [paraphrases(e)[0] for e in ("Neutral", "Angry", "Happy", "Sad", "Surprise")]
    fixed = sample_pairs(items, groups, cfg, 0.05, 20.0, torch.Generator().manual_seed(99))
    fixed.t = fixed.t * 0.3  # a low-noise evaluation batch
    with torch.no_grad():
        before = easpm_losses(model.eval(), fixed, prompts, cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = sample_pairs(items, groups, cfg, 0.05, 20.0, g)
        batch.t = batch.t * 0.3
        out = easpm_losses(model, batch, prompts, cfg)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        after = easpm_losses(model.eval(), fixed, prompts, cfg)
    assert float(after["infonce"]) < 0.7 * float(before["infonce"])
    assert float(after["bt"]) < 0.7 * float(before["bt"])
    assert float(after["pair_accuracy"]) >= 0.75


def test_pairs_share_noise_and_time():
    items, groups = _synthetic_items()
    # mel = mu for every item: then the two states of a pair differ only if their noise differs.
    same = [NoisedItem(i.utt_id, i.speaker, i.emotion, 0, i.mu.clone(), i.mu.clone(), i.durations) for i in items]
    own = SMALL.model_copy(update={"pair_timing": "own"})  # each state over its own mu (here == its mel)
    batch = sample_pairs(same, groups, own, 0.05, 20.0, torch.Generator().manual_seed(3))
    b = SMALL.batch_pairs
    assert torch.equal(batch.t[:b], batch.t[b:])
    assert (batch.target != batch.emotion[b:]).all()  # the other is another emotion of the same text
    assert torch.equal(batch.mask[:b], batch.mask[b:])  # cropped to one common length
    # Crops may start at different frames, so compare the noise: x_t - mean_t is sqrt(lambda) xi.
    from rlhf_tts.models.gradtts.diffusion import forward_marginal

    x0 = batch.prior.mu  # mel == mu here, so the state's mean is mu itself
    mean, var = forward_marginal(x0, x0, batch.t, 0.05, 20.0)
    noise = (batch.states - mean * batch.mask) / var.sqrt().clamp_min(1e-6)
    keep = batch.t[:b] > 0.05
    assert torch.allclose(noise[:b][keep] * batch.mask[:b][keep], noise[b:][keep] * batch.mask[b:][keep], atol=1e-4)


def test_resynthesis_augment_swaps_whole_pairs_for_their_round_trips_and_leaves_the_default_stream_alone():
    items, groups = _synthetic_items()
    # A "round trip" that is the mel plus a constant: a state built from it is told apart exactly.
    tripped = [replace(i, resynthesised=i.mel + 7.0) for i in items]
    cfg = SMALL.model_copy(update={"resynthesis_augment": 0.5, "batch_pairs": 64})
    batch = sample_pairs(tripped, groups, cfg, 0.05, 20.0, torch.Generator().manual_seed(5))
    b = cfg.batch_pairs
    clean = sample_pairs([replace(i, resynthesised=i.mel) for i in items], groups, cfg, 0.05, 20.0,
                         torch.Generator().manual_seed(5))  # the same draws; round trip == mel
    shift = ((batch.states - clean.states) * batch.mask).sum((1, 2)) / (batch.mask.sum((1, 2)) * batch.states.shape[1])
    from rlhf_tts.models.gradtts.diffusion import cumulative_beta

    rho = torch.exp(-0.5 * cumulative_beta(batch.t, 0.05, 20.0))  # x0's weight in x_t
    swapped = torch.isclose(shift, 7.0 * rho, atol=1e-3)
    assert (swapped | torch.isclose(shift, torch.zeros(()), atol=1e-4)).all()  # each state: round trip or mel
    assert torch.equal(swapped[:b], swapped[b:])  # a pair is swapped whole, never half
    assert 0.25 < float(swapped[:b].float().mean()) < 0.75  # about resynthesis_augment of the pairs
    # Off (the default): the generator's stream is what it was before the option existed.
    off = SMALL.model_copy(update={"resynthesis_augment": 0.0})
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    sample_pairs(tripped, groups, off, 0.05, 20.0, g1)
    sample_pairs(items, groups, off, 0.05, 20.0, g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    full = SMALL.model_copy(update={"resynthesis_augment": 1.0})
    with pytest.raises(ValueError, match="round trip"):  # asked for round trips that were never loaded
        sample_pairs(items, groups, full, 0.05, 20.0, torch.Generator().manual_seed(5))


def test_gain_augment_shifts_both_of_a_pair_by_one_level():
    from rlhf_tts.models.gradtts.diffusion import cumulative_beta

    items, groups = _synthetic_items()
    cfg = SMALL.model_copy(update={"gain_augment": 0.8, "batch_pairs": 32})
    batch = sample_pairs(items, groups, cfg, 0.05, 20.0, torch.Generator().manual_seed(4))
    b = cfg.batch_pairs
    # The gain is drawn after every other draw, so a gain-free batch from the same seed is the same
    # batch without the shift; x0 enters x_t with weight rho_t.
    rho = torch.exp(-0.5 * cumulative_beta(batch.t, 0.05, 20.0))
    plain = sample_pairs(items, groups, SMALL.model_copy(update={"batch_pairs": 32}), 0.05, 20.0,
                         torch.Generator().manual_seed(4))
    assert torch.equal(plain.t, batch.t) and torch.equal(plain.mask, batch.mask)  # the gain is drawn last
    shift = ((batch.states - plain.states) * batch.mask).sum((1, 2)) / (batch.mask.sum((1, 2)) * batch.states.shape[1])
    gain = shift / rho
    assert torch.allclose(gain[:b], gain[b:], atol=1e-4)  # one level per pair
    assert gain.abs().max() <= 0.8 + 1e-4 and gain[:b].std() > 0.2  # drawn in [-g, g], not constant


def test_warp_keeps_content_and_takes_the_target_timing():
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(4, 30, generator=g)
    durations = _durations(30, 5, g)
    assert torch.allclose(warp_to_durations(mel, durations, durations), mel, atol=1e-6)  # same timing: unchanged
    # A mel that is constant within each phoneme stays constant within each phoneme, at the new lengths.
    values = torch.randn(4, 5, generator=g)
    blocky = torch.repeat_interleave(values, durations, dim=1)
    target = torch.tensor([1, 7, 2, 9, 4])
    warped = warp_to_durations(blocky, durations, target)
    assert warped.shape == (4, int(target.sum()))
    assert torch.allclose(warped, torch.repeat_interleave(values, target, dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="phonemes"):
        warp_to_durations(mel, durations, target[:4])


def test_shared_timing_pairs_differ_only_in_content():
    items, groups = _synthetic_items()
    batch = sample_pairs(items, groups, SMALL, 0.05, 20.0, torch.Generator().manual_seed(4))
    b = SMALL.batch_pairs
    assert torch.equal(batch.prior.mu[:b], batch.prior.mu[b:])  # one mu, as EASPO's candidates share
    assert torch.equal(batch.mask[:b], batch.mask[b:]) and torch.equal(batch.t[:b], batch.t[b:])
    own = sample_pairs(items, groups, SMALL.model_copy(update={"pair_timing": "own"}), 0.05, 20.0,
                       torch.Generator().manual_seed(4))
    assert not torch.equal(own.prior.mu[:b], own.prior.mu[b:])  # each with its own prior


def test_shared_timing_accuracy_sees_content_and_ignores_timing():
    """Emotion only in the content: a trained model ranks re-timed pairs; emotion only in the timing
    (identical content): no model can, and the measure sits at chance."""
    items, groups = _synthetic_items()
    model = _model(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prompts = [paraphrases(e)[0] for e in ("Neutral", "Angry", "Happy", "Sad", "Surprise")]
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = sample_pairs(items, groups, SMALL, 0.05, 20.0, g)
        batch.t = batch.t * 0.3
        out = easpm_losses(model, batch, prompts, SMALL)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    model.eval()
    content = shared_timing_accuracy(model, items, groups, [0.0, 0.2], 0.05, 20.0, seed=0)
    assert min(content) >= 0.75, content
    # Emotion only in the timing: per group, one set of per-phoneme spectra laid out at each item's
    # durations. Re-timed to the target, every other is the target itself: ties, exactly chance.
    g = torch.Generator().manual_seed(1)
    timing_only = []
    for grp in groups:
        values = torch.randn(20, 6, generator=g)
        for k in grp:
            i = items[k]
            timing_only.append(NoisedItem(i.utt_id, i.speaker, i.emotion, 0,
                                          torch.repeat_interleave(values, i.durations, dim=1), i.mu, i.durations))
    chance = shared_timing_accuracy(model, timing_only, groups, [0.0, 0.5], 0.05, 20.0, seed=0)
    assert chance == [0.5, 0.5], chance


def test_accuracy_curve_counts_pairs():
    items, groups = _synthetic_items(3)
    model = _model(2).eval()
    curve = accuracy_curve(model, items, groups, [0.0, 1.0], 0.05, 20.0, seed=0)
    assert curve["n_pairs"] == 3 * 5 * 4 and curve["n_utterances"] == 15
    assert all(0.0 <= a <= 1.0 for a in curve["pair_accuracy"] + curve["retrieval_accuracy"])
    assert curve == accuracy_curve(model, items, groups, [0.0, 1.0], 0.05, 20.0, seed=0)  # deterministic


def test_config_validation():
    from rlhf_tts.config import ConfigError

    with pytest.raises(ConfigError, match="easpm.t_grid"):
        load_config(None, ["easpm.t_grid=[0.5,1.5]"])
    with pytest.raises(ConfigError, match="easpm.input"):
        load_config(None, ["easpm.input=clean"])
    assert load_config(None, ["preset=smoke", "stages=[easpm]"]).stages == ["easpm"]


# ---------------------------------------------------------------------------------------- stage

class Recorder:
    def __init__(self) -> None:
        self.metrics: dict = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(f"{artifact_path}/{Path(path).name}")


@pytest.fixture(scope="module")
def smoke_base(smoke_dataset):
    """A smoke base model in the session's smoke cache (data + pretrain)."""
    from rlhf_tts.training.pretrain import run_pretraining

    cfg, dataset = smoke_dataset
    run_pretraining(cfg, dataset.directory)
    return Path(cfg.cache_dir)


def _cfg(shared_cache: Path, tmp: Path, *extra: str):
    """A config whose cache shares the corpus, dataset and base model but has its own easpm runs."""
    cache = tmp / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("corpus", "data", "pretrain"):
        if (shared_cache / name).exists() and not (cache / name).exists():
            (cache / name).symlink_to(shared_cache / name)
    return smoke_config(tmp, *extra)


@pytest.mark.slow
def test_stage_writes_checkpoint_curve_and_resumes_exactly(smoke_base, tmp_path):
    from rlhf_tts.training.easpm import run_easpm_stage

    straight = Recorder()
    cfg_a = _cfg(smoke_base, tmp_path / "a")
    console = Console(file=io.StringIO(), width=120)
    summary = run_easpm_stage(cfg_a, console, straight)
    text = console.file.getvalue()
    location = easpm_location(cfg_a)
    assert (location.final / "tensors.safetensors").is_file() and (location.final / "state.json").is_file()
    curve = json.loads((Path(cfg_a.output_dir) / "easpm_curve.json").read_text())
    assert curve["t"] == [0.0, 0.5, 1.0] and len(curve["pair_accuracy"]) == 3 and curve["n_pairs"] > 0
    assert (Path(cfg_a.output_dir) / "easpm_curve.png").stat().st_size > 0
    assert "pair acc" in text and "easpm/easpm_curve.json" in straight.artifacts
    assert straight.metrics[500]["easpm/curve_pair_accuracy"] == curve["pair_accuracy"][1]
    assert summary["easpm"] == str(location.final)

    # Interrupted after step 5 (last checkpoint: step 4), then resumed: the same losses from step 5.
    cfg_b = _cfg(smoke_base, tmp_path / "b")
    interrupted = Recorder()
    train_easpm(cfg_b, tracker=interrupted, stop_after=5)
    assert not easpm_location(cfg_b).exists()
    resumed = Recorder()
    _, curve_b = train_easpm(cfg_b, resume=True, tracker=resumed)
    losses = lambda rec, steps: [rec.metrics[s]["easpm/loss"] for s in steps]  # noqa: E731
    assert losses(interrupted, range(1, 6)) == losses(straight, range(1, 6))
    assert losses(resumed, range(5, 9)) == losses(straight, range(5, 9))  # bit-identical
    a = load_file(str(location.final / "tensors.safetensors"))
    b = load_file(str(easpm_location(cfg_b).final / "tensors.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model/"))
    assert curve_b["pair_accuracy"] == curve["pair_accuracy"]

    # A finished run is reused; the reward loads it and scores batches.
    reward = EASPMReward.from_config(cfg_a)
    states, mask = _states([30, 20], n_feats=80)
    result = reward.score(ScoreRequest(states, mask, torch.tensor([0.2, 0.6]), torch.tensor([0, 4])))
    assert result.scores.shape == (2,) and torch.isfinite(result.scores).all()
    again = Recorder()
    _, cached = train_easpm(cfg_a, tracker=again)
    assert cached["pair_accuracy"] == curve["pair_accuracy"] and not again.metrics



@pytest.mark.slow
def test_reward_view_reports_easpm_along_each_models_sampling_path(smoke_base, tmp_path, capsys):
    from rlhf_tts.eval.reward_view import main
    from rlhf_tts.training.easpm import run_easpm_stage
    from rlhf_tts.training.pretrain import base_model_location

    from rlhf_tts.eval.judges.emotion import train_emotion_judge

    cfg = _cfg(smoke_base, tmp_path)
    run_easpm_stage(cfg, Console(file=io.StringIO()), Recorder())
    base = str(base_model_location(cfg).directory)
    args = [f"output_dir={cfg.output_dir}", f"cache_dir={cfg.cache_dir}", "preset=smoke", "tracking.enabled=false"]
    assert main(["--model", f"base={base}", "--split", "train", "--max-utts", "6", "--steps", "4", "--judge", *args]) == 2
    train_emotion_judge(cfg)
    assert main(["--model", f"base={base}", "--model", f"again={base}", "--split", "train", "--max-utts", "6",
                 "--steps", "4", "--judge", *args]) == 0
    result = json.loads((Path(cfg.output_dir) / "reward_view.json").read_text())
    views = result["models"]
    assert list(views["base"]["by_t"]) == ["1.00", "0.75", "0.50", "0.25", "0.00"]
    assert views["base"]["by_t"] == views["again"]["by_t"]  # same weights, same seed: the same path
    for row in views["base"]["by_t"].values():
        assert row["n"] == 6 and 0.0 <= row["accuracy"] <= 1.0 and row["log_prob"] <= 0.0
        # The per-emotion rows split the same utterances: counts add up and their weighted means are the overall.
        parts = row["by_emotion"].values()
        assert sum(p["n"] for p in parts) == 6
        for key in ("accuracy", "log_prob", "score"):
            assert sum(p[key] * p["n"] for p in parts) / 6 == pytest.approx(row[key], abs=1e-5)
    # The judge's side, on the same final outputs: EASPM's t = 0 names are the ones counted above.
    judged = views["base"]["judge"]
    assert judged == views["again"]["judge"] and judged["n"] == 6
    assert judged["easpm_accuracy"] == pytest.approx(views["base"]["by_t"]["0.00"]["accuracy"])
    confusion = np.array(judged["confusion_easpm_by_judge"])
    assert confusion.sum() == 6 and confusion.sum(1).tolist() == judged["easpm_named"]
    assert confusion.sum(0).tolist() == judged["judge_named"]
    assert judged["agreement"] == pytest.approx(np.trace(confusion) / 6)
    assert np.isfinite(judged["level_offset"]) and 0.0 <= judged["judge_accuracy"] <= 1.0
    assert np.isfinite(judged["prior_level_offset"]) and judged["prior_level_offset"] != judged["level_offset"]
    level = result["level"]  # EASPM on the recordings under a level offset: every utterance named at every offset
    assert level["offsets"] == [-1.0, -0.5, 0.0, 0.5, 1.0] and [sum(row) for row in level["named"]] == [6] * 5
    printed = capsys.readouterr().out
    assert "base: accuracy" in printed and "Per target emotion" in printed and "reward against the judge" in printed
    assert "under a level offset" in printed
    assert main(["--model", f"bad={tmp_path}", *args]) == 2  # not a model folder: one-line error


def test_x0_hat_input_scores_the_base_models_clean_estimate():
    from test_gradtts import text_batch, tiny_model

    base = tiny_model()
    prior = base.encode(text_batch(2, 7))
    torch.manual_seed(0)
    model = EASPM(SMALL.model_copy(update={"input": "x0_hat"}), n_feats=80).eval()
    states = torch.randn(prior.mu.shape) * prior.mask
    request = ScoreRequest(states, prior.mask, torch.tensor([0.3, 0.6]), prior.emotion)
    expected = model.score([model.default_prompts()[int(e)] for e in prior.emotion],
                           base.x0_estimate(states, request.t, prior) * prior.mask, prior.mask, request.t)
    with_model = EASPMReward(model, base).score(request, prior=prior).scores
    with_callable = EASPMReward(model, lambda r: base.x0_estimate(r.states, r.t, prior)).score(request).scores
    assert torch.allclose(with_model, expected, atol=1e-5) and torch.allclose(with_callable, expected, atol=1e-5)
    same_weights = EASPM(SMALL, n_feats=80)
    same_weights.load_state_dict(model.state_dict())
    noisy = EASPMReward(same_weights).score(request).scores
    assert not torch.allclose(noisy, expected, atol=1e-3)  # a different input really is used
    with pytest.raises(ValueError, match="Prior"):
        EASPMReward(model, base).score(request)
    # a rollout's request carries the condition itself (mu, speaker), also through the reward actor's batching
    carried = replace(request, mu=prior.mu, speaker=prior.speaker)
    assert torch.allclose(EASPMReward(model, base).score(carried).scores, expected, atol=1e-5)
    merged, sizes = concat_requests([replace(carried, states=carried.states[:1], mask=carried.mask[:1], t=carried.t[:1],
                                             emotion=carried.emotion[:1], mu=carried.mu[:1], speaker=carried.speaker[:1]),
                                     replace(carried, states=carried.states[1:], mask=carried.mask[1:], t=carried.t[1:],
                                             emotion=carried.emotion[1:], mu=carried.mu[1:], speaker=carried.speaker[1:])])
    assert sizes == [1, 1] and torch.equal(merged.speaker, prior.speaker) and torch.equal(merged.mu, prior.mu)
    assert torch.allclose(EASPMReward(model, base).score(merged).scores, expected, atol=1e-5)
    from rlhf_tts.algos import easpo  # so EASPO's rollouts can use it (they used to stop at the first pool)

    align = load_config(None, ["preset=smoke", "align.threshold=0.0", "align.sampler_steps=4"]).align
    pairs = easpo.rollout(base, text_batch(2, 7), align, EASPMReward(model, base).score, torch.Generator().manual_seed(0),
                          send_condition=True)
    assert len(pairs.batch) == 2 * len(easpo.preference_steps(4, *align.timestep_range()))
    with pytest.raises(ValueError, match="mu and speaker"):  # without the condition it says what is missing
        easpo.rollout(base, text_batch(2, 7), align, EASPMReward(model, base).score, torch.Generator().manual_seed(0))
    from rlhf_tts.training.align import reward_needs_condition

    assert reward_needs_condition(load_config(None, ["easpm.input=x0_hat"]))
    assert not reward_needs_condition(load_config(None, []))
    with pytest.raises(ValueError, match="x0"):
        EASPMReward(model).score(request)
