"""The five ESD emotions, their valence/arousal/dominance, and how VAD becomes eSpeak prosody.

The synthetic corpus is generated from VAD rather than from emotion labels directly: each word gets
a VAD point (the emotion's nominal point scaled by the utterance's intensity, plus jitter), and a
fixed linear map turns VAD into the four prosody controls eSpeak exposes (pitch level, pitch range,
rate, volume). Because the map has full column rank, the VAD recorded for each word is recovered
exactly from the prosody that word got: HPRO's word-level targets are what the audio really carries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: ESD's emotion folders in ESD's own id order (utterances 1-350 Neutral, 351-700 Angry, ...).
EMOTIONS: tuple[str, ...] = ("Neutral", "Angry", "Happy", "Sad", "Surprise")
EMOTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}

#: Nominal (valence, arousal, dominance) in [0, 1], after the circumplex placements commonly used for
#: these categories (Russell 1980; Mehrabian 1996), e.g. anger: negative, aroused, dominant.
EMOTION_VAD: dict[str, tuple[float, float, float]] = {
    "Neutral": (0.50, 0.35, 0.50),
    "Angry": (0.15, 0.85, 0.85),
    "Happy": (0.85, 0.65, 0.60),
    "Sad": (0.15, 0.15, 0.25),
    "Surprise": (0.70, 0.90, 0.30),
}

#: Rows: pitch (% change), pitch range (% change), rate (% of normal, minus 100), volume (% minus 100);
#: columns: change of (valence, arousal, dominance) from Neutral. Arousal raises pitch, range and
#: loudness; valence widens the range and quickens the rate; dominance is loud, fast and flat (low
#: pitch, narrow range). The nominal points then land on the acoustic profiles reported for acted
#: speech: anger loud, happiness fast and lively, sadness low, narrow, slow and quiet, surprise high
#: and wide.
_VAD_TO_PROSODY = np.array(
    [
        [20.0, 60.0, -40.0],
        [80.0, 120.0, -60.0],
        [75.0, 30.0, 100.0],
        [0.0, 60.0, 100.0],
    ]
)
_NEUTRAL = np.array(EMOTION_VAD["Neutral"])
_PROSODY_TO_VAD = np.linalg.pinv(_VAD_TO_PROSODY)


@dataclass(frozen=True)
class Prosody:
    """eSpeak SSML prosody for one word, relative to the voice's defaults."""

    pitch_pct: float
    range_pct: float
    rate_pct: float
    volume_pct: float

    def ssml_attributes(self) -> str:
        return (
            f'pitch="{self.pitch_pct:+.0f}%" range="{self.range_pct:+.0f}%" '
            f'rate="{self.rate_pct:.0f}%" volume="{self.volume_pct:.0f}%"'
        )


def prosody_from_vad(vad: np.ndarray) -> Prosody:
    """Map a VAD point in [0, 1]^3 to eSpeak prosody, rounded to the whole percents SSML carries."""
    delta = np.rint(_VAD_TO_PROSODY @ (np.asarray(vad, dtype=np.float64) - _NEUTRAL))
    return Prosody(
        pitch_pct=float(delta[0]),
        range_pct=float(delta[1]),
        rate_pct=float(100.0 + delta[2]),
        volume_pct=float(100.0 + delta[3]),
    )


def vad_from_prosody(prosody: Prosody) -> np.ndarray:
    """Invert `prosody_from_vad`: the VAD point a word's prosody expresses."""
    delta = np.array(
        [prosody.pitch_pct, prosody.range_pct, prosody.rate_pct - 100.0, prosody.volume_pct - 100.0]
    )
    return _NEUTRAL + _PROSODY_TO_VAD @ delta


def utterance_vad(emotion: str, intensity: float) -> np.ndarray:
    """The utterance's centre in VAD: Neutral moved toward the emotion's point by `intensity`."""
    return _NEUTRAL + intensity * (np.array(EMOTION_VAD[emotion]) - _NEUTRAL)


def word_vads(
    emotion: str,
    intensity: float,
    n_words: int,
    rng: np.random.Generator,
    utterance_jitter: float,
    word_jitter: float,
) -> np.ndarray:
    """Per-word VAD, shape (n_words, 3), clipped to [0, 1].

    Besides jitter, each emotion has a contour over the sentence, as acted speech does: surprise
    rises toward the end, sadness fades, anger and happiness put a stress peak on one word.
    """
    centre = utterance_vad(emotion, intensity) + rng.normal(0.0, utterance_jitter, size=3)
    position = np.linspace(0.0, 1.0, n_words) if n_words > 1 else np.zeros(1)
    contour = np.zeros((n_words, 3))
    if emotion == "Surprise":
        contour[:, 1] += intensity * 0.15 * (position - 0.5) * 2
    elif emotion == "Sad":
        contour[:, 1] -= intensity * 0.08 * position
    elif emotion in ("Angry", "Happy") and n_words > 1:
        peak = rng.integers(n_words)
        contour[peak, 1] += intensity * 0.12
        contour[peak, 2] += intensity * (0.10 if emotion == "Angry" else 0.04)
    vads = centre + contour + rng.normal(0.0, word_jitter, size=(n_words, 3))
    return np.clip(vads, 0.0, 1.0)
