"""Per-utterance judging of one system against the references, and the report's metric set.

Every system's audio goes through the same path: log-mel (the judge's front end) → emotion judge
(embedding, posteriors, word VAD), recogniser → WER, DNSMOS, and F0/energy contours aligned by DTW
to the *recording* of the same utterance. The references (recording embeddings and contours) are
computed once per report (`References`). Judging is batched in chunks of `judges.batch_size`
utterances, with one progress update per chunk.

Word-level VAD is scored only on utterances whose reference has trusted word boundaries and VAD
targets (`rlhf_tts.eval.corpus`), the same set for every system; a system's word spans are its own
when it knows them (a model's durations), else the reference's spans mapped through the DTW path.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from rlhf_tts.eval.corpus import EvalUtterance
from rlhf_tts.eval.metrics import (Metric, cosine_rows, macro_recall_metric, mean_metric, pooled_ccc_metric,
                                   ratio_metric)
from rlhf_tts.eval.systems import SystemOutput

ProgressFn = Callable[..., None]
DNSMOS_TASK = 4  # utterances per DNSMOS task: small, so the two threads finish together

#: Report metrics in table order: key → (label, higher is better, shown as percent).
METRICS: dict[str, tuple[str, bool, bool]] = {
    "emo_sim": ("Emo SIM", True, True),
    "emotion_recall": ("Emotion recall", True, True),
    "wer": ("WER", False, True),
    "f0_corr": ("F0 corr", True, False),
    "f0_rmse_st": ("F0 RMSE (st)", False, False),
    "energy_corr": ("Energy corr", True, False),
    "energy_rmse_db": ("Energy RMSE (dB)", False, False),
    "duration_error": ("Duration error", False, True),
    "dnsmos_sig": ("DNSMOS SIG", True, False),
    "dnsmos_bak": ("DNSMOS BAK", True, False),
    "dnsmos_ovrl": ("DNSMOS OVRL", True, False),
    "wvad_ccc": ("wVAD CCC", True, False),
}


class SharedTasks:
    """Calls that one background thread runs in submission order while the caller does other work;
    `results()` then has the caller take the calls the thread has not started (from the back, so the
    two never wait on each other) and returns every result in submission order."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.calls: list[tuple[Callable, tuple, Future]] = []

    def submit(self, fn: Callable, *args: object) -> None:
        self.calls.append((fn, args, self.pool.submit(fn, *args)))

    def results(self) -> list:
        taken = {}
        try:
            for number in reversed(range(len(self.calls))):
                fn, args, future = self.calls[number]
                if future.cancel():  # not started: this thread runs it
                    taken[number] = fn(*args)
            return [taken[i] if i in taken else future.result() for i, (_, _, future) in enumerate(self.calls)]
        finally:
            self.pool.shutdown(cancel_futures=True)


