import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlhf_tts.config import FeatureConfig
from rlhf_tts.data.features import LogMel
from rlhf_tts.models.vocoder import (
    GriffinLimVocoder,
    HiFiGANGenerator,
    HiFiGANVocoder,
    Vocoder,
    load_hifigan,
    make_vocoder,
    save_hifigan_official,
)

SR = 22050

#: The official V1 layout with small channels, so the test model is tiny but every module exists.
SMALL_V1 = {
    "resblock": "1",
    "upsample_rates": [8, 8, 2, 2],
    "upsample_kernel_sizes": [16, 16, 4, 4],
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_mels": 80, "num_freq": 1025, "n_fft": 1024, "hop_size": 256, "win_size": 1024,
    "sampling_rate": 22050, "fmin": 0, "fmax": 8000, "fmax_for_loss": None, "segment_size": 8192,
}


class NotATensor:
    """A custom object: weights-only loading must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = "anything"


def harmonic(seconds: float = 1.0, f0: float = 150.0) -> torch.Tensor:
    """A 150 Hz harmonic tone with a slow raised-cosine amplitude envelope."""
    t = np.arange(int(seconds * SR)) / SR
    envelope = 0.05 + 0.5 * (1 - np.cos(2 * np.pi * 1.5 * t)) / 2
    y = sum((0.6 / k) * np.sin(2 * np.pi * f0 * k * t + 0.3 * k) for k in range(1, 15)) * envelope
    return torch.tensor(0.4 * y / np.abs(y).max(), dtype=torch.float32)


def chirp(seconds: float = 1.0) -> torch.Tensor:
    t = np.arange(int(seconds * SR)) / SR
    y = 0.3 * np.sin(2 * np.pi * (400 + 300 * t) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return torch.tensor(y, dtype=torch.float32)


@pytest.fixture(scope="module")
def cfg() -> FeatureConfig:
    return FeatureConfig()


@pytest.fixture(scope="module")
def extractor(cfg) -> LogMel:
    return LogMel(cfg)


@pytest.fixture(scope="module")
def griffin_lim(cfg) -> GriffinLimVocoder:
    return GriffinLimVocoder(cfg)


# ---------------------------------------------------------------------------------------- Griffin-Lim


def test_griffin_lim_round_trip_preserves_the_mel(cfg, extractor, griffin_lim):
    y = harmonic()
    mel = extractor(y)
    audio = griffin_lim(mel)
    assert audio.shape == (mel.shape[-1] * cfg.hop_length,)
    assert audio.dtype == torch.float32 and audio.abs().max() <= 1.0
    energy = mel.exp().sum(0)
    voiced = energy > 0.01 * energy.max()
    diff = (extractor(audio) - mel).abs().mean(0)[voiced].mean().item()
    control = (extractor(chirp()) - mel).abs().mean(0)[voiced].mean().item()
    # Measured: ~0.26 nats for the round trip, ~3.5 against the unrelated chirp.
    assert diff < 0.4, diff
    assert control > 2.0 and control > 5 * diff, (diff, control)


def test_griffin_lim_is_time_aligned_with_the_input(cfg, extractor, griffin_lim):
    """LogMel centres frame t on t*hop + hop/2, not t*hop; the vocoder must undo that offset."""
    t = np.arange(SR) / SR
    gate = ((t * 4) % 1 < 0.5).astype(np.float64)  # sharp 4 Hz on/off bursts
    y = torch.tensor(0.4 * gate * sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 10)), dtype=torch.float32)
    audio = griffin_lim(extractor(y)).numpy()

    def envelope(x: np.ndarray) -> np.ndarray:
        e = np.convolve(x**2, np.ones(64) / 64, mode="same")
        return e - e.mean()

    a, b = envelope(y.numpy()[: len(audio)]), envelope(audio)
    lags = np.arange(-300, 301)
    xcorr = [np.dot(a[300:-300], np.roll(b, -lag)[300:-300]) for lag in lags]
    # Measured: 2 samples; plain centred Griffin-Lim lands ~100 samples early.
    assert abs(lags[int(np.argmax(xcorr))]) <= 32


def test_griffin_lim_batched_equals_single_and_is_deterministic(cfg, extractor, griffin_lim):
    a, b = harmonic(0.5), harmonic(0.5, f0=220.0)
    mels = extractor(torch.stack([a, b]))
    batched = griffin_lim(mels)
    assert batched.shape == (2, mels.shape[-1] * cfg.hop_length)
    torch.testing.assert_close(batched[0], griffin_lim(mels[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], griffin_lim(mels[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, griffin_lim(mels), atol=0, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_griffin_lim_only_attenuates(cfg, extractor, griffin_lim):
    quiet = griffin_lim(extractor(0.05 * harmonic(0.5)))
    assert 0.005 < quiet.abs().max() < 0.2  # not normalised up to full scale
    loud = griffin_lim(extractor(harmonic(0.5)) + math.log(20.0))  # 20x the magnitude: would clip
    assert loud.abs().max().item() == pytest.approx(1.0, abs=1e-6)


def test_make_vocoder_griffin_lim_and_bad_kind(cfg):
    vocoder = make_vocoder("griffin_lim", cfg)
    assert isinstance(vocoder, GriffinLimVocoder) and isinstance(vocoder, Vocoder)
    assert vocoder.sample_rate == cfg.sample_rate
    with pytest.raises(ValueError, match="griffin_lim, hifigan"):
        make_vocoder("wavenet", cfg)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        make_vocoder("hifigan", cfg)


# ------------------------------------------------------------------------------------------- HiFi-GAN


def small_generator(config: dict = SMALL_V1, seed: int = 0) -> HiFiGANGenerator:
    torch.manual_seed(seed)
    generator = HiFiGANGenerator(config)
    with torch.no_grad():  # louder output, so that comparisons below are far from trivially small
        generator.conv_post.weight_g.mul_(100.0)
    return generator


def test_generator_has_the_official_parameter_names_and_shapes():
    state = small_generator().state_dict()
    # 4 upsampling stages x 3 kernel sizes = 12 ResBlock1s, each with convs1/convs2 of 3 convs.
    assert {"conv_pre.weight_g", "conv_pre.weight_v", "conv_pre.bias", "ups.3.weight_g",
            "resblocks.0.convs1.0.weight_v", "resblocks.11.convs2.2.weight_g", "conv_post.weight_v"} <= set(state)
    assert not any(k.startswith("resblocks.12.") for k in state)
    assert not any("parametrizations" in k for k in state)
    assert state["conv_pre.weight_v"].shape == (32, 80, 7)
    assert state["ups.0.weight_v"].shape == (32, 16, 16)  # ConvTranspose1d: (in, out, kernel)
    assert state["ups.0.weight_g"].shape == (32, 1, 1)
    assert state["resblocks.11.convs1.2.weight_v"].shape == (2, 2, 11)
    assert state["conv_post.weight_v"].shape == (1, 2, 7)
    assert len(state) == 3 + 4 * 3 + 12 * 6 * 3 + 3


def reference_forward(state: dict, config: dict, mel: torch.Tensor) -> torch.Tensor:
    """The official ResBlock1 Generator written out with functional ops on a `weight_g`/`weight_v` state
    dict: weight = g * v / ||v||, the norm over every dim but 0 (legacy `weight_norm`, dim=0)."""
    F = torch.nn.functional

    def weight(name: str) -> torch.Tensor:
        v, g = state[f"{name}.weight_v"], state[f"{name}.weight_g"]
        return g * v / v.norm(dim=tuple(range(1, v.dim())), keepdim=True)

    def conv(x: torch.Tensor, name: str, dilation: int = 1) -> torch.Tensor:
        w = weight(name)
        pad = (w.shape[-1] * dilation - dilation) // 2
        return F.conv1d(x, w, state[f"{name}.bias"], dilation=dilation, padding=pad)

    x = conv(mel, "conv_pre")
    n_k = len(config["resblock_kernel_sizes"])
    for i, (u, k) in enumerate(zip(config["upsample_rates"], config["upsample_kernel_sizes"])):
        x = F.conv_transpose1d(F.leaky_relu(x, 0.1), weight(f"ups.{i}"), state[f"ups.{i}.bias"],
                               stride=u, padding=(k - u) // 2)
        total = 0
        for j, dilations in enumerate(config["resblock_dilation_sizes"]):
            h = x
            for n, d in enumerate(dilations):
                t = conv(F.leaky_relu(h, 0.1), f"resblocks.{i * n_k + j}.convs1.{n}", d)
                h = h + conv(F.leaky_relu(t, 0.1), f"resblocks.{i * n_k + j}.convs2.{n}")
            total = total + h
        x = total / n_k
    return torch.tanh(conv(F.leaky_relu(x, 0.01), "conv_post"))


def test_generator_matches_a_functional_reference():
    generator = small_generator()
    mel = torch.randn(2, 80, 16, generator=torch.Generator().manual_seed(4)) - 4.0
    with torch.no_grad():
        expected = reference_forward(generator.state_dict(), SMALL_V1, mel)
        ours = generator(mel)
    assert ours.shape == expected.shape == (2, 1, 16 * 256)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_hifigan_official_checkpoint_round_trip(tmp_path):
    generator = small_generator()
    mel = torch.randn(2, 80, 24, generator=torch.Generator().manual_seed(1)) - 4.0
    with torch.no_grad():
        expected = generator(mel).squeeze(1)
    path = save_hifigan_official(generator, SMALL_V1, tmp_path)
    assert path.name == "g_00000000" and (tmp_path / "config.json").is_file()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"generator"} and "conv_pre.weight_g" in saved["generator"]

    vocoder = load_hifigan(tmp_path)
    assert isinstance(vocoder, HiFiGANVocoder) and isinstance(vocoder, Vocoder)
    assert vocoder.sample_rate == 22050 and not vocoder.training
    assert "conv_pre.weight" in vocoder.generator.state_dict()  # weight norm folded for inference
    audio = vocoder(mel)
    assert audio.shape == (2, 24 * 256) and not audio.requires_grad
    assert expected.std() > 0.05  # the comparison below is not between two near-zero signals
    torch.testing.assert_close(audio, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(vocoder(mel[1]), expected[1], atol=1e-5, rtol=0)
    # The file path and an explicit config give the same model.
    torch.testing.assert_close(load_hifigan(path, tmp_path / "config.json")(mel), audio, atol=0, rtol=0)
    # A different generator really gives different audio.
    assert (small_generator(seed=1)(mel).squeeze(1) - expected).abs().max() > 0.01


def test_hifigan_directory_picks_the_newest_generator(tmp_path):
    save_hifigan_official(small_generator(seed=0), SMALL_V1, tmp_path)
    newer = small_generator(seed=1)
    torch.save({"generator": newer.state_dict()}, tmp_path / "g_00002500")
    mel = torch.randn(1, 80, 8, generator=torch.Generator().manual_seed(2)) - 4.0
    with torch.no_grad():
        expected = newer(mel).squeeze(1)
    torch.testing.assert_close(load_hifigan(tmp_path)(mel), expected, atol=1e-5, rtol=0)


def test_hifigan_from_safetensors_and_resblock2(tmp_path):
    config = dict(SMALL_V1, resblock="2", resblock_dilation_sizes=[[1, 3], [1, 3], [1, 3]])
    generator = small_generator(config)
    assert "resblocks.0.convs.1.weight_g" in generator.state_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(tmp_path / "generator.safetensors"))
    mel = torch.randn(1, 80, 10, generator=torch.Generator().manual_seed(3)) - 4.0
    with torch.no_grad():
        expected = generator(mel).squeeze(1)
    for source in (tmp_path, tmp_path / "generator.safetensors"):
        audio = load_hifigan(source)(mel)
        assert audio.shape == (1, 10 * 256)
        torch.testing.assert_close(audio, expected, atol=1e-5, rtol=0)


def test_make_vocoder_hifigan_checks_the_features(tmp_path, cfg):
    save_hifigan_official(small_generator(), SMALL_V1, tmp_path / "ok")
    assert isinstance(make_vocoder("hifigan", cfg, str(tmp_path / "ok")), HiFiGANVocoder)
    # A consistent checkpoint trained at hop 128 cannot vocode the project's hop-256 mels.
    hop128 = dict(SMALL_V1, upsample_rates=[8, 8, 2], upsample_kernel_sizes=[16, 16, 4], hop_size=128)
    save_hifigan_official(small_generator(hop128), hop128, tmp_path / "hop128")
    assert load_hifigan(tmp_path / "hop128").hop_length == 128
    with pytest.raises(ValueError, match=r"hop_length=256 but HiFi-GAN hop_size=128"):
        make_vocoder("hifigan", cfg, tmp_path / "hop128")


# ------------------------------------------------------------------------------------------- errors


def test_missing_key_is_named(tmp_path):
    save_hifigan_official(small_generator(), SMALL_V1, tmp_path)
    state = small_generator().state_dict()
    del state["resblocks.3.convs1.1.weight_g"]
    torch.save({"generator": state}, tmp_path / "g_00000000")
    with pytest.raises(ValueError, match=r"missing key.*resblocks\.3\.convs1\.1\.weight_g") as err:
        load_hifigan(tmp_path)
    assert "\n" not in str(err.value)


def test_architecture_mismatch_names_unexpected_keys(tmp_path):
    save_hifigan_official(small_generator(), SMALL_V1, tmp_path)
    # The config says two kernel sizes per stage: the checkpoint's resblocks 8..11 do not fit.
    smaller = dict(SMALL_V1, resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]])
    (tmp_path / "config.json").write_text(json.dumps(smaller))
    with pytest.raises(ValueError, match=r"unexpected key.*resblocks\.(8|9|10|11)\."):
        load_hifigan(tmp_path)


def test_config_without_audio_keys_is_refused(tmp_path):
    save_hifigan_official(small_generator(), {k: v for k, v in SMALL_V1.items() if k != "sampling_rate"}, tmp_path)
    with pytest.raises(ValueError, match="sampling_rate"):
        load_hifigan(tmp_path)
    with pytest.raises(ValueError, match="config"):
        load_hifigan(tmp_path / "g_00000000", tmp_path / "nowhere.json")


def test_pickled_objects_are_refused(tmp_path):
    save_hifigan_official(small_generator(), SMALL_V1, tmp_path)
    torch.save({"generator": small_generator().state_dict(), "evil": NotATensor()}, tmp_path / "g_00000000")
    with pytest.raises(ValueError, match=r"weights-only.*NotATensor") as err:
        load_hifigan(tmp_path)
    assert "\n" not in str(err.value)


def test_unreadable_files_are_value_errors(tmp_path):
    save_hifigan_official(small_generator(), SMALL_V1, tmp_path)
    (tmp_path / "g_00000000").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="g_00000000: not a readable torch file"):
        load_hifigan(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_hifigan(tmp_path / "missing")
    (tmp_path / "bad.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        load_hifigan(tmp_path / "bad.safetensors")


def test_reference_mel_pseudo_inverse_matches_librosa(cfg, griffin_lim):
    """The vocoder inverts the same Slaney filterbank LogMel (and librosa) uses."""
    import librosa

    basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max)
    product = torch.from_numpy(basis).double() @ griffin_lim.inverse.double()
    torch.testing.assert_close(product, torch.eye(cfg.n_mels, dtype=torch.float64), atol=1e-4, rtol=0)


def test_griffin_lim_gives_finite_audio_for_a_diverged_mel(cfg, griffin_lim):
    """A diverged policy's log-mels (90 overflows exp in float32; NaN frames) still vocode to
    finite audio in [-1, 1], so one bad system cannot turn a whole report's column to NaN."""
    mel = torch.full((cfg.n_mels, 40), -5.0)
    mel[:, 10:20] = 90.0
    mel[:, 25] = float("nan")
    audio = griffin_lim(mel)
    assert torch.isfinite(audio).all() and audio.abs().max() <= 1.0 and audio.abs().max() > 0.1
