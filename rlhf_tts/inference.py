"""Text → speech with a trained Grad-TTS: input checking, batching, sampling and vocoding.

Shared by `python -m rlhf_tts.synthesize`, evaluation and the MLflow samples, so a sentence is
validated and spoken the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhf_tts.config import RunConfig
from rlhf_tts.data.frontend import UNK, FrontendError, phonemize
from rlhf_tts.models.gradtts.model import GradTTS, OutputLevel, TextBatch
from rlhf_tts.errors import InputError
from rlhf_tts.training.data import Vocabulary
from rlhf_tts.training.pretrain import BaseModel, base_model_location


@dataclass(frozen=True)
class PreparedText:
    ids: tuple[int, ...]
    emotion: int
    speaker: int
    speaker_name: str
    word_spans: tuple[tuple[int, int], ...]


def text_batch(items: list[PreparedText]) -> TextBatch:
    ids = torch.zeros(len(items), max(len(i.ids) for i in items), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item.ids)] = torch.tensor(item.ids)
    return TextBatch(ids, torch.tensor([len(i.ids) for i in items]), torch.tensor([i.emotion for i in items]),
                     torch.tensor([i.speaker for i in items]), [list(i.word_spans) for i in items])


class Synthesizer:
    def __init__(self, model: GradTTS, vocab: Vocabulary, cfg: RunConfig, vocoder) -> None:  # noqa: ANN001
        self.model, self.vocab, self.cfg, self.vocoder = model.eval(), vocab, cfg, vocoder
        self.sample_rate = cfg.features.sample_rate
        self.device = next(model.parameters()).device

    @classmethod
    def from_config(cls, cfg: RunConfig, model_dir: str | None = None, vocoder: str = "griffin_lim",
                    hifigan: str | None = None, device: str | torch.device = "cpu") -> "Synthesizer":
        from rlhf_tts.models.vocoder import make_vocoder

        base = BaseModel(Path(model_dir)) if model_dir else base_model_location(cfg)
        if not (base.final / "state.json").is_file():
            raise InputError(f"no trained model at {base.directory}: run `python -m rlhf_tts.run` "
                             "(stages data and pretrain) with the same config first, or pass --model DIR")
        model, vocab, model_cfg = base.load(device)
        try:
            voc = make_vocoder(vocoder, model_cfg.features, hifigan)
        except ValueError as err:
            raise InputError(str(err)) from None
        return cls(model, vocab, model_cfg, voc)

    def prepare(self, text: str, emotion: str, speaker: str | int) -> PreparedText:
        """Check and phonemise one request; raise InputError with a one-line reason."""
        by_lower = {e.lower(): i for i, e in enumerate(self.vocab.emotions)}
        if str(emotion).lower() not in by_lower:
            raise InputError(f"unknown emotion {emotion!r} (one of {', '.join(self.vocab.emotions)})")
        speaker = str(speaker)
        if speaker in self.vocab.speakers:
            speaker_index = self.vocab.speakers.index(speaker)
        elif speaker.lstrip("-").isdigit() and 0 <= int(speaker) < len(self.vocab.speakers):
            speaker_index = int(speaker)
        else:
            raise InputError(f"unknown speaker {speaker!r} (0..{len(self.vocab.speakers) - 1} or "
                             f"{', '.join(self.vocab.speakers)})")
        if not text or not text.strip():
            raise InputError("empty text")
        try:
            phonemized = phonemize(text)
        except FrontendError as err:
            raise InputError(f"the front end cannot read this text: {err}") from None
        if phonemized.dropped:
            raise InputError(f"characters the front end cannot read: {' '.join(repr(c) for c in phonemized.dropped)}")
        ids = self.vocab.symbols.ids(list(phonemized.tokens))
        unknown = sorted({t for t, i in zip(phonemized.tokens, ids) if self.vocab.symbols.symbols[i] == UNK})
        if unknown:
            raise InputError(f"phonemes missing from the model's symbol table: {' '.join(unknown)}")
        return PreparedText(tuple(ids), by_lower[str(emotion).lower()], speaker_index,
                            self.vocab.speakers[speaker_index], phonemized.word_spans)

    @torch.no_grad()
    def mels(self, items: list[PreparedText], n_steps: int | None = None, temperature: float | None = None,
             stochastic: bool = False, guidance: float = 1.0, length_scale: float = 1.0,
             generator: torch.Generator | None = None, durations: torch.Tensor | None = None,
             output_level: OutputLevel | None = None) -> list[torch.Tensor]:
        """Mels of prepared texts; steps, temperature and output level default to the model config's
        `evaluate.*` (what its evaluation report measured)."""
        n_steps = self.cfg.evaluate.sampler_steps if n_steps is None else n_steps
        temperature = self.cfg.evaluate.temperature if temperature is None else temperature
        output_level = self.cfg.evaluate.output_level if output_level is None else output_level
        batch = text_batch(items).to(self.device)
        prior = self.model.encode(batch, durations=durations, length_scale=length_scale)
        mel = self.model.sample(prior, n_steps, temperature, stochastic, guidance, generator, output_level)
        return [m[:, : int(n)] for m, n in zip(mel, prior.lengths)]

    def speak(self, items: list[PreparedText], **kwargs) -> list[np.ndarray]:  # noqa: ANN003 - forwarded to mels
        return [self.vocoder(m).cpu().numpy() for m in self.mels(items, **kwargs)]
