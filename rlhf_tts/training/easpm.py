"""The `easpm` stage: train the time-conditioned emotion preference model on noised real mels.

Training states follow the Grad-TTS forward marginal (METHOD §1): for a real train-split mel `x0`,
`x_t = rho_t x0 + (1 - rho_t) mu + sqrt(lambda_t) xi` at `t ~ U(0, 1)`, where `mu` is the frozen base
encoder's prior aligned with the utterance's own MAS durations. The corpus has every sentence
spoken by each speaker in every emotion, so each step draws (target, other) utterances of one
(speaker, text), crops both to a common length and noises them with ONE shared draw of `t` and `xi`:
the pair differs only in how it was spoken. Loss (METHOD §2, open in the paper; our choice):
`infonce_weight · CE(audio → the emotion prompts) + bt_weight · -log σ(S(c_tgt, x_tgt) - S(c_tgt, x_oth))`.

The check that matters is written out at the end: pair accuracy and retrieval accuracy against t
on held-out sentences (`accuracy_curve`), as JSON, a plot and MLflow metrics. The run lives in
`<cache_dir>/easpm/<key>/` (key: base model, easpm config, seed) with atomic checkpoints; `--resume`
continues from the latest exactly (weights, optimizer moments, both RNG streams).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from rlhf_tts.checkpoint import (latest_checkpoint, load_checkpoint, load_model_weights, restore, save_checkpoint,
                                 write_json_atomic)
from rlhf_tts.config import EASPMConfig, RunConfig, stable_hash, stored_config
from rlhf_tts.models.easpm import EASPM, default_prompt, paraphrases
from rlhf_tts.models.gradtts import diffusion
from rlhf_tts.models.gradtts.model import GradTTS, Prior, TextBatch
from rlhf_tts.training.data_parallel import Ranks, gathered_rng, rank_rng, run_ranks, training_ranks
from rlhf_tts.training.pretrain import base_model_location, resolve_device

EASPM_VERSION = 3  # 2: durations kept per item; shared-timing pairs. 3: both re-timed to a common timing
ProgressFn = Callable[..., None]
#: Given noisy states, their mask, times and the items' priors, the base model's clean estimate.
X0Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Prior], torch.Tensor]


# ------------------------------------------------------------------------------------ location

@dataclass(frozen=True)
class EASPMLocation:
    """A (finished or in-progress) EASPM run: `final/` weights, `model.json`, `curve.json`."""

    directory: Path

    @property
    def final(self) -> Path:
        return self.directory / "final"

    @property
    def checkpoints(self) -> Path:
        return self.directory / "checkpoints"

    @property
    def curve_path(self) -> Path:
        return self.directory / "curve.json"

    def exists(self) -> bool:
        return (self.final / "state.json").is_file()

    def load(self, device: str | torch.device = "cpu") -> EASPM:
        """The trained model, in eval mode."""
        if not self.exists():
            raise FileNotFoundError(f"no trained EASPM at {self.directory}: run the easpm stage first")
        meta = json.loads((self.directory / "model.json").read_text())
        settings, _ = stored_config(meta["easpm"], EASPMConfig)  # saved by another version: loads too
        model = EASPM(settings, meta["n_feats"], meta["emotions"], meta["words"])
        load_model_weights(self.final, model)
        return model.to(device).eval()


def easpm_key(cfg: RunConfig) -> str:
    exclude = {"t_grid", "curve_split", "curve_seed", "eval_every", "checkpoint_every", "log_every", "threads", "device"}
    if cfg.easpm.data_parallel == 1:
        exclude.add("data_parallel")  # one process: the key (and model) of the versions before the option
    for option in ("resynthesis_augment", "gain_augment", "level_invariant"):
        if not getattr(cfg.easpm, option):
            exclude.add(option)  # off: the key (and model) of the versions before the option
    return stable_hash(base_model_location(cfg).directory.name, cfg.easpm.model_dump(exclude=exclude), cfg.seed, EASPM_VERSION)


def easpm_location(cfg: RunConfig) -> EASPMLocation:
    """Where the EASPM for `cfg` is (or will be), without building or training anything."""
    return EASPMLocation(Path(cfg.cache_dir) / "easpm" / easpm_key(cfg))


# ----------------------------------------------------------------------------------------- data

@dataclass
class NoisedItem:
    """A real utterance with its frozen-base prior: mel and mu (n_feats, T), the prior's conditions."""

    utt_id: str
    speaker: int
    emotion: int  # the true emotion (the label to predict)
    prior_emotion: int  # the label mu was encoded with (see EASPMConfig.prior_emotion)
    mel: torch.Tensor
    mu: torch.Tensor
    durations: torch.Tensor | None = None  # (n_phonemes,) MAS frames per phoneme; they sum to the length
    resynthesised: torch.Tensor | None = None  # the mel's Griffin-Lim round trip (easpm.resynthesis_augment)

    @property
    def length(self) -> int:
        return int(self.mel.shape[-1])


