"""Grad-TTS's text encoder and duration predictor, conditioned on speaker and emotion.

Phoneme embeddings → conv prenet → transformer encoder → per-phoneme `mu` (n_feats) and log
durations. Grad-TTS uses relative-position attention; this uses absolute sinusoidal positions after
the conv prenet (which already sees local order), so torch's fused TransformerEncoderLayer applies.
The condition vector (speaker + emotion) is concatenated to the encoder output before the `mu`
projection and the duration predictor, as Grad-TTS does for speakers: emotion changes rate and
pitch, so both heads need it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor


def sequence_mask(lengths: Tensor, max_length: int | None = None) -> Tensor:
    max_length = int(max_length or lengths.max())
    return torch.arange(max_length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class ConvReluNorm(nn.Module):
    def __init__(self, channels: int, layers: int = 3, kernel: int = 5, dropout: float = 0.5) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=kernel // 2) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        residual = x
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x * mask)
            x = self.dropout(torch.relu(norm(x.transpose(1, 2)).transpose(1, 2)))
        return (residual + self.proj(x)) * mask


class DurationPredictor(nn.Module):
    def __init__(self, in_channels: int, filter_channels: int, kernel: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, filter_channels, kernel, padding=kernel // 2)
        self.norm1 = nn.LayerNorm(filter_channels)
        self.conv2 = nn.Conv1d(filter_channels, filter_channels, kernel, padding=kernel // 2)
        self.norm2 = nn.LayerNorm(filter_channels)
        self.proj = nn.Conv1d(filter_channels, 1, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.dropout(self.norm1(torch.relu(self.conv1(x * mask)).transpose(1, 2)).transpose(1, 2))
        x = self.dropout(self.norm2(torch.relu(self.conv2(x * mask)).transpose(1, 2)).transpose(1, 2))
        return self.proj(x * mask) * mask


class TextEncoder(nn.Module):
    def __init__(
        self, n_vocab: int, n_feats: int, channels: int, filter_channels: int, layers: int, heads: int,
        dropout: float, duration_filter_channels: int, cond_dim: int,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.embedding = nn.Embedding(n_vocab, channels)
        nn.init.normal_(self.embedding.weight, 0.0, channels**-0.5)
        self.prenet = ConvReluNorm(channels)
        layer = nn.TransformerEncoderLayer(channels, heads, filter_channels, dropout, activation="relu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj_mu = nn.Conv1d(channels + cond_dim, n_feats, 1)
        self.duration = DurationPredictor(channels + cond_dim, duration_filter_channels)

    def positions(self, length: int, device: torch.device) -> Tensor:
        position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, self.channels, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / self.channels))
        table = torch.zeros(length, self.channels, device=device)
        table[:, 0::2] = torch.sin(position * div)
        table[:, 1::2] = torch.cos(position * div[: self.channels // 2])
        return table

    def forward(self, ids: Tensor, lengths: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids (B, T) → mu (B, n_feats, T), log durations (B, 1, T), mask (B, 1, T)."""
        mask = sequence_mask(lengths, ids.shape[1]).unsqueeze(1).to(cond.dtype)
        x = self.embedding(ids) * math.sqrt(self.channels)
        x = self.prenet(x.transpose(1, 2), mask).transpose(1, 2)
        x = x + self.positions(ids.shape[1], ids.device)
        x = self.encoder(x, src_key_padding_mask=~mask.squeeze(1).bool()).transpose(1, 2) * mask
        x = torch.cat([x, cond.unsqueeze(-1).expand(-1, -1, x.shape[-1])], dim=1)
        mu = self.proj_mu(x) * mask
        log_durations = self.duration(x.detach(), mask)
        return mu, log_durations, mask
