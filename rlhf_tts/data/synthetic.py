"""The embedded default corpus: emotional speech synthesised with eSpeak NG, in the ESD layout.

Each speaker is an eSpeak voice and says its own sentences in all five emotions (parallel across
emotions, as ESD is). Every word is wrapped in SSML `<prosody>` computed from a per-word VAD point
(`rlhf_tts.data.emotions`), and a `<mark>` before each word records where it starts in the audio.
Randomness comes from a generator seeded by (seed, speaker, emotion, sentence), so the corpus is
the same whatever the number of worker processes or the order they finish in.

eSpeak NG silently drops the rest of a clause once it holds too many prosody changes (four
attributes changing on every word overflow its clause buffer after three or four words: in
version 2 of this corpus about half of the utterances lost their ending). So a zero-length
`<break time="1ms"/>` ends the clause every `WORDS_PER_CLAUSE` words, and every utterance is
checked: each word's mark present, marks strictly increasing, the end mark inside the audio.
An utterance that fails is spoken again with shorter clauses; one that still fails stops the build
with its id (it would otherwise be a recording whose transcript it does not say).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf

from rlhf_tts.config import DEFAULT_VOICES, SyntheticCorpusConfig, stable_hash
from rlhf_tts.data.emotions import EMOTIONS, prosody_from_vad, vad_from_prosody, word_vads
from rlhf_tts.data.espeak import Espeak, EspeakError
from rlhf_tts.data.frontend import phonemize
from rlhf_tts.data.sentences import generate_sentences

#: Bump when the builder's output changes for the same config, so caches rebuild.
SYNTHETIC_CORPUS_VERSION = 3  # 3: clause breaks, so eSpeak speaks every word
_DONE_MARKER = "corpus.json"
#: Words per clause, then shorter clauses when an utterance fails its check.
WORDS_PER_CLAUSE: tuple[int, ...] = (4, 2, 1)
_CLAUSE_BREAK = '<break time="1ms"/>'



def speaker_name(index: int) -> str:
    return f"spk{index + 1:02d}"


@dataclass(frozen=True)
class _Job:
    speaker_index: int
    voice: str
    emotion_index: int
    sentences: tuple[str, ...]
    seed: int
    cfg: SyntheticCorpusConfig
    out_dir: str


def build_ssml(words: list[str], vads: np.ndarray, words_per_clause: int = WORDS_PER_CLAUSE[0]) -> tuple[str, list[dict]]:
    """SSML with one <prosody> and one <mark> per word and a clause break every `words_per_clause`
    words; returns it with the per-word annotations."""
    parts, annotations = [], []
    for i, (word, vad) in enumerate(zip(words, vads)):
        prosody = prosody_from_vad(vad)
        if i and i % words_per_clause == 0:
            parts.append(_CLAUSE_BREAK)
        parts.append(f'<prosody {prosody.ssml_attributes()}><mark name="w{i}"/>{escape(word)}</prosody>')
        recorded = np.clip(vad_from_prosody(prosody), 0.0, 1.0)  # rounding can step just outside
        annotations.append({
            "word": word,
            "vad": [round(float(v), 6) for v in recorded],
            "prosody": {"pitch_pct": prosody.pitch_pct, "range_pct": prosody.range_pct,
                        "rate_pct": prosody.rate_pct, "volume_pct": prosody.volume_pct},
        })
    return "<speak>" + " ".join(parts) + '<mark name="end"/></speak>', annotations


def _synthesize_job(job: _Job) -> list[tuple[str, str, dict]]:
    """Synthesise one (speaker, emotion) block; returns (utt_id, text, annotation) rows."""
    engine = Espeak.instance()
    speaker = speaker_name(job.speaker_index)
    emotion = EMOTIONS[job.emotion_index]
    out = Path(job.out_dir) / speaker / emotion
    out.mkdir(parents=True, exist_ok=True)
    n = len(job.sentences)
    rows = []
    for j, text in enumerate(job.sentences):
        rng = np.random.default_rng([job.seed, job.speaker_index, job.emotion_index, j])
        intensity = float(rng.uniform(job.cfg.intensity_min, job.cfg.intensity_max))
        words = list(phonemize(text).words)
        vads = word_vads(emotion, intensity, len(words), rng, job.cfg.utterance_jitter, job.cfg.word_jitter)
        utt_id = f"{speaker}_{job.emotion_index * n + j + 1:06d}"
        for words_per_clause in WORDS_PER_CLAUSE:
            ssml, word_rows = build_ssml(words, vads, words_per_clause)
            speech = engine.synthesize(ssml, job.voice, ssml=True)
            if marks_complete(speech.marks, len(words), len(speech.audio)):
                break
        else:
            raise EspeakError(f"{utt_id} ({text!r}): eSpeak dropped words even with one word per clause")
        ends = [speech.marks.get(f"w{i + 1}", speech.marks.get("end", len(speech.audio))) for i in range(len(words))]
        for i, row in enumerate(word_rows):
            row["start_s"] = round(speech.marks.get(f"w{i}", 0) / speech.sample_rate, 4)
            row["end_s"] = round(ends[i] / speech.sample_rate, 4)
        sf.write(out / f"{utt_id}.wav", speech.audio, speech.sample_rate, subtype="PCM_16")
        rows.append((utt_id, text, {"utt_id": utt_id, "intensity": round(intensity, 6), "words": word_rows}))
    return rows


def marks_complete(marks: dict[str, int], n_words: int, n_samples: int) -> bool:
    """Every word's mark w0..w{n-1} and the end mark present, strictly increasing, the end inside the audio."""
    positions = [marks.get(f"w{i}") for i in range(n_words)] + [marks.get("end")]
    return (all(p is not None for p in positions) and all(a < b for a, b in zip(positions, positions[1:]))
            and positions[-1] <= n_samples)


