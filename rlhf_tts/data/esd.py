"""Reader for the ESD directory layout (real ESD and the embedded synthetic corpus alike).

Layout: `<root>/<speaker>/<Emotion>/[train|evaluation|test/]<speaker>_<id>.wav` and
`<root>/<speaker>/<speaker>.txt` with `id<TAB>text<TAB>Emotion` lines. Real ESD releases put wavs in
split folders; when present they give the official split. An optional
`<speaker>/<speaker>_annotations.jsonl` (written by the synthetic builder) carries intensity and word
VAD. This module only pairs files with transcripts; audio is checked later, in parallel.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_tts.data.emotions import EMOTIONS
from rlhf_tts.data.quarantine import QuarantinedItem

_EMOTION_BY_LOWER = {e.lower(): e for e in EMOTIONS}
_SPLIT_FOLDERS = {"train": "train", "evaluation": "val", "val": "val", "validation": "val", "test": "test"}
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


@dataclass
class TranscriptLine:
    text: str
    emotion: str | None
    where: str  # "<file>:<line>" for messages


@dataclass
class UtteranceRecord:
    utt_id: str
    speaker: str
    emotion: str
    text: str
    wav_path: Path
    split: str | None = None  # from ESD split folders, when present
    intensity: float | None = None
    word_annotations: list[dict] | None = field(default=None, repr=False)


def _decode_lines(path: Path) -> tuple[list[tuple[int, str]], dict[str, QuarantinedItem]]:
    """Decoded (line number, text) pairs, and the undecodable lines keyed by their utterance id."""
    raw = path.read_bytes()
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            return list(enumerate(raw.decode(encoding).splitlines(), start=1)), {}
    lines: list[tuple[int, str]] = []
    bad_ids: dict[str, QuarantinedItem] = {}
    for number, chunk in enumerate(raw.splitlines(), start=1):
        try:
            lines.append((number, chunk.decode("utf-8")))
        except UnicodeDecodeError as err:
            reason = f"transcript line {number} is not valid UTF-8 (byte 0x{chunk[err.start]:02x} at column {err.start})"
            utt_id = re.split(rb"\s", chunk.strip(), maxsplit=1)[0].decode("ascii", errors="replace")
            bad_ids[utt_id] = QuarantinedItem(f"{path}:{number}", reason)
    return lines, bad_ids


def read_transcript(path: Path) -> tuple[dict[str, TranscriptLine], list[QuarantinedItem], dict[str, QuarantinedItem]]:
    """Parse `id<TAB>text<TAB>Emotion` lines (whitespace-separated tolerated, emotion optional).

    Returns the good lines, duplicate lines, and the unusable lines keyed by utterance id, so that
    the utterance's wav is reported once, under the reason its line failed.
    """
    lines, bad_ids = _decode_lines(path)
    bad: list[QuarantinedItem] = []
    good: dict[str, TranscriptLine] = {}
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if "\t" in line:
            utt_id, *rest = (p.strip() for p in line.split("\t"))
        else:  # whitespace-separated: the last token may be the emotion
            utt_id, *tokens = line.split()
            rest = [" ".join(tokens[:-1]), tokens[-1]] if len(tokens) > 1 else tokens
        emotion = None
        if len(rest) >= 2 and rest[-1].lower() in _EMOTION_BY_LOWER:
            emotion = _EMOTION_BY_LOWER[rest[-1].lower()]
            rest = rest[:-1]
        text = " ".join(rest).strip()
        if not text:
            bad_ids[utt_id] = QuarantinedItem(where, "empty transcript text")
            continue
        if utt_id in good or utt_id in bad_ids:
            bad.append(QuarantinedItem(where, f"duplicate transcript id {utt_id}"))
            continue
        good[utt_id] = TranscriptLine(text=text, emotion=emotion, where=where)
    return good, bad, bad_ids


def _read_annotations(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            out[item["utt_id"]] = item
    return out


def _speaker_dirs(root: Path, speakers: list[str] | None) -> tuple[list[Path], list[QuarantinedItem]]:
    if speakers is None:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), []
    found, missing = [], []
    for name in speakers:
        (found if (root / name).is_dir() else missing).append(root / name)
    return found, [QuarantinedItem(str(p), "requested speaker folder not found") for p in missing]


def scan_esd(root: str | Path, speakers: list[str] | None = None) -> tuple[list[UtteranceRecord], list[QuarantinedItem]]:
    """Pair every wav with its transcript line; everything that cannot be paired is quarantined."""
    root = Path(root)
    records: list[UtteranceRecord] = []
    quarantined: list[QuarantinedItem] = []
    speaker_dirs, missing = _speaker_dirs(root, speakers)
    quarantined.extend(missing)
    for spk_dir in speaker_dirs:
        speaker = spk_dir.name
        transcript_path = spk_dir / f"{speaker}.txt"
        if transcript_path.is_file():
            transcript, bad_lines, bad_ids = read_transcript(transcript_path)
        else:
            transcript, bad_lines, bad_ids = {}, [], {}
        quarantined.extend(bad_lines)
        annotations = _read_annotations(spk_dir / f"{speaker}_annotations.jsonl")
        seen: set[str] = set()
        for emo_dir in sorted(p for p in spk_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            emotion = _EMOTION_BY_LOWER.get(emo_dir.name.lower())
            for wav in sorted(emo_dir.rglob("*")):
                if not wav.is_file() or wav.suffix.lower() != ".wav" or wav.name.startswith("."):
                    continue
                utt_id = wav.stem
                seen.add(utt_id)
                if emotion is None:
                    quarantined.append(QuarantinedItem(
                        str(wav), f"unknown emotion directory '{emo_dir.name}' (expected one of {', '.join(EMOTIONS)})"
                    ))
                    continue
                if utt_id in bad_ids:
                    line_defect = bad_ids[utt_id]
                    quarantined.append(QuarantinedItem(str(wav), f"{line_defect.reason} ({line_defect.path})"))
                    continue
                line = transcript.get(utt_id)
                if line is None:
                    where = transcript_path.name if transcript_path.is_file() else f"{transcript_path.name} (missing)"
                    quarantined.append(QuarantinedItem(str(wav), f"no transcript line for {utt_id} in {where}"))
                    continue
                if line.emotion is not None and line.emotion != emotion:
                    quarantined.append(QuarantinedItem(
                        str(wav), f"emotion mismatch: transcript says {line.emotion}, folder says {emotion}"
                    ))
                    continue
                split_folder = wav.parent.name.lower() if wav.parent != emo_dir else None
                annotation = annotations.get(utt_id, {})
                records.append(UtteranceRecord(
                    utt_id=utt_id, speaker=speaker, emotion=emotion, text=line.text, wav_path=wav,
                    split=_SPLIT_FOLDERS.get(split_folder) if split_folder else None,
                    intensity=annotation.get("intensity"), word_annotations=annotation.get("words"),
                ))
        for utt_id, line in transcript.items():
            if utt_id not in seen:
                quarantined.append(QuarantinedItem(line.where, f"transcript line has no wav file ({utt_id})"))
        quarantined.extend(item for utt_id, item in bad_ids.items() if utt_id not in seen)
    return records, quarantined
