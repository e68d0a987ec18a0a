"""Grad-TTS with speaker and emotion conditioning, and the stepwise API every algorithm drives.

`encode` turns text into a `Prior` (aligned `mu`, masks, durations, word spans in frames); the
decoder is then used one step at a time: `score`, `reverse_step_mean`, `candidates` (k next states
from one state with one score-network call), `x0_estimate`, or the whole `sample` loop. All are
batched and masked, and deterministic under a `torch.Generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence, Union

import torch
from torch import nn

from rlhf_tts.config import GradTTSConfig
from rlhf_tts.models.gradtts import diffusion
from rlhf_tts.models.gradtts.mas import monotonic_alignment_search
from rlhf_tts.models.gradtts.text_encoder import TextEncoder, sequence_mask
from rlhf_tts.models.gradtts.unet import ScoreUNet

Tensor = torch.Tensor


@dataclass(frozen=True)
class TextBatch:
    """Padded phoneme ids with their conditions; `word_spans` are [start, end) phoneme ranges."""

    ids: Tensor  # (B, T_text) long
    lengths: Tensor  # (B,) long
    emotion: Tensor  # (B,) long
    speaker: Tensor  # (B,) long
    word_spans: list[list[tuple[int, int]]] | None = None

    def to(self, device: torch.device | str) -> "TextBatch":
        return replace(self, ids=self.ids.to(device), lengths=self.lengths.to(device),
                       emotion=self.emotion.to(device), speaker=self.speaker.to(device))


@dataclass(frozen=True)
class Prior:
    """What the decoder needs: frame-aligned `mu` (B, n_feats, T), `mask` (B, 1, T), conditions."""

    mu: Tensor
    mask: Tensor
    durations: Tensor  # (B, T_text) frames per phoneme
    emotion: Tensor
    speaker: Tensor
    lengths: Tensor  # (B,) frames
    word_frame_spans: list[list[tuple[int, int]]] | None = None

    @classmethod
    def for_decoder(cls, mu: Tensor, mask: Tensor, emotion: Tensor, speaker: Tensor) -> "Prior":
        """A prior rebuilt from what the decoder reads (mu, mask, conditions) where the encoder's
        durations are gone: the whole utterance stands as one "phoneme" of its frame count."""
        lengths = mask.sum(dim=(1, 2)).long()
        return cls(mu, mask, lengths.unsqueeze(1), emotion, speaker, lengths)

    def repeat(self, k: int) -> "Prior":
        """The same prior k times along the batch (item-major: b0,b0,..,b1,b1,..)."""
        rep = lambda x: x.repeat_interleave(k, dim=0)  # noqa: E731
        spans = [s for s in self.word_frame_spans for _ in range(k)] if self.word_frame_spans else None
        return Prior(rep(self.mu), rep(self.mask), rep(self.durations), rep(self.emotion), rep(self.speaker),
                     rep(self.lengths), spans)


def word_frame_spans(word_spans: list[list[tuple[int, int]]], durations: Tensor) -> list[list[tuple[int, int]]]:
    """Phoneme-index word spans → frame spans, through the per-phoneme durations."""
    out = []
    for spans, dur in zip(word_spans, durations.long().cpu()):
        starts = torch.cat([torch.zeros(1, dtype=torch.long), dur.cumsum(0)])
        out.append([(int(starts[a]), int(starts[b])) for a, b in spans])
    return out


Generators = Union[torch.Generator, Sequence[torch.Generator], None]
OutputLevel = Literal["decoder", "prior"]


def item_noise(like: Tensor, lengths: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Standard normal noise shaped like `like` (B, n_feats, T), item b drawn from `generators[b]` over
    its own `lengths[b]` frames (zeros beyond). Drawn frame-major, so an item's values do not depend
    on the padded batch length: the same utterance gets the same noise alone or in any batch."""
    if len(generators) != like.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {like.shape[0]}")
    out = torch.zeros_like(like)
    for row, g in enumerate(generators):
        n = int(lengths[row])
        out[row, :, :n] = torch.randn(n, like.shape[1], generator=g, device=like.device, dtype=like.dtype).T
    return out


