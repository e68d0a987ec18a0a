"""Shared fixtures: a smoke-sized synthetic corpus built once per session, and an ESD-layout folder
with every defect the reader must quarantine."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rlhf_tts.config import RunConfig, load_config


def smoke_config(tmp: Path, *extra: str) -> RunConfig:
    return load_config(None, ["preset=smoke", f"output_dir={tmp / 'out'}", f"cache_dir={tmp / 'cache'}",
                              "tracking.enabled=false", *extra])


@pytest.fixture(scope="session")
def smoke_dataset(tmp_path_factory):
    from rlhf_tts.data.pipeline import build_dataset

    tmp = tmp_path_factory.mktemp("smoke")
    cfg = smoke_config(tmp)
    return cfg, build_dataset(cfg)


def speech(text: str, voice: str = "en-us+m3", rate: int = 16000) -> np.ndarray:
    """Real speech from eSpeak, resampled to `rate` (ESD ships 16 kHz files)."""
    import torch
    import torchaudio.functional as AF

    from rlhf_tts.data.espeak import Espeak

    out = Espeak.instance().synthesize(text, voice)
    audio = torch.from_numpy(out.audio.astype(np.float32) / 32768.0)
    return AF.resample(audio, out.sample_rate, rate).numpy()


GOOD = {
    "0011_000001": ("Neutral", "The cat sat on the mat."),
    "0011_000002": ("Neutral", "We left at 7 o'clock."),
    "0011_000351": ("Angry", "Close the door right now!"),
    "0011_000701": ("Happy", "What a lovely day it is."),
    "0011_001051": ("Sad", "Nobody came to the party."),
    "0011_001401": ("Surprise", "You bought a new car?"),
}

#: Every defect the reader must catch: file name → (emotion folder, expected reason fragment).
DEFECTS = {
    "0011_000003": ("Neutral", "empty file"),
    "0011_000004": ("Neutral", "not a WAV file"),
    "0011_000005": ("Neutral", "truncated WAV"),
    "0011_000006": ("Neutral", "silent audio"),
    "0011_000007": ("Neutral", "no transcript line"),
    "0011_000008": ("Neutral", "empty transcript text"),
    "0011_000009": ("Bored", "unknown emotion directory"),
    "0011_000010": ("Neutral", "not valid UTF-8"),
}


def make_defective_esd(root: Path) -> Path:
    """An ESD-layout folder: six good utterances (one stereo, all 16 kHz) and one of each defect."""
    spk = root / "0011"
    for emotion in ("Neutral", "Angry", "Happy", "Sad", "Surprise", "Bored"):
        (spk / emotion).mkdir(parents=True, exist_ok=True)
    lines = []
    for utt_id, (emotion, text) in GOOD.items():
        audio = speech(text)
        if utt_id == "0011_000002":
            audio = np.stack([audio, 0.5 * audio], axis=1)  # stereo: must be downmixed
        sf.write(spk / emotion / f"{utt_id}.wav", audio, 16000, subtype="PCM_16")
        lines.append(f"{utt_id}\t{text}\t{emotion}".encode())
    d = {k: spk / v[0] / f"{k}.wav" for k, v in DEFECTS.items()}
    d["0011_000003"].write_bytes(b"")
    d["0011_000004"].write_text("this is a text file pretending to be audio\n")
    sf.write(d["0011_000005"], speech("A clip that was cut off."), 16000, subtype="PCM_16")
    d["0011_000005"].write_bytes(d["0011_000005"].read_bytes()[:3000])
    with wave.open(str(d["0011_000006"]), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"\0\0" * 16000)
    sf.write(d["0011_000007"], speech("Nobody wrote this line down."), 16000)
    sf.write(d["0011_000008"], speech("The text of this one is empty."), 16000)
    sf.write(d["0011_000009"], speech("Bored is not an ESD emotion."), 16000)
    sf.write(d["0011_000010"], speech("Cafe in a bad encoding."), 16000)
    lines.append(b"0011_000003\tThis file is empty.\tNeutral")
    lines.append(b"0011_000004\tThis file is not audio.\tNeutral")
    lines.append(b"0011_000005\tA clip that was cut off.\tNeutral")
    lines.append(b"0011_000006\tSilence is golden.\tNeutral")
    lines.append(b"0011_000008\t\tNeutral")
    lines.append(b"0011_000009\tBored is not an ESD emotion.\tNeutral")
    lines.append(b"0011_000010\tCaf\xe9 in a bad encoding.\tNeutral")  # Latin-1, not UTF-8
    (spk / "0011.txt").write_bytes(b"\n".join(lines) + b"\n")
    return root
