"""Did a pretrained Grad-TTS's alignment lock in? Its duration and prior losses on held-out utterances.

Grad-TTS learns its alignment (MAS against its own `mu`) and `mu` (on that alignment) together; when
the two do not lock in, MAS keeps skipping phonemes, the duration predictor learns noise and the base
model's speech is hard to understand, which every later stage then measures. On the tiny preset
whether it locks in depends on the seed and on the machine's floating-point paths (the same seed
locked in on one CPU and not on another): seven 2,000-step runs on one machine gave held-out duration
losses of 0.22-0.25 (locked in; test WER 40-48 %), 0.38 (half; WER 60 %) or 0.52-0.72 (not; 78 %). The check
costs one encoder pass over the validation split and is stored beside the model, so a cached run
prints it again for free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf_tts.checkpoint import write_json_atomic
from rlhf_tts.data.manifest import read_manifest
from rlhf_tts.models.gradtts.model import GradTTS
from rlhf_tts.training.data import Utterance, collate, load_utterances

if TYPE_CHECKING:
    from rlhf_tts.training.pretrain import BaseModel

CHECK_FILE = "alignment_check.json"


@dataclass(frozen=True)
class AlignmentCheck:
    duration_loss: float  # per-phoneme squared log-duration error against MAS, as in training
    prior_loss: float  # Gaussian NLL per mel element of the frames under their aligned mu
    utterances: int
    split: str
    threshold: float

    @property
    def locked_in(self) -> bool:
        return self.duration_loss <= self.threshold

    def message(self) -> str:
        verdict = "locked in" if self.locked_in else "did NOT lock in"
        return (f"alignment {verdict}: held-out duration loss {self.duration_loss:.3f} "
                f"({'≤' if self.locked_in else '>'} {self.threshold:g}), prior loss {self.prior_loss:.3f}, "
                f"{self.utterances} {self.split} utterances")


@torch.no_grad()
def held_out_losses(model: GradTTS, utterances: list[Utterance], batch_size: int = 16) -> tuple[float, float]:
    """(duration, prior) losses of `model` over `utterances`: the mean of its batches' losses (the training
    formula), each batch weighted by its utterances."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    duration = prior = 0.0
    for i in range(0, len(utterances), batch_size):
        batch = collate(utterances[i:i + batch_size]).to(device)
        out = model.compute_loss(batch.text, batch.mel, batch.mel_lengths, 8, decoder_items=0)
        duration += float(out["duration"]) * len(batch.utt_ids)
        prior += float(out["prior"]) * len(batch.utt_ids)
    model.train(was_training)
    return duration / len(utterances), prior / len(utterances)


def stored_check(model_dir: Path, threshold: float) -> AlignmentCheck | None:
    """The check stored beside the model in `model_dir`, judged at `threshold`; None if there is none."""
    stored = model_dir / CHECK_FILE
    if not stored.is_file():
        return None
    return AlignmentCheck(**{**json.loads(stored.read_text()), "threshold": threshold})


def check_alignment(base: "BaseModel", dataset_dir: Path, threshold: float, device: torch.device | str = "cpu"
                    ) -> AlignmentCheck:
    """The check of the base model `base` (computed once, then read from its `alignment_check.json`
    without loading the model; a different threshold only re-judges the stored losses). Validation
    split, else train."""
    if (check := stored_check(base.directory, threshold)) is not None:
        return check
    model, vocab, _ = base.load(device)
    rows = read_manifest(dataset_dir / "manifest.parquet").to_pylist()
    split = "val" if any(r["split"] == "val" for r in rows) else "train"
    utterances = load_utterances([r for r in rows if r["split"] == split], dataset_dir / "mels", vocab)
    duration, prior = held_out_losses(model, utterances)
    check = AlignmentCheck(round(duration, 4), round(prior, 4), len(utterances), split, threshold)
    write_json_atomic(base.directory / CHECK_FILE, {k: v for k, v in asdict(check).items() if k != "threshold"})
    return check