def _noise(prior: Prior, generator: Generators) -> Tensor:
    if isinstance(generator, (list, tuple)):
        return item_noise(prior.mu, prior.lengths, generator)
    return torch.randn(prior.mu.shape, generator=generator, device=prior.mu.device, dtype=prior.mu.dtype)


def alignment_from_durations(durations: Tensor, text_mask: Tensor, n_frames: int) -> Tensor:
    """(B, T_text) integer durations → hard alignment (B, T_text, n_frames)."""
    ends = durations.cumsum(dim=1)
    frames = torch.arange(n_frames, device=durations.device)
    path = (frames.view(1, 1, -1) < ends.unsqueeze(-1)) & (frames.view(1, 1, -1) >= (ends - durations).unsqueeze(-1))
    return path.to(torch.float32) * text_mask.unsqueeze(-1)


@torch.no_grad()
def align(mu_x: Tensor, text_mask: Tensor, mel: Tensor, mel_mask: Tensor) -> Tensor:
    """MAS under the prior N(mu_i, I): the (B, T_text, T_mel) alignment Grad-TTS trains durations on."""
    # log N(y_j; mu_i, I) for every (phoneme i, frame j), up to a constant.
    log_p = -0.5 * (mel.pow(2).sum(1, keepdim=True) - 2 * mu_x.transpose(1, 2) @ mel + mu_x.pow(2).sum(1).unsqueeze(-1))
    return monotonic_alignment_search(log_p, text_mask.squeeze(1), mel_mask.squeeze(1))


def flat_alignment(text_mask: Tensor, mel_mask: Tensor) -> Tensor:
    """Each utterance's frames split evenly over its phonemes, in order (an HMM's flat start): the
    (B, T_text, T_mel) alignment `mu` is first fitted on, so that MAS starts from phoneme-specific
    means instead of the undifferentiated ones of a fresh encoder. Phoneme i of N gets the frames
    [floor(i·L/N), floor((i+1)·L/N)) of L; with L ≥ N every phoneme gets at least one."""
    n_text = text_mask.sum(dim=(1, 2)).clamp_min(1)  # (B,)
    n_mel = mel_mask.sum(dim=(1, 2))
    index = torch.arange(text_mask.shape[-1] + 1, device=text_mask.device, dtype=n_mel.dtype)
    bounds = torch.floor(index.unsqueeze(0) * (n_mel / n_text).unsqueeze(1))  # (B, T_text + 1) phoneme edges
    durations = bounds.diff(dim=1).long() * text_mask.squeeze(1).long()
    return alignment_from_durations(durations, text_mask.squeeze(1), mel_mask.shape[-1])


