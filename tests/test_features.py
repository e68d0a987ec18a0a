import librosa
import numpy as np
import pytest
import torch

from rlhf_tts.config import FeatureConfig
from rlhf_tts.data.features import LogMel, log_mel, n_frames


def hifigan_reference(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """HiFi-GAN's mel_spectrogram written with librosa and numpy, independently of the module."""
    pad = (cfg.n_fft - cfg.hop_length) // 2
    y = np.pad(y, (pad, pad), mode="reflect")
    spec = np.abs(librosa.stft(y, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                               window="hann", center=False))
    basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max)
    return np.log(np.maximum(basis @ spec, 1e-5))


def test_matches_the_hifigan_convention():
    cfg = FeatureConfig()
    rng = np.random.default_rng(0)
    y = (0.3 * np.sin(2 * np.pi * 220 * np.arange(22050) / 22050) + 0.05 * rng.standard_normal(22050)).astype(np.float32)
    ours = log_mel(y, cfg)
    ref = hifigan_reference(y, cfg)
    assert ours.shape == ref.shape == (80, n_frames(len(y), cfg))
    # The reference window is periodic Hann, as torch.hann_window; differences are float32 rounding.
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_tone_lands_in_the_right_mel_band():
    cfg = FeatureConfig()
    y = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(22050) / 22050)).astype(np.float32)
    mel = log_mel(y, cfg)
    centres = librosa.mel_frequencies(n_mels=cfg.n_mels + 2, fmin=cfg.f_min, fmax=cfg.f_max)[1:-1]
    assert abs(centres[mel.mean(axis=1).argmax()] - 1000) < 60


def test_batched_equals_single():
    cfg = FeatureConfig()
    extractor = LogMel(cfg)
    batch = torch.randn(3, 8000) * 0.1
    with torch.no_grad():
        together = extractor(batch)
        apart = torch.stack([extractor(x) for x in batch])
    torch.testing.assert_close(together, apart)


@pytest.mark.parametrize("samples", [256, 1000, 22050, 22051])
def test_frame_count_formula(samples):
    cfg = FeatureConfig()
    assert log_mel(np.zeros(samples, np.float32) + 0.01, cfg).shape[1] == n_frames(samples, cfg)
