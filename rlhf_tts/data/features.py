"""Log-mel features in the Grad-TTS / HiFi-GAN convention.

Reflect padding of (n_fft - hop) / 2 with `center=False`, magnitude (not power) spectrogram, Slaney
mel filters, natural log clamped at 1e-5: exactly what HiFi-GAN's `mel_spectrogram` computes, so a
user's HiFi-GAN checkpoint vocodes these mels without retraining.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.functional as AF

from rlhf_tts.config import FeatureConfig


class LogMel(torch.nn.Module):
    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.cfg = cfg
        fbanks = AF.melscale_fbanks(
            n_freqs=cfg.n_fft // 2 + 1, f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels,
            sample_rate=cfg.sample_rate, norm="slaney", mel_scale="slaney",
        )
        self.register_buffer("fbanks", fbanks.T.contiguous(), persistent=False)  # (n_mels, n_freqs)
        self.register_buffer("window", torch.hann_window(cfg.win_length), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(..., samples) float audio in [-1, 1] → (..., n_mels, frames) log-mel."""
        pad = (self.cfg.n_fft - self.cfg.hop_length) // 2
        shape = audio.shape[:-1]
        mode = "reflect" if audio.shape[-1] > pad else "constant"  # reflect needs more samples than pad
        x = torch.nn.functional.pad(audio.reshape(-1, 1, audio.shape[-1]), (pad, pad), mode=mode).squeeze(1)
        spec = torch.stft(
            x, self.cfg.n_fft, hop_length=self.cfg.hop_length, win_length=self.cfg.win_length,
            window=self.window, center=False, return_complex=True,
        )
        magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
        mel = torch.log(torch.clamp(self.fbanks @ magnitude, min=1e-5))
        return mel.reshape(*shape, self.cfg.n_mels, mel.shape[-1])


def n_frames(n_samples: int, cfg: FeatureConfig) -> int:
    pad = (cfg.n_fft - cfg.hop_length) // 2
    return (n_samples + 2 * pad - cfg.n_fft) // cfg.hop_length + 1


def log_mel(samples: np.ndarray, cfg: FeatureConfig, extractor: LogMel | None = None) -> np.ndarray:
    """Convenience for one mono float32 clip → (n_mels, frames) float32."""
    extractor = extractor or LogMel(cfg)
    with torch.no_grad():
        return extractor(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))).numpy()
