"""Reading speech audio defensively: every way a file can be unusable becomes an `AudioDefect` reason.

The RIFF chunk walk exists because decoders are lenient: libsndfile reads a truncated WAV as a shorter
one without complaint, and a corpus with silently clipped utterances trains a model on wrong
durations. Everything that passes is returned mono, float32, at the requested rate.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


class AudioDefect(ValueError):
    """A file that cannot be used as speech; the message is the quarantine reason."""


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32, mono, at `sample_rate`
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    sha1: str  # of the file's bytes, so a changed file is a changed utterance

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def check_riff(data: bytes) -> None:
    """Raise AudioDefect unless `data` is a complete RIFF/WAVE file with an audio data chunk."""
    if len(data) == 0:
        raise AudioDefect("empty file (0 bytes)")
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        raise AudioDefect(f"not a WAV file (starts with {data[:12]!r})")
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (size,) = struct.unpack("<I", data[offset + 4 : offset + 8])
        body = offset + 8
        available = len(data) - body
        if chunk_id == b"data":
            if size in (0xFFFFFFFF, 0) and available > 0:  # streamed WAV: size unknown, runs to the end
                return
            if size > available:
                raise AudioDefect(f"truncated WAV: header declares {size} audio bytes, file holds {available}")
            if size == 0:
                raise AudioDefect("WAV has an empty data chunk (no samples)")
            return
        if size > available:
            raise AudioDefect(f"truncated WAV: '{chunk_id.decode(errors='replace')}' chunk runs past the end")
        offset = body + size + (size & 1)
    raise AudioDefect("WAV has no data chunk (truncated header)")


def _resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    if source_rate == target_rate:
        return samples
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(samples), source_rate, target_rate).numpy()


def load_audio(path: str | Path, sample_rate: int, silence_peak: float = 1e-3) -> Audio:
    """Decode a WAV to mono float32 at `sample_rate`; raise AudioDefect with a reason otherwise."""
    data = Path(path).read_bytes()
    check_riff(data)
    try:
        samples, source_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioDefect(f"undecodable WAV ({err})") from None
    if samples.shape[0] == 0:
        raise AudioDefect("WAV has no samples")
    channels = samples.shape[1]
    mono = samples.mean(axis=1) if channels > 1 else samples[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioDefect("non-finite samples (NaN or inf)")
    peak = float(np.max(np.abs(mono)))
    if peak < silence_peak:
        raise AudioDefect(f"silent audio (peak amplitude {peak:.2e} < {silence_peak:.0e})")
    mono = np.ascontiguousarray(_resample(np.ascontiguousarray(mono), int(source_rate), sample_rate), dtype=np.float32)
    return Audio(mono, sample_rate, int(source_rate), channels, hashlib.sha1(data).hexdigest())