def warp_to_durations(mel: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Re-time `mel` (n_feats, Σ source) phoneme by phoneme to the `target` durations (n_feats, Σ target).

    Each phoneme's frames are linearly resampled to its target length, so the result keeps the
    utterance's spectral content (pitch, energy, timbre) but takes on another utterance's timing.
    """
    source, target = source.long().cpu(), target.long().cpu()
    if source.shape != target.shape:
        raise ValueError(f"warp: {source.numel()} source and {target.numel()} target phonemes differ")
    src_start = torch.cumsum(source, 0) - source
    tgt_start = torch.cumsum(target, 0) - target
    phone = torch.repeat_interleave(torch.arange(len(target)), target)
    within = torch.arange(int(target.sum())) - tgt_start[phone]
    position = src_start[phone] + (within + 0.5) / target[phone] * source[phone] - 0.5
    position = torch.minimum(torch.maximum(position, src_start[phone].float()), (src_start[phone] + source[phone] - 1).float())
    low = position.floor().long()
    high = torch.clamp(low + 1, max=mel.shape[-1] - 1)
    weight = (position - low).to(mel.dtype).to(mel.device)
    low, high = low.to(mel.device), high.to(mel.device)
    return mel[:, low] + (mel[:, high] - mel[:, low]) * weight  # exact where a phoneme's frames are equal


def shared_timing_pair(a: NoisedItem, o: NoisedItem) -> tuple[NoisedItem, NoisedItem]:
    """Target `a` and other emotion `o` both re-timed to one common timing (the phoneme-wise mean of
    their durations), over `a`'s mu re-timed the same way (exact: mu is constant within a phoneme).

    Both mels go through the same linear resampling, so resampling itself (it smooths) cannot tell
    the loser from the winner; re-timing only the loser let EASPM v2 learn that shortcut (pair
    accuracy 0.94 at t = 1, where the states carry almost no signal)."""
    common = torch.clamp(torch.round((a.durations.float() + o.durations.float()) / 2), min=1).long()
    mu = warp_to_durations(a.mu, a.durations, common)
    return (NoisedItem(a.utt_id, a.speaker, a.emotion, a.prior_emotion, warp_to_durations(a.mel, a.durations, common), mu, common),
            NoisedItem(o.utt_id, o.speaker, o.emotion, a.prior_emotion, warp_to_durations(o.mel, o.durations, common), mu, common))


@torch.no_grad()
def prepare_items(base: GradTTS, rows: list[dict], mel_dir: Path, vocab, prior_emotion: str,  # noqa: ANN001
                  device: torch.device, progress: ProgressFn | None = None, label: str = "",
                  resynthesised: dict | None = None) -> list[NoisedItem]:
    """Mels of `rows` with `mu` from the frozen base encoder at the utterance's own MAS durations
    (and, from `resynthesised`, utt_id → each mel's Griffin-Lim round trip, when given)."""
    from rlhf_tts.training.data import collate, load_utterances

    utterances = sorted(load_utterances(rows, mel_dir, vocab), key=lambda u: (u.mel.shape[1], u.utt_id))
    utterances = [u for u in utterances if u.mel.shape[1] >= len(u.ids)]  # MAS needs T_mel >= T_text
    neutral = vocab.emotions.index("Neutral") if "Neutral" in vocab.emotions else len(vocab.emotions)
    items: list[NoisedItem] = []
    for start in range(0, len(utterances), 32):
        chunk = utterances[start : start + 32]
        batch = collate(chunk).to(device)
        durations = base.ground_truth_durations(batch.text, batch.mel, batch.mel_lengths)
        text = batch.text
        if prior_emotion == "neutral":
            text = TextBatch(text.ids, text.lengths, torch.full_like(text.emotion, neutral), text.speaker)
        prior = base.encode(text, durations=durations)
        for i, u in enumerate(chunk):
            n = int(batch.mel_lengths[i])
            round_trip = None
            if resynthesised is not None:
                round_trip = torch.as_tensor(resynthesised[u.utt_id], dtype=batch.mel.dtype, device=device)[:, :n]
            items.append(NoisedItem(u.utt_id, u.speaker, u.emotion, int(text.emotion[i]),
                                    batch.mel[i, :, :n].contiguous(), prior.mu[i, :, :n].contiguous(),
                                    durations[i, : int(text.lengths[i])].cpu(), round_trip))
        if progress is not None:
            progress(label, min(start + 32, len(utterances)), len(utterances))
    return items


def group_items(items: list[NoisedItem], rows: list[dict]) -> list[list[int]]:
    """Indices of items grouped by (speaker, text), groups with at least two emotions, in a stable order."""
    text_of = {r["utt_id"]: (r["speaker"], r["text"]) for r in rows}
    groups: dict[tuple[str, str], dict[int, int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(text_of[item.utt_id], {}).setdefault(item.emotion, index)
    return [[g[e] for e in sorted(g)] for _, g in sorted(groups.items()) if len(g) >= 2]


def mel_statistics(items: list[NoisedItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin mean and std over every frame of the training mels (the audio tower's input scaling)."""
    frames = torch.cat([i.mel for i in items], dim=-1)
    return frames.mean(-1).cpu(), frames.std(-1).cpu()


def _pad_stack(tensors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    return torch.stack([F.pad(x, (0, length - x.shape[-1])) for x in tensors])


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def make_prior(mu: torch.Tensor, mask: torch.Tensor, speaker: torch.Tensor, emotion: torch.Tensor) -> Prior:
    """A decoder-side Prior for cropped states (durations are not needed by the score network)."""
    return Prior.for_decoder(mu, mask, emotion, speaker)


def gradtts_x0(base: GradTTS) -> X0Fn:
    """The x0_hat input: the frozen base model's one-step clean estimate (SPO's code)."""
    def estimate(x_t: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, prior: Prior) -> torch.Tensor:
        with torch.no_grad():
            return base.x0_estimate(x_t, t, prior) * mask
    return estimate


@dataclass
class PairBatch:
    """2B states: rows [0, B) the targets, rows [B, 2B) the others of the same (speaker, text)."""

    states: torch.Tensor
    mask: torch.Tensor
    t: torch.Tensor
    emotion: torch.Tensor  # true emotions (2B,)
    target: torch.Tensor  # target emotion of each pair (B,)
    prior: Prior


def sample_pairs(items: list[NoisedItem], groups: list[list[int]], cfg: EASPMConfig, beta_min: float, beta_max: float,
                 generator: torch.Generator, length_multiple: int = 1) -> PairBatch:
    """B pairs (target, other emotion) of one (speaker, text), cropped to a common length and noised
    with one shared (t, xi) per pair. Every random choice comes from `generator` (exact resumption)."""
    b = cfg.batch_pairs
    picks = torch.randint(len(groups), (b,), generator=generator).tolist()
    targets, others, crops = [], [], []
    for g in picks:
        members = groups[g]
        first = int(torch.randint(len(members), (1,), generator=generator))
        second = int(torch.randint(len(members) - 1, (1,), generator=generator))
        second += second >= first
        a, o = items[members[first]], items[members[second]]
        if cfg.resynthesis_augment > 0 and float(torch.rand(1, generator=generator)) < cfg.resynthesis_augment:
            # Both of the pair heard through the vocoder, or neither: the pair still differs only in
            # how it was spoken, and EASPM learns that the vocoder's smearing is no emotion.
            if a.resynthesised is None or o.resynthesised is None:
                raise ValueError(f"easpm.resynthesis_augment: no Griffin-Lim round trip loaded for {a.utt_id} / {o.utt_id}")
            a, o = replace(a, mel=a.resynthesised), replace(o, mel=o.resynthesised)
        if cfg.pair_timing == "shared":
            # Both re-timed to one timing over the target's mu: the pair differs only in how the
            # words sound, as EASPO's candidates (one state, one mu) do.
            a, o = shared_timing_pair(a, o)
        length = min(a.length, o.length, cfg.max_frames)
        start = int(torch.randint(a.length - length + 1, (1,), generator=generator))
        starts = [start, start] if cfg.pair_timing == "shared" else [
            start, int(torch.randint(o.length - length + 1, (1,), generator=generator))]
        targets.append(a)
        others.append(o)
        crops.append((length, starts))
    t = torch.rand(b, generator=generator)
    width = _round_up(max(c[0] for c in crops), length_multiple)
    noise = torch.randn(b, items[0].mel.shape[0], width, generator=generator)
    both = targets + others
    spans = [(s[0], n) for n, s in crops] + [(s[1], n) for n, s in crops]
    x0 = _pad_stack([x.mel[:, s : s + n] for x, (s, n) in zip(both, spans)], width)
    if cfg.gain_augment > 0:
        # One random level per pair, the same for both: loudness relative to the other candidate still
        # counts, the absolute level (which a decoder drifts in) does not.
        gain = (torch.rand(b, generator=generator) * 2 - 1) * cfg.gain_augment
        x0 = x0 + torch.cat([gain, gain]).to(x0)[:, None, None]
    mu = _pad_stack([x.mu[:, s : s + n] for x, (s, n) in zip(both, spans)], width)
    lengths = torch.tensor([n for _, n in spans], device=x0.device)
    mask = (torch.arange(width, device=x0.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).to(x0.dtype)
    t2 = torch.cat([t, t]).to(x0.device)
    states = diffusion.diffuse(x0, mu, t2, torch.cat([noise, noise]).to(x0.device), beta_min, beta_max) * mask
    emotion = torch.tensor([x.emotion for x in both], device=x0.device)
    prior = make_prior(mu, mask, torch.tensor([x.speaker for x in both], device=x0.device),
                       torch.tensor([x.prior_emotion for x in both], device=x0.device))
    return PairBatch(states, mask, t2, emotion, emotion[:b], prior)


def easpm_losses(model: EASPM, batch: PairBatch, prompts: Sequence[str], cfg: EASPMConfig,
                 x0_fn: X0Fn | None = None) -> dict[str, torch.Tensor]:
    """InfoNCE (audio → the emotion prompts) and Bradley–Terry on the pairs; `prompts[e]` is emotion e's."""
    states = batch.states
    if cfg.input == "x0_hat":
        if x0_fn is None:
            raise ValueError("easpm.input=x0_hat needs the base model's clean estimate (x0_fn)")
        states = x0_fn(states, batch.mask, batch.t, batch.prior)
    logits = model.logits(model.embed_audio(states, batch.mask, batch.t), model.embed_prompts(prompts))
    infonce = F.cross_entropy(logits, batch.emotion)
    b = batch.target.shape[0]
    rows = torch.arange(b, device=logits.device)
    margin = logits[:b][rows, batch.target] - logits[b:][rows, batch.target]
    bt = -F.logsigmoid(margin).mean()
    return {
        "loss": cfg.infonce_weight * infonce + cfg.bt_weight * bt, "infonce": infonce, "bt": bt,
        "pair_accuracy": (margin > 0).float().mean().detach(),
        "retrieval_accuracy": (logits.argmax(-1) == batch.emotion).float().mean().detach(),
    }


# ------------------------------------------------------------------------------------ the curve

def _model_input(model: EASPM, x0: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor, lengths: list[int],
                 t_value: float, speakers: list[int], prior_emotions: list[int], beta_min: float, beta_max: float,
                 x0_fn: X0Fn | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (x0, mu, noise) of one chunk → (what EASPM reads at t, mask, t): x_t itself, or the base
    model's clean estimate of it when `easpm.input=x0_hat`."""
    device = x0.device
    n_valid = torch.tensor(lengths, device=device)
    mask = (torch.arange(x0.shape[-1], device=device).unsqueeze(0) < n_valid.unsqueeze(1)).unsqueeze(1).to(x0.dtype)
    t = torch.full((len(lengths),), float(t_value), device=device)
    states = diffusion.diffuse(x0, mu, t, noise, beta_min, beta_max) * mask
    if model.cfg.input == "x0_hat":
        if x0_fn is None:
            raise ValueError("easpm.input=x0_hat needs the base model's clean estimate (x0_fn)")
        prior = make_prior(mu, mask, torch.tensor(speakers, device=device), torch.tensor(prior_emotions, device=device))
        states = x0_fn(states, mask, t, prior)
    return states, mask, t


@torch.no_grad()
def accuracy_curve(model: EASPM, items: list[NoisedItem], groups: list[list[int]], t_grid: Sequence[float],
                   beta_min: float, beta_max: float, seed: int, x0_fn: X0Fn | None = None,
                   batch_size: int = 64, length_multiple: int = 1, prior_only: bool = False) -> dict:
    """Pair and retrieval accuracy against t, with the default prompt per emotion.

    Per group (one speaker and text, all its emotions) and per t, every member is cropped to the
    group's shortest length and noised with ONE shared noise draw; a pair (target e, other e') is
    right when S(c_e, x_e) > S(c_e, x_e'). Retrieval: argmax_e S(c_e, x) is the true emotion.

    `prior_only` is a control: each x0 is replaced by its own `mu`, so the states carry only what
    the prior carries (its MAS durations, i.e. the utterance's timing, and mu's emotion label when
    `prior_emotion=own`). At t = 1 the two curves coincide; the gap below shows what the model
    reads from the audio content itself, the part that can rank EASPO's candidates (which share mu).
    """
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    prompts = model.embed_prompts(model.default_prompts())
    generator = torch.Generator().manual_seed(seed)
    n_feats = items[0].mel.shape[0]
    pair_acc, retrieval_acc, margins = [], [], []
    n_pairs = sum(len(g) * (len(g) - 1) for g in groups)
    for t_value in t_grid:
        lengths = [min(items[i].length for i in g) for g in groups]
        noises = [torch.randn(n_feats, n, generator=generator) for n in lengths]
        flat = [(gi, i) for gi, g in enumerate(groups) for i in g]
        scores = torch.empty(len(flat), prompts.shape[0])
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            width = _round_up(max(lengths[gi] for gi, _ in chunk), length_multiple)
            mu = _pad_stack([items[i].mu[:, : lengths[gi]] for gi, i in chunk], width)
            x0 = mu if prior_only else _pad_stack([items[i].mel[:, : lengths[gi]] for gi, i in chunk], width)
            noise = _pad_stack([noises[gi] for gi, _ in chunk], width).to(device)
            states, mask, t = _model_input(model, x0.to(device), mu.to(device), noise, [lengths[gi] for gi, _ in chunk],
                                           t_value, [items[i].speaker for _, i in chunk],
                                           [items[i].prior_emotion for _, i in chunk], beta_min, beta_max, x0_fn)
            scores[start : start + len(chunk)] = model.logits(model.embed_audio(states, mask, t), prompts).cpu()
        right, total, hits = 0.0, 0, 0
        margin_sum = 0.0
        position = 0
        for g in groups:
            s = scores[position : position + len(g)]
            emotions = [items[i].emotion for i in g]
            for a, ea in enumerate(emotions):
                hits += int(int(s[a].argmax()) == ea)
                for o in range(len(g)):
                    if o != a:
                        diff = float(s[a, ea] - s[o, ea])
                        right += 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0  # a tie is a coin flip
                        margin_sum += diff
                        total += 1
            position += len(g)
        pair_acc.append(right / max(total, 1))
        retrieval_acc.append(hits / max(len(flat), 1))
        margins.append(margin_sum / max(total, 1))
    model.train(was_training)
    return {"t": [float(t) for t in t_grid], "pair_accuracy": pair_acc, "retrieval_accuracy": retrieval_acc,
            "mean_margin": margins, "n_pairs": n_pairs, "n_groups": len(groups),
            "n_utterances": sum(len(g) for g in groups), "prompts": model.default_prompts(),
            "chance": {"pair_accuracy": 0.5, "retrieval_accuracy": 1.0 / len(model.emotions)}}


@torch.no_grad()
def shared_timing_accuracy(model: EASPM, items: list[NoisedItem], groups: list[list[int]], t_grid: Sequence[float],
                           beta_min: float, beta_max: float, seed: int, x0_fn: X0Fn | None = None,
                           batch_size: int = 64, length_multiple: int = 1) -> list[float]:
    """Pair accuracy when timing cannot help: for every ordered pair (target a, other o) of a group,
    both re-timed to one timing over a's mu (`shared_timing_pair`), noised with one draw; right when
    S(c_a, x_a) > S(c_a, x_o→a). This is the ranking EASPO asks for (candidates share a state and mu)."""
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    prompts = model.embed_prompts(model.default_prompts())
    generator = torch.Generator().manual_seed(seed + 1)
    accuracies = []
    for t_value in t_grid:
        states = []  # (x0, re-timed target item, owner): owner −1 marks the target's own state
        for g in groups:
            for a in g:
                for o in g:
                    if o != a:
                        a_shared, o_shared = shared_timing_pair(items[a], items[o])
                        states += [(a_shared.mel, a_shared, -1), (o_shared.mel, a_shared, o)]
        noise = {id(target): torch.randn(target.mel.shape, generator=generator)
                 for _, target, owner in states if owner == -1}
        scores = torch.empty(len(states))
        for start in range(0, len(states), batch_size):
            chunk = states[start : start + batch_size]
            width = _round_up(max(x.shape[-1] for x, _, _ in chunk), length_multiple)
            x0 = _pad_stack([x for x, _, _ in chunk], width).to(device)
            mu = _pad_stack([target.mu for _, target, _ in chunk], width).to(device)
            xi = _pad_stack([noise[id(target)] for _, target, _ in chunk], width).to(device)
            x_t, mask, t = _model_input(model, x0, mu, xi, [x.shape[-1] for x, _, _ in chunk], t_value,
                                        [target.speaker for _, target, _ in chunk],
                                        [target.prior_emotion for _, target, _ in chunk], beta_min, beta_max, x0_fn)
            logits = model.logits(model.embed_audio(x_t, mask, t), prompts)
            wanted = torch.tensor([target.emotion for _, target, _ in chunk], device=device)
            scores[start : start + len(chunk)] = logits.gather(1, wanted.unsqueeze(1)).squeeze(1).cpu()
        right = total = 0.0
        own = 0.0
        for score, (_, target, owner) in zip(scores.tolist(), states):
            if owner == -1:
                own = score
                continue
            right += 1.0 if own > score else 0.5 if own == score else 0.0
            total += 1
        accuracies.append(right / max(total, 1))
    model.train(was_training)
    return accuracies


def curve_figure(curve: dict, title: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(curve["t"], curve["pair_accuracy"], "o-", label="pair accuracy")
    ax.plot(curve["t"], curve["retrieval_accuracy"], "s-", label="retrieval accuracy")
    if curve.get("prior_only_pair_accuracy"):
        ax.plot(curve["t"], curve["prior_only_pair_accuracy"], "^--", label="pair accuracy, prior-only control")
    if curve.get("shared_timing_pair_accuracy"):
        ax.plot(curve["t"], curve["shared_timing_pair_accuracy"], "D-", label="pair accuracy, shared timing")
    ax.axhline(0.5, color="grey", ls="--", lw=0.8, label="pair chance")
    ax.axhline(curve["chance"]["retrieval_accuracy"], color="grey", ls=":", lw=0.8, label="retrieval chance")
    ax.set_xlabel("diffusion time t")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title[:90], fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------- training

def _lr_at(step: int, cfg: EASPMConfig) -> float:
    """Linear warm-up, then cosine decay to lr/10."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "batch": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _split_rows(rows: list[dict], split: str) -> tuple[str, list[dict]]:
    """The curve's split; a smaller corpus may leave a split without a sentence, so fall back."""
    for name in (split, "test", "val", "train"):
        chosen = [r for r in rows if r["split"] == name]
        if chosen:
            return name, chosen
    raise ValueError("no utterances in any split")


@dataclass
class _Context:
    """What both training and the curve need: the frozen base model and the prepared utterances."""

    base: GradTTS
    vocab: object
    beta_min: float
    beta_max: float
    x0_fn: X0Fn | None
    multiple: int
    dataset_dir: Path
    rows: list[dict]


def _context(cfg: RunConfig, device: torch.device) -> _Context:
    from rlhf_tts.data.manifest import read_manifest
    from rlhf_tts.data.pipeline import dataset_location

    base_location = base_model_location(cfg)
    if not (base_location.final / "state.json").is_file():
        raise FileNotFoundError(f"no base model at {base_location.directory}: run the pretrain stage first")
    base, vocab, base_cfg = base_location.load(device)
    for p in base.parameters():
        p.requires_grad_(False)
    x0_hat = cfg.easpm.input == "x0_hat"
    dataset, _ = dataset_location(cfg)
    rows = [r for r in read_manifest(dataset.manifest_path).to_pylist() if r["speaker"] in vocab.speakers]
    return _Context(base, vocab, base_cfg.model.beta_min, base_cfg.model.beta_max, gradtts_x0(base) if x0_hat else None,
                    base.length_multiple if x0_hat else 1, dataset.directory, rows)


def _curve(cfg: RunConfig, model: EASPM, ctx: _Context, device: torch.device, report: ProgressFn,
           items: list[NoisedItem] | None = None, split: str | None = None, control: bool = True) -> dict:
    """The accuracy-vs-t curve on the configured held-out split (plus the prior-only control)."""
    ecfg = cfg.easpm
    if items is None:
        split, rows = _split_rows(ctx.rows, ecfg.curve_split)
        items = prepare_items(ctx.base, rows, ctx.dataset_dir / "mels", ctx.vocab, ecfg.prior_emotion, device, report,
                              f"easpm priors ({split})")
    rows = [r for r in ctx.rows if r["split"] == split]
    groups = group_items(items, rows)
    if not groups:
        return {}
    args = dict(t_grid=ecfg.t_grid, beta_min=ctx.beta_min, beta_max=ctx.beta_max, seed=ecfg.curve_seed,
                x0_fn=ctx.x0_fn, length_multiple=ctx.multiple)
    curve = accuracy_curve(model, items, groups, **args)
    if control:
        curve["prior_only_pair_accuracy"] = accuracy_curve(model, items, groups, prior_only=True, **args)["pair_accuracy"]
        if all(items[i].durations is not None for g in groups for i in g):
            curve["shared_timing_pair_accuracy"] = shared_timing_accuracy(model, items, groups, **args)
    return curve | {"split": split, "requested_split": ecfg.curve_split, "seed": ecfg.curve_seed,
                    "input": ecfg.input, "prior_emotion": ecfg.prior_emotion}


def train_easpm(cfg: RunConfig, resume: bool = False, progress: ProgressFn | None = None, tracker=None,  # noqa: ANN001
                stop_after: int | None = None) -> tuple[EASPMLocation, dict]:
    """Train (or reuse) the EASPM of `cfg`; returns its location and the accuracy-vs-t curve.

    A finished model is reused; its curve is recomputed (not retrained) when the requested split,
    t grid or curve seed differ from the stored one. `stop_after` ends early after that step
    without finishing (tests of resumption).
    """
    report = progress or (lambda *a, **k: None)
    ecfg = cfg.easpm
    location = easpm_location(cfg)
    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)
    device = resolve_device(ecfg.device)
    if location.exists():
        stored = json.loads(location.curve_path.read_text()) if location.curve_path.is_file() else {}
        if (stored.get("requested_split"), stored.get("t"), stored.get("seed")) == (
                ecfg.curve_split, [float(t) for t in ecfg.t_grid], ecfg.curve_seed):
            return location, stored
        curve = _curve(cfg, location.load(device), _context(cfg, device), device, report)
        curve = stored | curve if stored else curve
        write_json_atomic(location.curve_path, curve)
        return location, curve
    world = training_ranks(ecfg.data_parallel, device, ecfg.batch_pairs)
    return run_ranks(_easpm_rank, world, (cfg, resume, stop_after), (progress, tracker))


def _easpm_rank(ranks: Ranks, cfg: RunConfig, resume: bool, stop_after: int | None, progress: ProgressFn | None = None,
                tracker=None) -> tuple[EASPMLocation, dict]:  # noqa: ANN001
    """One rank's training (the only one when not data-parallel): each rank draws its share of the
    batch's pairs from its own stream; rank 0 writes, logs, checkpoints (with every rank's RNG state)
    and computes the curve."""
    report = progress or (lambda *a, **k: None)
    ecfg = cfg.easpm
    location = easpm_location(cfg)
    device = resolve_device(ecfg.device)
    if ranks.main and not resume and location.checkpoints.exists():
        shutil.rmtree(location.checkpoints)  # a fresh run was asked for; --resume would have continued it
    ranks.barrier()
    ctx = _context(cfg, device)
    base, vocab, beta_min, beta_max, x0_fn, multiple = ctx.base, ctx.vocab, ctx.beta_min, ctx.beta_max, ctx.x0_fn, ctx.multiple
    train_rows = [r for r in ctx.rows if r["split"] == "train"]
    curve_split, curve_rows = _split_rows(ctx.rows, ecfg.curve_split)
    mel_dir = ctx.dataset_dir / "mels"
    resynthesised = None
    if ecfg.resynthesis_augment > 0:
        from rlhf_tts.data.resynthesis import resynthesised_split

        if ranks.main:  # rank 0 builds the shared cache once; the others read it
            resynthesised = resynthesised_split(cfg, "train", report, "easpm: griffin-lim train mels")
        ranks.barrier()
        if not ranks.main:
            resynthesised = resynthesised_split(cfg, "train")
    train_items = prepare_items(base, train_rows, mel_dir, vocab, ecfg.prior_emotion, device, report, "easpm priors (train)",
                                resynthesised)
    curve_items = prepare_items(base, curve_rows, mel_dir, vocab, ecfg.prior_emotion, device, report,
                                f"easpm priors ({curve_split})")
    train_groups, curve_groups = group_items(train_items, train_rows), group_items(curve_items, curve_rows)
    if not train_groups:
        raise ValueError("easpm: no (speaker, text) in the train split is spoken in two emotions; pairs need them")

    torch.manual_seed(cfg.seed)
    model = EASPM(ecfg, base.n_feats, vocab.emotions)  # the same initial weights on every rank
    model.set_normalisation(*mel_statistics(train_items))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ecfg.lr, weight_decay=ecfg.weight_decay)
    generator = torch.Generator().manual_seed(ranks.seed(cfg.seed, "easpm rank"))
    share = ecfg.model_copy(update={"batch_pairs": len(ranks.shard(range(ecfg.batch_pairs)))})
    step = 0
    latest = latest_checkpoint(location.checkpoints) if resume else None
    if latest is not None:
        checkpoint = load_checkpoint(latest)
        _set_rng_state(rank_rng(restore(checkpoint, model, optimizer), ranks), generator, device)
        step = checkpoint.step
    if ranks.main:
        location.directory.mkdir(parents=True, exist_ok=True)
        meta = {"easpm": ecfg.model_dump(mode="json"), "n_feats": base.n_feats, "emotions": list(vocab.emotions),
                "words": list(model.tokenizer.words), "base_model": str(base_model_location(cfg).directory),
                "dataset": str(ctx.dataset_dir), "n_parameters": sum(p.numel() for p in model.parameters()),
                "train_utterances": len(train_items), "train_groups": len(train_groups)}
        (location.directory / "model.json").write_text(json.dumps(meta, indent=1))

    templates = [paraphrases(e) for e in vocab.emotions]
    curve_args = dict(items=curve_items, groups=curve_groups, t_grid=ecfg.t_grid, beta_min=beta_min, beta_max=beta_max,
                      seed=ecfg.curve_seed, x0_fn=x0_fn, length_multiple=multiple)
    model.train()
    started, first_step = time.monotonic(), step
    while step < ecfg.steps and (stop_after is None or step < stop_after):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, ecfg)
        picks = [int(torch.randint(len(options), (1,), generator=generator)) for options in templates]
        prompts = [options[i] for options, i in zip(templates, picks)]
        batch = sample_pairs(train_items, train_groups, share, beta_min, beta_max, generator, multiple)
        out = easpm_losses(model, batch, prompts, ecfg, x0_fn)
        optimizer.zero_grad(set_to_none=True)
        ranks.backward(out["loss"], share.batch_pairs / ecfg.batch_pairs, list(model.parameters()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ecfg.grad_clip)
        optimizer.step()
        step += 1
        losses = {k: float(v.detach()) for k, v in out.items()}
        if ranks.main and tracker is not None and (step % ecfg.log_every == 0 or step == ecfg.steps):
            rate = (step - first_step) / max(time.monotonic() - started, 1e-6)
            tracker.log_metrics({f"easpm/{k}": v for k, v in losses.items()} | {
                "easpm/grad_norm": float(grad_norm), "easpm/logit_scale": float(model.scale().detach()),
                "easpm/lr": _lr_at(step - 1, ecfg), "easpm/steps_per_s": rate}, step=step)
        report("train EASPM", step, ecfg.steps,
               info=f"loss {losses['loss']:.3f} (nce {losses['infonce']:.3f} bt {losses['bt']:.3f}) "
                    f"pair {losses['pair_accuracy']:.2f}" + (" (rank 0's share)" if ranks.world > 1 else ""))
        if step % ecfg.checkpoint_every == 0 or step == ecfg.steps:
            rng = gathered_rng(_rng_state(generator, device), ranks)
            if ranks.main:
                save_checkpoint(location.checkpoints, step, model, optimizer, rng,
                                {"losses": losses, "config": ecfg.model_dump(mode="json"), "ranks": ranks.world})
        if ranks.main and tracker is not None and curve_groups and step % ecfg.eval_every == 0 and step < ecfg.steps:
            interim = accuracy_curve(model, **curve_args)
            tracker.log_metrics({f"easpm/{curve_split}_pair_acc_t{round(t * 100):03d}": a
                                 for t, a in zip(interim["t"], interim["pair_accuracy"])}, step=step)
    if step < ecfg.steps or not ranks.main:
        return location, {}
    train_seconds = round(time.monotonic() - started, 1)
    curve = _curve(cfg, model, ctx, device, report, curve_items, curve_split)
    curve.update({"steps": step, "train_seconds_this_run": train_seconds})
    final_tmp = location.directory / f".final.tmp-{os.getpid()}"
    shutil.rmtree(final_tmp, ignore_errors=True)
    shutil.copytree(latest_checkpoint(location.checkpoints), final_tmp)
    shutil.rmtree(location.final, ignore_errors=True)
    write_json_atomic(location.curve_path, curve)  # written first: a model in final/ always has its curve
    final_tmp.rename(location.final)
    return location, curve


# ---------------------------------------------------------------------------------------- stage

def curve_table(curve: dict):  # noqa: ANN201 - a rich Table
    from rich.table import Table

    table = Table(title=f"EASPM accuracy vs t ({curve.get('split')} split: {curve.get('n_pairs')} pairs, "
                        f"{curve.get('n_utterances')} utterances; chance 0.50 / {curve['chance']['retrieval_accuracy']:.2f})")
    table.add_column("t", justify="right")
    table.add_column("pair acc", justify="right")
    table.add_column("retrieval acc", justify="right")
    table.add_column("mean margin", justify="right")
    table.add_column("pair acc, prior-only control", justify="right")
    table.add_column("pair acc, shared timing", justify="right")
    nan = [float("nan")] * len(curve["t"])
    control = curve.get("prior_only_pair_accuracy") or nan
    shared = curve.get("shared_timing_pair_accuracy") or nan
    for t, p, r, m, c, sh in zip(curve["t"], curve["pair_accuracy"], curve["retrieval_accuracy"], curve["mean_margin"],
                                 control, shared):
        table.add_row(f"{t:.2f}", f"{p:.3f}", f"{r:.3f}", f"{m:.2f}", f"{c:.3f}", f"{sh:.3f}")
    return table


def run_easpm_stage(cfg: RunConfig, console, tracker, resume: bool = False) -> dict:  # noqa: ANN001
    """Train (or reuse) EASPM; print, plot and log its accuracy-vs-t curve."""
    from rlhf_tts.data.pipeline import build_dataset
    from rlhf_tts.run import StageProgress, progress_bar

    build_dataset(cfg)  # cached by the data stage: a lookup, not a rebuild
    start = time.monotonic()
    with progress_bar(console) as progress:
        location, curve = train_easpm(cfg, resume=resume, progress=StageProgress(progress), tracker=tracker)
    seconds = time.monotonic() - start
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"easpm": str(location.final), "seconds": round(seconds, 1)}
    if not curve:
        console.print(f"EASPM: {location.final} ({seconds:.0f} s); no held-out (speaker, text) groups for a curve")
        return summary
    curve = dict(curve, stage_seconds=round(seconds, 1), model=str(location.final))
    (out / "easpm_curve.json").write_text(json.dumps(curve, indent=1))
    curve_figure(curve, f"EASPM pair / retrieval accuracy vs t ({curve['split']})", out / "easpm_curve.png")
    console.print(curve_table(curve))
    console.print(f"EASPM: {location.final} ({seconds:.0f} s); curve → {out / 'easpm_curve.json'}, {out / 'easpm_curve.png'}")
    # The curve as MLflow metrics over "step" = t x 1000 (the paper's timestep units), plus scalars.
    none = [None] * len(curve["t"])
    control = curve.get("prior_only_pair_accuracy") or none
    shared = curve.get("shared_timing_pair_accuracy") or none
    for t, p, r, c, sh in zip(curve["t"], curve["pair_accuracy"], curve["retrieval_accuracy"], control, shared):
        metrics = {"easpm/curve_pair_accuracy": p, "easpm/curve_retrieval_accuracy": r}
        if c is not None:
            metrics["easpm/curve_prior_only_pair_accuracy"] = c
        if sh is not None:
            metrics["easpm/curve_shared_timing_pair_accuracy"] = sh
        tracker.log_metrics(metrics, step=round(t * 1000))
    tracker.log_metrics({f"easpm/pair_acc_t{round(t * 100):03d}": p for t, p in zip(curve["t"], curve["pair_accuracy"])}
                        | {"easpm/stage_seconds": seconds})
    tracker.log_artifact(out / "easpm_curve.json", "easpm")
    tracker.log_artifact(out / "easpm_curve.png", "easpm")
    return summary | {"curve": curve}