class GradTTS(nn.Module):
    def __init__(self, cfg: GradTTSConfig, n_vocab: int, n_speakers: int, n_emotions: int, n_feats: int = 80) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_feats = n_feats
        self.n_emotions = n_emotions
        self.speaker_embedding = nn.Embedding(n_speakers, cfg.speaker_dim)
        # Row n_emotions is the "no emotion" label used by label dropout and classifier-free guidance.
        self.emotion_embedding = nn.Embedding(n_emotions + 1, cfg.emotion_dim)
        self.encoder = TextEncoder(
            n_vocab, n_feats, cfg.encoder_channels, cfg.encoder_filter_channels, cfg.encoder_layers,
            cfg.encoder_heads, cfg.encoder_dropout, cfg.duration_filter_channels, cfg.speaker_dim,
        )
        self.decoder = ScoreUNet(cfg.decoder_dim, tuple(cfg.decoder_dim_mults), cfg.speaker_dim, n_feats, cfg.pe_scale,
                                 cfg.decoder_attention_heads, cfg.decoder_attention_dim_head)

    @property
    def length_multiple(self) -> int:
        return self.decoder.length_multiple

    def _cond(self, speaker: Tensor, emotion: Tensor) -> Tensor:
        return self.speaker_embedding(speaker) + self.emotion_embedding(emotion)

    # ------------------------------------------------------------------ encoder side

    def encode(self, text: TextBatch, durations: Tensor | None = None, length_scale: float = 1.0) -> Prior:
        """Text → Prior. With `durations` (B, T_text) given (e.g. ground truth), they are used as is."""
        cond = self._cond(text.speaker, text.emotion)
        mu_x, log_dur, text_mask = self.encoder(text.ids, text.lengths, cond)
        if durations is None:
            durations = torch.ceil(torch.exp(log_dur.squeeze(1)) * length_scale) * text_mask.squeeze(1)
            durations = durations.clamp_min(1) * text_mask.squeeze(1)  # every phoneme at least one frame
        durations = durations.long()
        lengths = durations.sum(dim=1).clamp_min(1)
        n_frames = int(math.ceil(int(lengths.max()) / self.length_multiple) * self.length_multiple)
        path = alignment_from_durations(durations, text_mask.squeeze(1), n_frames)
        mu = torch.matmul(mu_x, path)  # (B, n_feats, T)
        mask = sequence_mask(lengths, n_frames).unsqueeze(1).to(mu.dtype)
        spans = word_frame_spans(text.word_spans, durations) if text.word_spans is not None else None
        return Prior(mu * mask, mask, durations, text.emotion, text.speaker, lengths, spans)

    @torch.no_grad()
    def ground_truth_durations(self, text: TextBatch, mel: Tensor, mel_lengths: Tensor) -> Tensor:
        """Frames per phoneme of a reference mel, by MAS against the model's own `mu` (as in training)."""
        mu_x, _, text_mask = self.encoder(text.ids, text.lengths, self._cond(text.speaker, text.emotion))
        mel_mask = sequence_mask(mel_lengths, mel.shape[-1]).unsqueeze(1).to(mel.dtype)
        return align(mu_x, text_mask, mel, mel_mask).sum(-1).long()

    # ------------------------------------------------------------------ decoder side (stepwise API)

    def score(self, x_t: Tensor, t: Tensor | float, prior: Prior, guidance: float = 1.0, emotion: Tensor | None = None) -> Tensor:
        """s_theta(x_t, mu, t, cond). guidance γ ≠ 1 mixes s_uncond + γ (s_cond - s_uncond)."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        emotion = prior.emotion if emotion is None else emotion
        cond = self._cond(prior.speaker, emotion)
        if guidance == 1.0:
            return self.decoder(x_t, prior.mask, prior.mu, t, cond)
        null = self._cond(prior.speaker, torch.full_like(emotion, self.n_emotions))
        both = self.decoder(torch.cat([x_t, x_t]), torch.cat([prior.mask] * 2), torch.cat([prior.mu] * 2),
                            torch.cat([t, t]), torch.cat([cond, null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def reverse_step_mean(self, x_t: Tensor, t: Tensor | float, h: float, prior: Prior, guidance: float = 1.0) -> tuple[Tensor, Tensor]:
        """Mean and variance of pi_theta(x_{t-h} | x_t): the Gaussian policy of one stochastic step."""
        score = self.score(x_t, t, prior, guidance)
        mean, variance = diffusion.reverse_step_mean(x_t, prior.mu, score, t, h, self.cfg.beta_min, self.cfg.beta_max)
        return mean * prior.mask, variance

    def candidates(
        self, x_t: Tensor, t: Tensor | float, h: float, prior: Prior, k: int,
        generator: torch.Generator | None = None, guidance: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """k next states from the same x_t with ONE score-network call: (k, B, n_feats, T), mean, variance."""
        mean, variance = self.reverse_step_mean(x_t, t, h, prior, guidance)
        noise = torch.randn((k, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
        std = variance.sqrt()
        if std.dim() == 1:  # per-item times
            std = std.reshape(1, -1, *([1] * (mean.dim() - 1)))
        return (mean.unsqueeze(0) + std * noise) * prior.mask, mean, variance

    def x0_estimate(self, x_t: Tensor, t: Tensor | float, prior: Prior, guidance: float = 1.0) -> Tensor:
        score = self.score(x_t, t, prior, guidance)
        return diffusion.x0_estimate(x_t, prior.mu, score, t, self.cfg.beta_min, self.cfg.beta_max) * prior.mask

    def initial_state(self, prior: Prior, temperature: float = 1.5, generator: Generators = None) -> Tensor:
        """X_1 ~ N(mu, I / temperature)."""
        noise = _noise(prior, generator)
        return (prior.mu + noise / temperature) * prior.mask

    @torch.no_grad()
    def sample(
        self, prior: Prior, n_steps: int, temperature: float = 1.5, stochastic: bool = False,
        guidance: float = 1.0, generator: Generators = None, output_level: OutputLevel = "decoder",
    ) -> Tensor:
        """Reverse diffusion from X_1 in n_steps at midpoints t_i = 1 - (i + 0.5) h (Grad-TTS).

        `generator` may be one generator per batch item: then each item's noise is its own (see
        `item_noise`) and its sample does not depend on what it is batched with, or on batch order.
        `output_level="prior"` gives each mel band of the result mu's mean level
        (`diffusion.prior_band_levels`); "decoder" (Grad-TTS) leaves the sampler's.
        """
        h = 1.0 / n_steps
        x = self.initial_state(prior, temperature, generator)
        for i in range(n_steps):
            t = 1.0 - (i + 0.5) * h
            if stochastic:
                mean, variance = self.reverse_step_mean(x, t, h, prior, guidance)
                x = (mean + torch.sqrt(variance) * _noise(prior, generator)) * prior.mask
            else:
                x = self.ode_step(x, t, h, prior, guidance)
        if output_level == "prior":
            x = diffusion.prior_band_levels(x, prior.mu, prior.mask)
        elif output_level != "decoder":
            raise ValueError(f"output_level: {output_level!r} is not 'decoder' or 'prior'")
        return x

    def ode_step(self, x_t: Tensor, t: Tensor | float, h: float, prior: Prior, guidance: float = 1.0) -> Tensor:
        """One deterministic step of the probability-flow ODE from t to t - h (the evaluation's sampler)."""
        score = self.score(x_t, t, prior, guidance)
        return diffusion.ode_step(x_t, prior.mu, score, t, h, self.cfg.beta_min, self.cfg.beta_max) * prior.mask

    # ------------------------------------------------------------------ training

    def compute_loss(
        self, text: TextBatch, mel: Tensor, mel_lengths: Tensor, segment_frames: int,
        generator: torch.Generator | None = None, decoder_items: int | None = None, flat_start: bool = False,
    ) -> dict[str, Tensor]:
        """Duration, prior and diffusion losses of Grad-TTS on a padded batch (mel: (B, n_feats, T)).

        `decoder_items` limits the diffusion loss to the first N items: the encoder and duration
        predictor see the whole batch (cheap), the U-Net (the cost) only N random crops.
        `flat_start` fits `mu` (and the decoder) on `flat_alignment` instead of MAS's; the duration loss
        is 0 then, since even splits are no durations to learn.
        """
        device = mel.device
        cond = self._cond(text.speaker, text.emotion)
        mu_x, log_dur, text_mask = self.encoder(text.ids, text.lengths, cond)
        mel_mask = sequence_mask(mel_lengths, mel.shape[-1]).unsqueeze(1).to(mel.dtype)
        alignment = flat_alignment(text_mask, mel_mask) if flat_start else align(mu_x, text_mask, mel, mel_mask)
        target_log_dur = torch.log(1e-8 + alignment.sum(-1)) * text_mask.squeeze(1)
        duration_loss = ((log_dur.squeeze(1) - target_log_dur).pow(2) * text_mask.squeeze(1)).sum() / text_mask.sum()
        if flat_start:
            duration_loss = duration_loss * 0.0  # keeps the graph (every rank's backward sees the same parameters)
        elif self.cfg.total_duration_weight > 0:
            # Utterance length in log frames, log Σ_i exp(log d_i): speaking rate, which the per-phoneme
            # loss (dominated by phoneme-to-phoneme spread) learns only weakly.
            valid = text_mask.squeeze(1) > 0
            predicted_total = torch.logsumexp(log_dur.squeeze(1).masked_fill(~valid, float("-inf")), dim=1)
            target_total = torch.log(alignment.sum((1, 2)).clamp_min(1.0))
            duration_loss = duration_loss + self.cfg.total_duration_weight * (predicted_total - target_total).pow(2).mean()
        mu_y = mu_x @ alignment  # (B, n_feats, T)
        prior_loss = (0.5 * ((mel - mu_y).pow(2) + math.log(2 * math.pi)) * mel_mask).sum() / (mel_mask.sum() * self.n_feats)

        if decoder_items == 0:  # encoder-only step
            zero = mel.new_zeros(())
            return {"duration": duration_loss, "prior": prior_loss, "diffusion": zero, "total": duration_loss + prior_loss}
        if decoder_items is not None and decoder_items < mel.shape[0]:
            mel, mu_y, mel_lengths = mel[:decoder_items], mu_y[:decoder_items], mel_lengths[:decoder_items]
            text = TextBatch(text.ids[:decoder_items], text.lengths[:decoder_items], text.emotion[:decoder_items],
                             text.speaker[:decoder_items])
        # Random crops for the decoder, as Grad-TTS: the U-Net sees fixed-size segments.
        segment = min(segment_frames, int(math.ceil(mel.shape[-1] / self.length_multiple) * self.length_multiple))
        starts = (torch.rand(mel.shape[0], generator=generator, device="cpu") * (mel_lengths.cpu() - segment).clamp_min(0)).long()
        index = (starts.unsqueeze(1) + torch.arange(segment)).clamp_max(mel.shape[-1] - 1).to(device)
        gather = lambda x: torch.gather(x, 2, index.unsqueeze(1).expand(-1, x.shape[1], -1))  # noqa: E731
        seg_lengths = (mel_lengths.cpu() - starts).clamp(max=segment).to(device)
        seg_mask = sequence_mask(seg_lengths, segment).unsqueeze(1).to(mel.dtype)
        y, mu_seg = gather(mel) * seg_mask, gather(mu_y) * seg_mask

        emotion = text.emotion
        if self.training and self.cfg.emotion_dropout > 0:
            drop = torch.rand(emotion.shape, generator=generator, device="cpu") < self.cfg.emotion_dropout
            emotion = torch.where(drop.to(device), torch.full_like(emotion, self.n_emotions), emotion)
        t = torch.rand(mel.shape[0], generator=generator, device="cpu").clamp(1e-5, 1 - 1e-5).to(device)
        noise = torch.randn(y.shape, generator=generator, device="cpu").to(device) * seg_mask
        x_t = diffusion.diffuse(y, mu_seg, t, noise, self.cfg.beta_min, self.cfg.beta_max) * seg_mask
        score = self.decoder(x_t, seg_mask, mu_seg, t, self._cond(text.speaker, emotion))
        diffusion_loss = diffusion.score_matching_loss(score, noise, t, seg_mask, self.cfg.beta_min, self.cfg.beta_max)
        return {"duration": duration_loss, "prior": prior_loss, "diffusion": diffusion_loss,
                "total": duration_loss + prior_loss + diffusion_loss}
