"""The `judges` stage: train and cache the evaluation judges, and measure how far they can be trusted.

Builds (or reuses, keyed by config under `<cache_dir>/judges/`) the emotion judge
(`rlhf_tts.eval.judges.emotion`, train-split recordings only) and the domain recogniser
(`rlhf_tts.eval.asr`: LM from the train/val sentences, MAP-adapted acoustic model from train
recordings), then checks them on the held-out `judges.check_split` (test by default):

- emotion recall (macro) on the recordings, and on the same mels after Griffin-Lim resynthesis:
  every system reaches the judge through that vocoder, so the drop is the judge's vocoder
  sensitivity (the issue asks for both, and a drop of at most 10 points);
- WER of the recogniser on the recordings, overall and on the clips whose eSpeak word marks are
  intact (`rlhf_tts.eval.corpus`): a clip with broken marks may not carry its whole text.

The checks are cached too (they depend only on the judges and the split), so a second run prints
them at once. Results go to `<output_dir>/judges_report.{json,md}` and MLflow (`judges/check/*`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from rlhf_tts.config import RunConfig, stable_hash

ProgressFn = Callable[..., None]
CHECKS_VERSION = 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to `n` (0: unchanged) for a block, then restored, so a stage's
    setting does not leak into the stages after it in the same process."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ensure_emotion_judge(cfg: RunConfig, progress: ProgressFn | None = None, tracker=None,  # noqa: ANN001
                         resume: bool = False):  # noqa: ANN201 - JudgeLocation
    """The trained emotion judge for `cfg`, trained now if the cache has none."""
    from rlhf_tts.eval.judges.emotion import train_emotion_judge

    return train_emotion_judge(cfg, resume=resume, progress=progress, tracker=tracker)


def load_judges(cfg: RunConfig, progress: ProgressFn | None = None, asr: bool = True, dnsmos: bool = True,
                build: bool = True, tracker=None):  # noqa: ANN001, ANN201 - Tracker; scoring.Judges
    """Every judge a report needs, built on first use when `build` (else a clear error if missing)."""
    from rlhf_tts.errors import InputError
    from rlhf_tts.eval.judges.emotion import EmotionJudge, emotion_judge_location
    from rlhf_tts.eval.scoring import Judges
    from rlhf_tts.training.pretrain import resolve_device

    location = ensure_emotion_judge(cfg, progress, tracker) if build else emotion_judge_location(cfg)
    if not location.exists():
        raise InputError(f"no emotion judge at {location.directory}: run the judges stage first")
    emotion = EmotionJudge.load(location, resolve_device(cfg.judges.device), cfg.judges.batch_size)
    if emotion.features != cfg.features:
        raise InputError("the emotion judge was trained on other features than features.* of this config")
    recognizer = None
    if asr:
        from rlhf_tts.eval.asr import load_recognizer

        recognizer = load_recognizer(cfg, progress, build)
    quality = None
    if dnsmos:
        from rlhf_tts.eval.dnsmos import DNSMOS

        quality = DNSMOS(threads=cfg.judges.threads or 1)  # one core: it runs beside the other judges
    return Judges(emotion, recognizer, quality, cfg.judges.batch_size)


def checks_key(cfg: RunConfig) -> str:
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.asr import domain_asr_key
    from rlhf_tts.eval.judges.emotion import emotion_judge_key

    dataset, _ = dataset_location(cfg)
    jc = cfg.judges
    asr = (jc.asr_backend, jc.whisper_model, jc.asr_lm_weight,
           domain_asr_key(cfg, dataset.directory)) if jc.check_wer else None
    return stable_hash(emotion_judge_key(cfg, dataset.directory), asr, jc.check_split, jc.check_max_utts,
                       CHECKS_VERSION)


def judges_cached(cfg: RunConfig) -> bool:
    """Whether the judges stage would only read its caches (emotion judge, recogniser, checks)."""
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.judges.emotion import emotion_judge_location

    dataset, _ = dataset_location(cfg)
    if not dataset.manifest_path.is_file() or not emotion_judge_location(cfg).exists():
        return False
    return (Path(cfg.cache_dir) / "judges" / "checks" / f"{checks_key(cfg)}.json").is_file()


def judge_checks(cfg: RunConfig, judges, progress: ProgressFn | None = None) -> dict:  # noqa: ANN001 - Judges
    """Emotion recall on recordings vs Griffin-Lim resynthesis, and WER on the recordings (cached)."""
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.asr import corpus_wer, word_errors
    from rlhf_tts.eval.corpus import load_split
    from rlhf_tts.data.resynthesis import griffin_lim_mels
    from rlhf_tts.eval.metrics import confusion_matrix, macro_recall
    from rlhf_tts.eval.systems import load_recording

    jc = cfg.judges
    path = Path(cfg.cache_dir) / "judges" / "checks" / f"{checks_key(cfg)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.monotonic()
    dataset, _ = dataset_location(cfg)
    utts = load_split(dataset, jc.check_split, jc.check_max_utts or None, cfg.features)
    if not utts:
        from rlhf_tts.errors import InputError

        raise InputError(f"judges.check_split={jc.check_split}: the split is empty")
    emotion = judges.emotion
    names = list(emotion.emotions)
    targets = np.array([names.index(u.emotion) for u in utts])
    clean = emotion.judge_mels([u.mel for u in utts]).predictions
    resynthesised = griffin_lim_mels([u.mel for u in utts], cfg.features, progress, f"checks: griffin-lim {jc.check_split}")
    gl = emotion.judge_mels(resynthesised).predictions

    def per_emotion(predictions: np.ndarray) -> dict[str, float]:
        return {e: float(np.mean(predictions[targets == k] == k)) for k, e in enumerate(names) if np.any(targets == k)}

    result: dict = {
        "split": jc.check_split, "n_utterances": len(utts),
        "emotion_recall": macro_recall(targets, clean, len(names)),
        "emotion_recall_griffin_lim": macro_recall(targets, gl, len(names)),
        "emotion_recall_per_emotion": per_emotion(clean),
        "emotion_recall_griffin_lim_per_emotion": per_emotion(gl),
        "confusion": confusion_matrix(targets, clean, len(names)).tolist(),
        "confusion_griffin_lim": confusion_matrix(targets, gl, len(names)).tolist(),
        "emotions": names,
    }
    result["recall_drop_points"] = 100 * (result["emotion_recall"] - result["emotion_recall_griffin_lim"])
    if judges.recognizer is not None and jc.check_wer:
        errors, intact, by_emotion = [], [], {}
        for i, utt in enumerate(utts):
            hyp = judges.recognizer.transcribe([load_recording(utt, cfg.features.sample_rate)], cfg.features.sample_rate)[0]
            e = word_errors(utt.text, hyp)
            errors.append(e)
            by_emotion.setdefault(utt.emotion, []).append(e)
            if utt.word_frame_spans is not None:
                intact.append(e)
            if progress is not None and ((i + 1) % 10 == 0 or i + 1 == len(utts)):
                progress(f"checks: recognise {jc.check_split} recordings", i + 1, len(utts))
        result.update({
            "recognizer": judges.recognizer.name,
            "wer": corpus_wer(errors), "wer_per_emotion": {e: corpus_wer(v) for e, v in by_emotion.items()},
            "wer_marks_intact": corpus_wer(intact) if intact else None, "n_marks_intact": len(intact),
        })
    result["seconds"] = round(time.monotonic() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def checks_markdown(checks: dict, meta: dict) -> str:
    pct = lambda x: "–" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    lines = [f"# Judges ({checks['split']} split, {checks['n_utterances']} utterances)\n",
             f"Emotion judge trained on {meta.get('train_utterances', '?')} train-split recordings "
             f"(val recall {pct(meta.get('val_recall'))}, after Griffin-Lim {pct(meta.get('val_recall_griffin_lim'))}).\n",
             "| | recordings | Griffin-Lim resynthesis |", "|---|---:|---:|",
             f"| emotion recall (macro) | {pct(checks['emotion_recall'])} | {pct(checks['emotion_recall_griffin_lim'])} |"]
    for e in checks["emotions"]:
        lines.append(f"| recall {e} | {pct(checks['emotion_recall_per_emotion'].get(e))} | "
                     f"{pct(checks['emotion_recall_griffin_lim_per_emotion'].get(e))} |")
    lines.append(f"\nRecall drop through the vocoder: {checks['recall_drop_points']:.1f} points.\n")
    if "wer" in checks:
        lines.append(f"WER ({checks['recognizer']}) on the recordings: **{pct(checks['wer'])}**; on the "
                     f"{checks['n_marks_intact']} clips whose word marks are intact: {pct(checks['wer_marks_intact'])}. "
                     "Per emotion: " + ", ".join(f"{e} {pct(v)}" for e, v in checks["wer_per_emotion"].items()) + ".")
    return "\n".join(lines) + "\n"


def run_judges_stage(cfg: RunConfig, console, tracker, resume: bool = False) -> dict:  # noqa: ANN001
    from rlhf_tts.eval.judges.emotion import emotion_judge_location
    from rlhf_tts.run import StageProgress, progress_bar

    start = time.monotonic()
    with progress_bar(console) as progress, torch_threads(cfg.judges.threads):
        report = StageProgress(progress)
        ensure_emotion_judge(cfg, report, tracker, resume)
        judges = load_judges(cfg, report, asr=cfg.judges.check_wer, dnsmos=False, tracker=tracker)
        checks = judge_checks(cfg, judges, report)
    location = emotion_judge_location(cfg)
    meta = json.loads(location.meta.read_text())
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"emotion_judge": str(location.directory), "checks": checks,
               "judge": {k: meta.get(k) for k in ("train_utterances", "val_recall", "val_recall_griffin_lim", "seconds")},
               "seconds": round(time.monotonic() - start, 1)}
    if cfg.judges.asr_backend == "pocketsphinx" and cfg.judges.check_wer:
        from rlhf_tts.eval.asr import domain_asr_location

        asr = domain_asr_location(cfg)
        summary["recognizer"] = {"directory": str(asr.directory), **json.loads(asr.info.read_text())}
    (out / "judges_report.json").write_text(json.dumps(summary, indent=1))
    (out / "judges_report.md").write_text(checks_markdown(checks, meta))
    console.print(checks_markdown(checks, meta), highlight=False)
    metrics = {"judges/check/emotion_recall": checks["emotion_recall"],
               "judges/check/emotion_recall_griffin_lim": checks["emotion_recall_griffin_lim"],
               "judges/check/recall_drop_points": checks["recall_drop_points"]}
    if checks.get("wer") is not None:
        metrics["judges/check/wer"] = checks["wer"]
    if checks.get("wer_marks_intact") is not None:
        metrics["judges/check/wer_marks_intact"] = checks["wer_marks_intact"]
    tracker.log_metrics(metrics)
    for name in ("judges_report.md", "judges_report.json"):
        tracker.log_artifact(out / name, "judges")
    return summary
