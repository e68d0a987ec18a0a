"""Held-out utterances as the judges and the report see them: text, emotion, reference mel and audio.

Word boundaries in frames, which the word-level VAD judge needs, come from the corpus's own
annotations only where they are trustworthy: the synthetic builder records eSpeak's `<mark>` events,
and about half of its utterances have marks that are missing or restart mid-utterance (eSpeak reports
positions relative to a new buffer). `word_frame_spans` keeps an utterance's marks only when they are
strictly increasing and end inside the clip; otherwise the utterance has no word spans and is left
out of word-level training and scoring rather than scored on wrong boundaries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_tts.config import FeatureConfig


@dataclass
class EvalUtterance:
    utt_id: str
    speaker: str
    emotion: str
    text: str
    mel: np.ndarray  # (n_mels, T) reference log-mel from the recording
    wav_path: Path
    word_frame_spans: list[tuple[int, int]] | None  # reference frames per word, when known
    word_vad: np.ndarray | None  # (n_words, 3) targets, when known
    row: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.mel.shape[-1])


def read_annotations(corpus_root: Path, speakers: set[str]) -> dict[str, dict]:
    """utt_id → annotation record, from `<speaker>/<speaker>_annotations.jsonl` where present."""
    out: dict[str, dict] = {}
    for speaker in sorted(speakers):
        path = Path(corpus_root) / speaker / f"{speaker}_annotations.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["utt_id"]] = record
    return out


def word_frame_spans(annotation: dict | None, n_words: int, n_frames: int, features: FeatureConfig) -> list[tuple[int, int]] | None:
    """Frame spans [start, end) per word from the annotation's start/end times, or None if unreliable."""
    if not annotation or len(annotation.get("words", [])) != n_words or n_words == 0:
        return None
    words = annotation["words"]
    starts = [float(w["start_s"]) for w in words]
    ends = [float(w["end_s"]) for w in words]
    if any(b <= a for a, b in zip(starts, starts[1:])) or any(e <= s for s, e in zip(starts, ends)):
        return None
    if any(abs(e - s2) > 1e-3 for e, s2 in zip(ends, starts[1:])):
        return None
    scale = features.sample_rate / features.hop_length
    spans = []
    for s, e in zip(starts, ends):
        a, b = int(round(s * scale)), int(round(e * scale))
        if b > n_frames + 2:
            return None
        a, b = min(a, n_frames - 1), min(max(b, a + 1), n_frames)
        spans.append((a, b))
    return spans


def load_split(dataset, split: str, max_utts: int | None = None, features: FeatureConfig | None = None,  # noqa: ANN001
               speakers: set[str] | None = None) -> list[EvalUtterance]:
    """Utterances of one split with their reference mels; `max_utts` takes an even stride over them."""
    from safetensors.numpy import load_file

    from rlhf_tts.data.manifest import corpus_root, read_manifest

    table = read_manifest(dataset.manifest_path)
    root = corpus_root(table)
    features = features or FeatureConfig.model_validate(json.loads(table.schema.metadata[b"features"].decode()))
    rows = [r for r in table.to_pylist() if r["split"] == split and (speakers is None or r["speaker"] in speakers)]
    if max_utts and len(rows) > max_utts:
        rows = rows[:: len(rows) // max_utts][:max_utts]
    annotations = read_annotations(root, {r["speaker"] for r in rows})
    shards: dict[str, dict[str, np.ndarray]] = {}
    out = []
    for row in rows:
        if row["speaker"] not in shards:
            shards[row["speaker"]] = load_file(str(dataset.mel_dir / f"{row['speaker']}.safetensors"))
        mel = shards[row["speaker"]][row["utt_id"]]
        vad = np.asarray(row["word_vad"], dtype=np.float32) if row.get("word_vad") else None
        spans = word_frame_spans(annotations.get(row["utt_id"]), len(row["words"]), mel.shape[-1], features)
        out.append(EvalUtterance(row["utt_id"], row["speaker"], row["emotion"], row["text"], mel,
                                 root / row["wav_path"], spans, vad, row))
    return out
