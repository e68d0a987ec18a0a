"""Paired differences between two systems of a report: system − baseline on the same utterances.

Every system of a report is judged on the same utterances, so the question "did alignment help?"
is a paired one: each utterance's text, speaker and emotion are shared by both rows, and much of the
spread of a row's bootstrap interval is which utterances happen to be hard. Resampling utterances
once and taking both systems' metric on the same resample (`value(w @ S_a) - value(w @ S_b)`) keeps
that shared part out of the difference's interval. The per-row intervals of the report stay as they
are (two rows whose intervals do not overlap differ by any test); this adds the sharper, paired
reading beside them.

Built from the per-utterance rows the report writes (`per_utterance.csv`; cached rows carry them
too), so a difference needs no re-judging. Utterances missing from either system are left out of
both; a mean metric uses the utterances where both systems have a finite value. Word-level VAD CCC
is pooled over words that the rows do not keep, so it has no paired difference.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_tts.eval.metrics import (Estimate, Metric, bootstrap_weights, macro_recall_metric, mean_metric,
                                   percentile_estimate, ratio_metric)

#: Per-utterance mean metrics a row may carry (prosody and DNSMOS columns of `UtteranceScores.rows`).
MEAN_COLUMNS = ("emo_sim", "f0_corr", "f0_rmse_st", "energy_corr", "energy_rmse_db", "duration_error",
                "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl")


def _column(rows: Sequence[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows], dtype=np.float64)


def paired_metrics(system_rows: Sequence[dict], baseline_rows: Sequence[dict], emotions: Sequence[str]
                   ) -> dict[str, tuple[Metric, Metric]]:
    """(system metric, baseline metric) per metric, both over the same utterances in the same order."""
    baseline_by_id = {r["utt_id"]: r for r in baseline_rows}
    mine = [r for r in system_rows if r["utt_id"] in baseline_by_id]
    theirs = [baseline_by_id[r["utt_id"]] for r in mine]
    out: dict[str, tuple[Metric, Metric]] = {}
    if not mine:
        return out
    index = {e: i for i, e in enumerate(emotions)}
    targets = [index[r["emotion"]] for r in mine]
    out["emotion_recall"] = tuple(  # type: ignore[assignment]
        macro_recall_metric("emotion_recall", targets, [index[r["predicted"]] for r in rows], len(emotions))
        for rows in (mine, theirs))
    if all("reference_words" in r for r in mine + theirs):
        out["wer"] = tuple(  # type: ignore[assignment]
            ratio_metric("wer", _column(rows, "substitutions") + _column(rows, "deletions")
                         + _column(rows, "insertions"), _column(rows, "reference_words"))
            for rows in (mine, theirs))
    for key in MEAN_COLUMNS:
        if not any(key in r for r in mine) or not any(key in r for r in theirs):
            continue
        a, b = _column(mine, key), _column(theirs, key)
        both = np.isfinite(a) & np.isfinite(b)
        if both.any():
            out[key] = (mean_metric(key, np.where(both, a, np.nan)), mean_metric(key, np.where(both, b, np.nan)))
    return out


def paired_difference(system: Metric, baseline: Metric, weights: np.ndarray, confidence: float = 0.95) -> Estimate:
    """system − baseline over all utterances, with the percentile interval of the same resamples of both."""
    return percentile_estimate(float(system.over() - baseline.over()), min(system.n, baseline.n),
                               lambda: system.over(weights) - baseline.over(weights), confidence)


def paired_differences(system_rows: Sequence[dict], baseline_rows: Sequence[dict], emotions: Sequence[str],
                       resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Estimate]:
    """{metric: Estimate of system − baseline} on the utterances both systems have."""
    metrics = paired_metrics(system_rows, baseline_rows, emotions)
    if not metrics:
        return {}
    n = next(iter(metrics.values()))[0].stats.shape[0]
    weights = bootstrap_weights(n, resamples, seed)
    return {key: paired_difference(a, b, weights, confidence) for key, (a, b) in metrics.items()}
