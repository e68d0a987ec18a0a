"""DNSMOS P.835 (SIG, BAK, OVRL) through `speechmos`, which ships Microsoft's ONNX models.

speechmos runs them with `onnxruntime` at 16 kHz on 9.01 s windows (shorter clips are tiled to
that length, as Microsoft's reference script does), and maps the raw outputs through the published
polynomial calibration. Audio is resampled to 16 kHz and clipped to [-1, 1] here, the two things
speechmos refuses otherwise. P.808 MOS comes along from the same call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rlhf_tts.eval.asr import to_rate

DNSMOS_SAMPLE_RATE = 16000
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
        if threads:  # speechmos builds default sessions; rebuild them with a thread budget
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            self.model.onnx_sess = ort.InferenceSession(str(primary), options, providers=providers)
            self.model.p808_onnx_sess = ort.InferenceSession(str(p808), options, providers=providers)

    def score(self, audios: Sequence[np.ndarray], sample_rate: int) -> list[dict[str, float]]:
        out = []
        for audio in audios:
            clip = np.clip(to_rate(audio, sample_rate, DNSMOS_SAMPLE_RATE), -1.0, 1.0).astype(np.float32)
            result = self.model(clip, DNSMOS_SAMPLE_RATE, self.personalized)
            out.append({"sig": float(result["sig_mos"]), "bak": float(result["bak_mos"]),
                        "ovrl": float(result["ovrl_mos"]), "p808": float(result["p808_mos"])})
        return out
