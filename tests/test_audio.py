import io
import struct
import wave

import numpy as np
import pytest
import soundfile as sf

from rlhf_tts.data.audio import AudioDefect, check_riff, load_audio


def wav_bytes(samples: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


TONE = (0.3 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)).astype(np.float32)


def test_good_wav_is_resampled_and_downmixed(tmp_path):
    path = tmp_path / "x.wav"
    path.write_bytes(wav_bytes(np.stack([TONE, TONE * 0.0], axis=1)))
    audio = load_audio(path, 22050)
    assert audio.source_sample_rate == 16000 and audio.source_channels == 2 and audio.sample_rate == 22050
    assert abs(audio.duration_s - 1.0) < 1e-3
    assert np.max(np.abs(audio.samples)) == pytest.approx(0.15, abs=0.01)  # mean of the two channels


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"ID3\x03\x00 this is an mp3 really", "not a WAV file"),
        (wav_bytes(TONE)[:2000], "truncated WAV"),
        (wav_bytes(TONE)[:30], "truncated"),
        (wav_bytes(TONE)[:44], "truncated WAV: header declares 32000"),
        (wav_bytes(TONE)[:40] + struct.pack("<I", 0), "empty data chunk"),
    ],
)
def test_riff_defects(data, reason):
    with pytest.raises(AudioDefect, match=reason):
        check_riff(data)


def test_silent_and_nonfinite(tmp_path):
    silent = tmp_path / "s.wav"
    silent.write_bytes(wav_bytes(np.zeros(16000, np.float32)))
    with pytest.raises(AudioDefect, match="silent"):
        load_audio(silent, 22050)
    bad = tmp_path / "n.wav"
    samples = TONE.copy()
    samples[100] = np.nan
    bad.write_bytes(wav_bytes(samples, subtype="FLOAT"))
    with pytest.raises(AudioDefect, match="non-finite"):
        load_audio(bad, 22050)


def test_streamed_wav_with_unknown_size_is_accepted(tmp_path):
    data = bytearray(wav_bytes(TONE))
    data_at = data.index(b"data")
    data[data_at + 4 : data_at + 8] = struct.pack("<I", 0xFFFFFFFF)
    check_riff(bytes(data))


def test_stdlib_written_wav_reads(tmp_path):
    path = tmp_path / "w.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(22050)
        w.writeframes((TONE * 32767).astype("<i2").tobytes())
    assert load_audio(path, 22050).samples.shape == (16000,)