def synthetic_corpus_key(cfg: SyntheticCorpusConfig, seed: int) -> str:
    return stable_hash(cfg.model_dump(exclude={"num_workers"}), seed, SYNTHETIC_CORPUS_VERSION)


def synthetic_corpus_dir(cfg: SyntheticCorpusConfig, seed: int, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "corpus" / f"synthetic-{synthetic_corpus_key(cfg, seed)}"


def _jobs(cfg: SyntheticCorpusConfig, seed: int, out_dir: Path) -> list[_Job]:
    n = cfg.sentences_per_speaker
    sentences = generate_sentences(cfg.n_speakers * n, seed)
    return [
        _Job(s, DEFAULT_VOICES[s], e, tuple(sentences[s * n : (s + 1) * n]), seed, cfg, str(out_dir))
        for s in range(cfg.n_speakers)
        for e in range(len(EMOTIONS))
    ]


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[list[tuple[str, str, dict]]]:
    """Each job in a fresh process, whatever the worker count.

    eSpeak NG's waveform generator keeps state across utterances that neither re-initialising nor
    seeding resets (the same text spoken twice in one process differs by a few samples), so the
    audio of a job depends on what its process spoke before. A fresh process per job makes the
    corpus a function of the config alone. Spawn, not fork: torch and eSpeak hold global state.
    """
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        yield from pool.map(_synthesize_job, jobs)


def build_synthetic_corpus(
    cfg: SyntheticCorpusConfig,
    seed: int,
    cache_dir: str | Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Build (or reuse) the corpus under `cache_dir/corpus/synthetic-<key>` and return its root.

    Written to a temporary folder and renamed into place, so an interrupted build is never reused.
    """
    root = synthetic_corpus_dir(cfg, seed, cache_dir)
    if (root / _DONE_MARKER).is_file():
        return root
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    jobs = _jobs(cfg, seed, tmp)
    transcripts: dict[str, list[str]] = {}
    annotations: dict[str, list[str]] = {}
    total = len(jobs) * cfg.sentences_per_speaker
    done = 0
    for job, rows in zip(jobs, _run_jobs(jobs, cfg.num_workers)):
        speaker = speaker_name(job.speaker_index)
        emotion = EMOTIONS[job.emotion_index]
        for utt_id, text, annotation in rows:
            transcripts.setdefault(speaker, []).append(f"{utt_id}\t{text}\t{emotion}")
            annotations.setdefault(speaker, []).append(json.dumps(annotation, sort_keys=True))
        done += len(rows)
        if on_progress:
            on_progress(done, total)
    for speaker, lines in transcripts.items():
        (tmp / speaker / f"{speaker}.txt").write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
        (tmp / speaker / f"{speaker}_annotations.jsonl").write_text("\n".join(sorted(annotations[speaker])) + "\n")
    (tmp / _DONE_MARKER).write_text(json.dumps(
        {"version": SYNTHETIC_CORPUS_VERSION, "seed": seed, "config": cfg.model_dump(mode="json"),
         "voices": list(DEFAULT_VOICES[: cfg.n_speakers]), "utterances": total}, indent=2,
    ))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root
