"""EASPM: the emotion-aware stepwise preference model (METHOD §2), a two-tower contrastive scorer.

Audio tower: masked mel states (n_feats × T) → conv front end (stride-2 down-sampling) → transformer
blocks modulated by the diffusion time with adaLN/FiLM, `h ← h + g ⊙ f(LN(h)(1 + scale) + shift)`,
`(shift, scale, g)` from an MLP of a sinusoidal embedding of t → masked attentive pooling → `a`.
Prompt tower: an emotion prompt ("a happy voice", or free text) → word tokens → a small transformer
→ masked mean → `u`. Score `S(c, x, t) = exp(logit_scale) · cos(a, u)`.

Choices (METHOD §2 leaves them open):
- The time modulation's last layer is zero-initialised and the gate is `g = 1 + Δg`, so at
  initialisation every block is an ordinary pre-LN transformer block and the output does not depend
  on t: training starts from the *untimed* encoder (DiT's adaLN-Zero would instead start every
  block as the identity, throwing the encoder away).
- No pretrained text encoder is available offline, so the prompt tower is trained from scratch over
  a closed word vocabulary built from paraphrase templates and emotion synonyms (`PROMPT_WORDS`);
  any free-text prompt is accepted and words outside the vocabulary map to `<unk>`.
- Everything is per item and masked (LayerNorm, masked attention and pooling, no batch statistics),
  so a score never depends on what else is in the batch or on how much padding follows an item.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_tts.config import EASPMConfig
from rlhf_tts.data.emotions import EMOTIONS

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------ prompts

#: Synonyms per ESD emotion; the first is the canonical word of the default prompt.
EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "Neutral": ("neutral", "calm", "plain", "flat", "matter-of-fact", "unemotional"),
    "Angry": ("angry", "furious", "mad", "irritated", "annoyed", "enraged"),
    "Happy": ("happy", "cheerful", "joyful", "glad", "delighted", "pleased"),
    "Sad": ("sad", "sorrowful", "unhappy", "gloomy", "miserable", "downcast"),
    "Surprise": ("surprised", "astonished", "amazed", "shocked", "startled", "stunned"),
}

#: Paraphrase templates; `{a}` is the article matching the adjective.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "{a} {adj} voice",
    "{adj} speech",
    "a voice that sounds {adj}",
    "the speaker sounds {adj}",
    "someone speaking in {a} {adj} tone",
    "{a} {adj} tone of voice",
    "spoken in {a} {adj} way",
    "this person is {adj}",
)

_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")
PAD, UNK = "<pad>", "<unk>"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render_prompt(template: str, adjective: str) -> str:
    return template.format(a=_article(adjective), adj=adjective)


def default_prompt(emotion: str) -> str:
    """The prompt a reward uses for an emotion index when the request gives none: "a happy voice"."""
    return render_prompt(PROMPT_TEMPLATES[0], EMOTION_WORDS[emotion][0]) if emotion in EMOTION_WORDS else f"a {emotion.lower()} voice"


def paraphrases(emotion: str) -> list[str]:
    """Every template × synonym prompt of an emotion (the training distribution of the prompt tower)."""
    words = EMOTION_WORDS.get(emotion, (emotion.lower(),))
    return [render_prompt(t, w) for t in PROMPT_TEMPLATES for w in words]


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def prompt_vocabulary(emotions: Sequence[str] = EMOTIONS) -> tuple[str, ...]:
    """PAD, UNK, then every word of every paraphrase, sorted: fixed for a given emotion set."""
    words = {w for e in emotions for p in paraphrases(e) for w in tokenize(p)}
    return (PAD, UNK, *sorted(words))


class PromptTokenizer:
    """Words → ids over a closed vocabulary; unknown words → `<unk>`, so free text is always accepted."""

    def __init__(self, words: Sequence[str], max_tokens: int = 32) -> None:
        if tuple(words[:2]) != (PAD, UNK):
            raise ValueError("prompt vocabulary must start with <pad>, <unk>")
        self.words = tuple(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, text: str) -> list[int]:
        ids = [self.index.get(w, 1) for w in tokenize(text)][: self.max_tokens]
        return ids or [1]  # an empty prompt is one <unk>, never an empty sequence

    def batch(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        seqs = [self.ids(p) for p in prompts]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        return ids.to(device), lengths.to(device)


# ------------------------------------------------------------------------------------ building blocks

def own_level(states: Tensor, mask: Tensor) -> Tensor:
    """Each state's mean over its valid bins and frames (N, 1, 1): in log-mel units, its level."""
    valid = (mask.sum(dim=(1, 2), keepdim=True) * states.shape[1]).clamp_min(1.0)
    return (states * mask).sum(dim=(1, 2), keepdim=True) / valid


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Grad-TTS's time embedding (t in [0, 1] scaled by 1000), (N,) → (N, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / max(half - 1, 1)))
    angles = scale * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class MaskedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """x (N, L, D); key_mask (N, L) bool, True where valid."""
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(n, length, dim))


