"""ctypes binding to the eSpeak NG library shipped by the `espeakng-loader` wheel.

Why a binding and not a subprocess: the project must run with no system packages, and the wheel
ships only the shared library and its data. eSpeak keeps global state, so one process holds one
engine; callers that want parallelism use processes, never threads.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_SSML = 0x10
_PHONEMES_IPA = 0x02
_EVENT_MARK = 3
_EVENT_SAMPLERATE = 8


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded or refused a request."""


@dataclass(frozen=True)
class Synthesis:
    """One synthesised utterance: int16 PCM at `sample_rate`, and the sample index of each SSML mark."""

    audio: np.ndarray
    sample_rate: int
    marks: dict[str, int]


class Espeak:
    """A process-wide eSpeak NG engine (use `Espeak.instance()`); every call holds one lock."""

    _instance: "Espeak | None" = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as err:  # pragma: no cover - dependency of the package
            raise EspeakError("espeakng-loader is not installed: pip install espeakng-loader") from err
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetVoiceByName.restype = ctypes.c_int
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        self._lib.espeak_Synth.restype = ctypes.c_int
        self._lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        self._lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        data_path = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {rate})")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._marks: dict[str, int] = {}
        self._samples_so_far = 0
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: ctypes does not
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lock = threading.Lock()
        self._voice: str | None = None

    @classmethod
    def instance(cls) -> "Espeak":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_audio(self, wav, num_samples, events) -> int:  # noqa: ANN001 - ctypes signature
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events and events[i].type != 0:
            event = events[i]
            if event.type == _EVENT_MARK and event.id.name:
                self._marks[event.id.name.decode()] = int(event.sample)
            i += 1
        return 0

    def _set_voice(self, voice: str) -> None:
        if voice != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise EspeakError(f"eSpeak NG has no voice {voice!r}")
            self._voice = voice

    def synthesize(self, text: str, voice: str, ssml: bool = False) -> Synthesis:
        """Speak `text` (plain or SSML) with `voice`; marks map SSML <mark name> to a sample index."""
        with self._lock:
            self._set_voice(voice)
            self._chunks, self._marks = [], {}
            data = text.encode("utf-8") + b"\0"
            flags = _CHARS_UTF8 | (_SSML if ssml else 0)
            err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, flags, None, None)
            if err != 0:
                raise EspeakError(f"espeak_Synth failed with code {err}")
            audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
            return Synthesis(audio=audio.astype(np.int16), sample_rate=self.sample_rate, marks=dict(self._marks))

    def phonemize(self, text: str, voice: str = "en-us") -> str:
        """IPA phonemes of `text`; clauses are joined by a space."""
        with self._lock:
            self._set_voice(voice)
            buf = ctypes.c_char_p(text.encode("utf-8"))
            ptr = ctypes.pointer(buf)
            parts: list[str] = []
            while ptr.contents.value:
                out = self._lib.espeak_TextToPhonemes(ptr, _CHARS_UTF8, _PHONEMES_IPA)
                if out:
                    parts.append(out.decode("utf-8"))
            return " ".join(p.strip() for p in parts if p.strip())