@dataclass
class Judges:
    """The instruments, loaded once: emotion judge (required), recogniser and DNSMOS (optional)."""

    emotion: object  # rlhf_tts.eval.judges.emotion.EmotionJudge
    recognizer: object | None = None  # rlhf_tts.eval.asr.Recognizer
    dnsmos: object | None = None  # rlhf_tts.eval.dnsmos.DNSMOS
    batch_size: int = 32
    dnsmos_max_utts: int = 0  # DNSMOS on an even stride of this many reference utterances (0: all)

    def dnsmos_ids(self, utterances: Sequence[EvalUtterance]) -> set[str]:
        """The utterances DNSMOS scores: the same even stride of the report's utterances for every system."""
        ids = [u.utt_id for u in utterances]
        if self.dnsmos_max_utts and len(ids) > self.dnsmos_max_utts:
            ids = ids[:: len(ids) // self.dnsmos_max_utts][: self.dnsmos_max_utts]
        return set(ids)


@dataclass
class References:
    """What every system is compared with, computed once: the recordings' embeddings and contours."""

    utterances: list[EvalUtterance]
    embeddings: np.ndarray  # (N, E)
    contours: list  # rlhf_tts.eval.prosody.Contours per utterance
    targets: np.ndarray  # (N,) emotion index

    def index(self) -> dict[str, int]:
        return {u.utt_id: i for i, u in enumerate(self.utterances)}


def compute_references(utterances: Sequence[EvalUtterance], judges: Judges, progress: ProgressFn | None = None,
                       label: str = "references") -> References:
    from rlhf_tts.eval.prosody import contours
    from rlhf_tts.eval.systems import load_recording

    judge = judges.emotion
    features = judge.features  # type: ignore[attr-defined]
    emotions = judge.emotions  # type: ignore[attr-defined]
    embeddings = judge.judge_mels([u.mel for u in utterances]).embeddings  # type: ignore[attr-defined]
    refs = []
    for i, utt in enumerate(utterances):
        refs.append(contours(load_recording(utt, features.sample_rate), features, log_mel=utt.mel))
        if progress is not None and ((i + 1) % 16 == 0 or i + 1 == len(utterances)):
            progress(label, i + 1, len(utterances))
    return References(list(utterances), embeddings, refs, np.array([emotions.index(u.emotion) for u in utterances]))


@dataclass
class UtteranceScores:
    """Per-utterance judgements of one system (rows in the order of `utt_ids`)."""

    utt_ids: list[str]
    emotions: list[str]
    targets: np.ndarray  # (N,) target emotion index
    emo_sim: np.ndarray  # (N,) cosine to the reference embedding
    predictions: np.ndarray  # (N,) judge's emotion
    posteriors: np.ndarray  # (N, K)
    word_vad: list[np.ndarray | None]  # predicted (n_words, 3) where scored
    word_vad_target: list[np.ndarray | None]
    word_errors: np.ndarray | None = None  # (N, 4): substitutions, deletions, insertions, reference words
    hypotheses: list[str] | None = None
    prosody: dict[str, np.ndarray] = field(default_factory=dict)  # f0_corr … duration_error, each (N,)
    dnsmos: dict[str, np.ndarray] = field(default_factory=dict)  # sig, bak, ovrl, p808 each (N,)
    f0: dict[str, np.ndarray] = field(default_factory=dict)  # utt_id → F0 contour (Hz), for plots

    def metrics(self, n_classes: int) -> dict[str, Metric]:
        """The report's metrics over these utterances (see `rlhf_tts.eval.metrics`)."""
        out = {
            "emo_sim": mean_metric("emo_sim", self.emo_sim),
            "emotion_recall": macro_recall_metric("emotion_recall", self.targets, self.predictions, n_classes),
        }
        if self.word_errors is not None:
            out["wer"] = ratio_metric("wer", self.word_errors[:, :3].sum(1), self.word_errors[:, 3])
        for key, values in self.prosody.items():
            out[key] = mean_metric(key, values)
        for key in ("sig", "bak", "ovrl"):
            if key in self.dnsmos:
                out[f"dnsmos_{key}"] = mean_metric(f"dnsmos_{key}", self.dnsmos[key])
        if any(v is not None for v in self.word_vad):
            out["wvad_ccc"] = pooled_ccc_metric("wvad_ccc", self.word_vad, self.word_vad_target)
        return out

    def rows(self) -> list[dict]:
        """Flat per-utterance records (for the JSON/CSV next to the report)."""
        rows = []
        for i, utt_id in enumerate(self.utt_ids):
            row = {"utt_id": utt_id, "emotion": self.emotions[i], "emo_sim": float(self.emo_sim[i]),
                   "predicted": int(self.predictions[i])}
            if self.word_errors is not None:
                s, d, ins, n = (int(x) for x in self.word_errors[i])
                row.update(substitutions=s, deletions=d, insertions=ins, reference_words=n,
                           hypothesis=self.hypotheses[i] if self.hypotheses else "")
            row.update({k: float(v[i]) for k, v in self.prosody.items()})
            row.update({f"dnsmos_{k}": float(v[i]) for k, v in self.dnsmos.items()})
            rows.append(row)
        return rows


def score_outputs(outputs: dict[str, SystemOutput], refs: References, judges: Judges,
                  progress: ProgressFn | None = None, label: str = "judge") -> UtteranceScores:
    """Judge a system's outputs (those present) against the references, in batched chunks."""
    from rlhf_tts.eval.asr import word_errors
    from rlhf_tts.eval.prosody import align_contours, contours, map_spans, prosody_similarity

    judge = judges.emotion
    features = judge.features  # type: ignore[attr-defined]
    index = refs.index()
    rows = [index[u] for u in outputs if u in index]
    rows.sort()
    utts = [refs.utterances[i] for i in rows]
    n = len(rows)
    emo_sim = np.zeros(n)
    predictions = np.zeros(n, dtype=np.int64)
    posteriors = np.zeros((n, len(judge.emotions)))  # type: ignore[attr-defined]
    word_vad: list[np.ndarray | None] = [None] * n
    word_target: list[np.ndarray | None] = [None] * n
    errors = np.zeros((n, 4)) if judges.recognizer is not None else None
    hypotheses: list[str] = [""] * n
    prosody_keys = ("f0_corr", "f0_rmse_st", "energy_corr", "energy_rmse_db", "duration_error")
    prosody = {k: np.zeros(n) for k in prosody_keys}
    dnsmos: dict[str, np.ndarray] = {}
    f0: dict[str, np.ndarray] = {}
    step = max(1, judges.batch_size)
    # DNSMOS (ONNX, which releases the GIL) runs in a background thread while this one recognises and
    # aligns: the slowest judge overlaps the others. When this thread is done it takes the DNSMOS tasks the
    # background thread has not started, from the back of the queue (with the background thread alone, the
    # resynthesis row's judging took 140 s wall for 205 s of CPU on 2 cores, with the sharing 96 s; two
    # background threads from the start measured slower once: three busy threads on two cores and the GIL).
    pool = SharedTasks() if judges.dnsmos is not None else None
    dnsmos_ids = judges.dnsmos_ids(refs.utterances) if judges.dnsmos is not None else set()
    pending: list = []
    for start in range(0, n, step):
        chunk = range(start, min(n, start + step))
        outs = [outputs[utts[j].utt_id] for j in chunk]
        if pool is not None:  # first, so that the DNSMOS thread works while this one does the rest
            picked = [j for j in chunk if utts[j].utt_id in dnsmos_ids]
            for part in range(0, len(picked), DNSMOS_TASK):
                task = picked[part:part + DNSMOS_TASK]
                pending.append(task)
                audio = [outputs[utts[j].utt_id].audio for j in task]
                pool.submit(judges.dnsmos.score, audio, features.sample_rate)  # type: ignore[union-attr]
        mels = [judge.log_mel(o.audio, features.sample_rate) for o in outs]  # type: ignore[attr-defined]
        spans: list[list[tuple[int, int]] | None] = []
        for j, o, mel in zip(chunk, outs, mels):
            ref = refs.contours[rows[j]]
            gen = contours(o.audio, features, log_mel=mel)
            path = align_contours(ref, gen)
            for key, value in prosody_similarity(ref, gen, path).items():
                prosody[key][j] = value
            f0[utts[j].utt_id] = gen.f0_hz
            utt = utts[j]
            if utt.word_frame_spans is not None and utt.word_vad is not None and len(utt.word_vad) == len(utt.word_frame_spans):
                own = o.word_frame_spans
                if own is None or len(own) != len(utt.word_frame_spans):
                    own = map_spans(utt.word_frame_spans, path, mel.shape[-1])
                spans.append([(min(a, mel.shape[-1] - 1), min(max(b, a + 1), mel.shape[-1])) for a, b in own])
                word_target[j] = utt.word_vad
            else:
                spans.append(None)
        judged = judge.judge_mels(mels, spans)  # type: ignore[attr-defined]
        emo_sim[list(chunk)] = cosine_rows(judged.embeddings, refs.embeddings[[rows[j] for j in chunk]])
        predictions[list(chunk)] = judged.predictions
        posteriors[list(chunk)] = judged.posteriors
        for k, j in enumerate(chunk):
            word_vad[j] = judged.word_vad[k]
        if judges.recognizer is not None:
            texts = judges.recognizer.transcribe([o.audio for o in outs], features.sample_rate)  # type: ignore[attr-defined]
            for j, hyp in zip(chunk, texts):
                e = word_errors(utts[j].text, hyp)
                errors[j] = (e.substitutions, e.deletions, e.insertions, e.reference_words)  # type: ignore[index]
                hypotheses[j] = hyp
        if progress is not None:
            progress(label, chunk[-1] + 1, n)
    for task, task_scores in zip(pending, pool.results() if pool is not None else []):
        for j, scores in zip(task, task_scores):
            for key, value in scores.items():
                dnsmos.setdefault(key, np.full(n, np.nan))[j] = value  # NaN: not scored, left out of the mean
    return UtteranceScores(
        [u.utt_id for u in utts], [u.emotion for u in utts], refs.targets[rows], emo_sim, predictions, posteriors,
        word_vad, word_target, errors, hypotheses if judges.recognizer is not None else None, prosody, dnsmos, f0)