class TimeModulatedBlock(nn.Module):
    """Pre-LN transformer block with adaLN/FiLM from the time embedding on both sub-layers:
    `h ← h + g ⊙ f(LN(h)(1 + scale) + shift)`, `g = 1 + Δg`, with (shift, scale, Δg) zero at init."""

    def __init__(self, dim: int, heads: int, ff_mult: int, time_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = MaskedSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.modulation = nn.Linear(time_dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, key_mask: Tensor, time: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(time).unsqueeze(1).chunk(6, dim=-1)
        h = h + (1 + gate1) * self.drop(self.attn(self.norm1(h) * (1 + scale1) + shift1, key_mask))
        h = h + (1 + gate2) * self.drop(self.ff(self.norm2(h) * (1 + scale2) + shift2))
        return h


class AudioTower(nn.Module):
    """Masked mel states (N, n_feats, T) at times t (N,) → embeddings (N, embed_dim)."""

    def __init__(self, cfg: EASPMConfig, n_feats: int) -> None:
        super().__init__()
        dim, k = cfg.dim, cfg.conv_kernel
        self.downsample_layers = cfg.downsample_layers
        self.input = nn.Conv1d(n_feats, dim, k, padding=k // 2)
        self.down = nn.ModuleList(nn.Conv1d(dim, dim, k, stride=2, padding=k // 2) for _ in range(cfg.downsample_layers))
        self.time_dim = cfg.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, 4 * cfg.time_dim), nn.SiLU(), nn.Linear(4 * cfg.time_dim, cfg.time_dim), nn.SiLU())
        # No absolute positions: the convolutions see local context, emotion is a property of the
        # whole utterance, and the reward scores whole utterances longer than the training crops.
        self.blocks = nn.ModuleList(
            TimeModulatedBlock(dim, cfg.heads, cfg.ff_mult, cfg.time_dim, cfg.dropout) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.final_modulation = nn.Linear(cfg.time_dim, 2 * dim)  # (shift, scale) of the pooled features' LN
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        self.pool_score = nn.Linear(dim, 1)
        self.project = nn.Linear(2 * dim, cfg.embed_dim)

    def forward(self, x: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        mask = mask.to(x.dtype)
        h = F.gelu(self.input(x * mask)) * mask
        for conv in self.down:
            mask = mask[..., ::2]  # frame j of a stride-2 conv (kernel k, padding k//2) is centred on 2j
            h = F.gelu(conv(h)) * mask
        h = h.transpose(1, 2)  # (N, L, D)
        valid = mask[:, 0] > 0  # (N, L)
        time = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        for block in self.blocks:
            h = block(h, valid, time)
        shift, scale = self.final_modulation(time).unsqueeze(1).chunk(2, dim=-1)
        h = self.final_norm(h) * (1 + scale) + shift
        # Attentive pooling (masked softmax over valid frames) next to a masked mean.
        weights = self.pool_score(h).squeeze(-1).masked_fill(~valid, float("-inf")).softmax(dim=-1)
        attentive = (weights.unsqueeze(-1) * h).sum(1)
        counts = valid.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
        mean = (h * valid.unsqueeze(-1)).sum(1) / counts
        return self.project(torch.cat([attentive, mean], dim=-1))


class PromptTower(nn.Module):
    """Token ids (N, L) with lengths → embeddings (N, embed_dim)."""

    def __init__(self, cfg: EASPMConfig, n_words: int, max_tokens: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_words, cfg.text_dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, max_tokens, cfg.text_dim))
        nn.init.normal_(self.position, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.text_dim, cfg.text_heads, 2 * cfg.text_dim, cfg.dropout, batch_first=True, norm_first=True)
            for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(cfg.text_dim)
        self.project = nn.Linear(cfg.text_dim, cfg.embed_dim)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        valid = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        h = self.embedding(ids) + self.position[:, : ids.shape[1]]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~valid)
        h = self.norm(h) * valid.unsqueeze(-1)
        return self.project(h.sum(1) / lengths.clamp_min(1).unsqueeze(1).to(h.dtype))


# ------------------------------------------------------------------------------------------- model

class EASPM(nn.Module):
    """Two-tower time-conditioned preference model: `score(prompt, x_t, mask, t) = e^s · cos(a, u)`.

    `mel_mean`/`mel_std` (per mel bin, from the training split) standardise the input; they are
    buffers, saved with the weights. `emotions` fixes which default prompt an emotion index means.
    """

    def __init__(self, cfg: EASPMConfig, n_feats: int = 80, emotions: Sequence[str] = EMOTIONS,
                 words: Sequence[str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_feats = n_feats
        self.emotions = tuple(emotions)
        self.tokenizer = PromptTokenizer(words if words is not None else prompt_vocabulary(self.emotions))
        self.audio = AudioTower(cfg, n_feats)
        self.prompt = PromptTower(cfg, len(self.tokenizer), self.tokenizer.max_tokens)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.register_buffer("mel_mean", torch.zeros(n_feats, 1))
        self.register_buffer("mel_std", torch.ones(n_feats, 1))

    @property
    def input_kind(self) -> str:
        return self.cfg.input

    def set_normalisation(self, mean: Tensor, std: Tensor) -> None:
        self.mel_mean.copy_(mean.reshape(-1, 1))
        self.mel_std.copy_(std.reshape(-1, 1).clamp_min(1e-3))

    def scale(self) -> Tensor:
        """exp(logit_scale), clamped to [1, logit_scale_max] (CLIP clamps at 100)."""
        return self.logit_scale.clamp(0.0, math.log(self.cfg.logit_scale_max)).exp()

    def embed_audio(self, states: Tensor, mask: Tensor, t: Tensor | float) -> Tensor:
        """Unit-norm audio embeddings of masked states (N, n_feats, T) at times t → (N, embed_dim)."""
        t = torch.as_tensor(t, dtype=states.dtype, device=states.device).reshape(-1).expand(states.shape[0])
        if self.cfg.level_invariant:
            states = states - own_level(states, mask) + self.mel_mean.mean()  # recentred where the stats expect it
        x = (states - self.mel_mean) / self.mel_std * mask
        return F.normalize(self.audio(x, mask, t), dim=-1)

    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm prompt embeddings (P, embed_dim)."""
        ids, lengths = self.tokenizer.batch(prompts, self.logit_scale.device)
        return F.normalize(self.prompt(ids, lengths), dim=-1)

    def default_prompts(self) -> list[str]:
        return [default_prompt(e) for e in self.emotions]

    def logits(self, audio: Tensor, prompts: Tensor) -> Tensor:
        """All-pairs scores (N, P) from unit embeddings."""
        return self.scale() * audio @ prompts.T

    def score(self, prompts: Sequence[str] | Tensor, states: Tensor, mask: Tensor, t: Tensor | float) -> Tensor:
        """S(c_i, x_i, t_i) per item (N,): `prompts` are N strings or N unit prompt embeddings."""
        u = self.embed_prompts(prompts) if not isinstance(prompts, Tensor) else prompts
        return self.scale() * (self.embed_audio(states, mask, t) * u).sum(-1)
