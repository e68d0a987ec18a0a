"""DNSMOS P.835 (SIG, BAK, OVRL) with the ONNX models that `speechmos` ships, run by `onnxruntime`.

Microsoft's reference procedure (`dnsmos_local.py`, which speechmos copies) works at 16 kHz on
9.01 s windows: a shorter clip is tiled (repeated) up to that length, windows are taken every
second, and the scores are averaged. For the clips of a TTS test set (2-4 s) the tiled signal is
the same clip over and over, so the 1-second hops only re-score shifted copies of it: this module
scores the *first* window of the tiled clip, which costs a third of the reference's compute on a
3 s clip (the primary model takes ~0.3-0.7 s per window on one CPU core) and differs from it only
by where the repetition starts. Clips longer than 9.01 s keep the reference's hop-and-average.
The raw outputs go through the same published polynomial calibration (speechmos'
`get_polyfit_val`). P.808 MOS comes along from the second model. Audio is resampled to 16 kHz and
clipped to [-1, 1] first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rlhf_tts.eval.asr import to_rate

DNSMOS_SAMPLE_RATE = 16000
WINDOW_SECONDS = 9.01
DNSMOS_KEYS = ("sig", "bak", "ovrl", "p808")


class DNSMOS:
    """Non-intrusive quality prediction; one instance holds the two ONNX sessions."""

    def __init__(self, personalized: bool = False, threads: int = 0) -> None:
        import onnxruntime as ort
        from speechmos import dnsmos as sm

        root = Path(sm.__file__).parent
        primary = root / ("pdnsmos_models" if personalized else "dnsmos_models") / "sig_bak_ovr.onnx"
        p808 = root / "dnsmos_models" / "model_v8.onnx"
        self.personalized = personalized
        self.model = sm.DNSMOS(str(primary), str(p808))
        if threads:  # speechmos builds default sessions (all cores); rebuild them with a thread budget
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            self.model.onnx_sess = ort.InferenceSession(str(primary), options, providers=providers)
            self.model.p808_onnx_sess = ort.InferenceSession(str(p808), options, providers=providers)

    def windows(self, audio: np.ndarray) -> list[np.ndarray]:
        """The 9.01 s windows a clip is scored on (see the module docstring)."""
        size = int(WINDOW_SECONDS * DNSMOS_SAMPLE_RATE)
        if len(audio) == 0:
            audio = np.zeros(1, dtype=np.float32)
        if len(audio) < size:
            return [np.tile(audio, int(np.ceil(size / len(audio))))[:size]]
        hops = int(np.floor(len(audio) / DNSMOS_SAMPLE_RATE) - WINDOW_SECONDS) + 1
        return [audio[i * DNSMOS_SAMPLE_RATE: i * DNSMOS_SAMPLE_RATE + size] for i in range(max(hops, 1))
                if len(audio[i * DNSMOS_SAMPLE_RATE: i * DNSMOS_SAMPLE_RATE + size]) == size]

    def score(self, audios: Sequence[np.ndarray], sample_rate: int) -> list[dict[str, float]]:
        out = []
        m = self.model
        for audio in audios:
            clip = np.clip(to_rate(audio, sample_rate, DNSMOS_SAMPLE_RATE), -1.0, 1.0).astype(np.float32)
            scores = []
            for window in self.windows(clip):
                sig, bak, ovrl = m.onnx_sess.run(None, {"input_1": window[None, :]})[0][0]
                sig, bak, ovrl = m.get_polyfit_val(sig, bak, ovrl, self.personalized)
                mel = np.asarray(m.audio_melspec(audio=window[:-160]), dtype=np.float32)[None]
                p808 = m.p808_onnx_sess.run(None, {"input_1": mel})[0][0][0]
                scores.append((sig, bak, ovrl, p808))
            mean = np.mean(np.asarray(scores, dtype=np.float64), axis=0)
            out.append(dict(zip(DNSMOS_KEYS, (float(v) for v in mean))))
        return out
