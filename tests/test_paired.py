"""Paired differences (rlhf_tts/eval/paired.py): system − baseline on the same utterance resamples."""

import numpy as np
import pytest

from rlhf_tts.eval.metrics import bootstrap_weights, estimate, mean_metric
from rlhf_tts.eval.paired import paired_differences
from rlhf_tts.eval.report import Report, SystemResult, compare_with_baseline

EMOTIONS = ["Neutral", "Angry", "Happy"]


def _rows(system: str, emo_sim: np.ndarray, predicted: list[str], errors: list[int], **extra) -> list[dict]:
    return [{"system": system, "utt_id": f"u{i:03d}", "emotion": EMOTIONS[i % 3], "emo_sim": float(emo_sim[i]),
             "predicted": predicted[i], "substitutions": errors[i], "deletions": 0, "insertions": 0,
             "reference_words": 10, **{k: v[i] for k, v in extra.items()}} for i in range(len(emo_sim))]


def test_a_shared_difficulty_cancels_in_the_paired_interval_but_not_in_the_rows():
    """Utterance difficulty spread over [0, 1] with a +0.02 shift: the rows' intervals overlap, the
    paired interval holds +0.02 and is clear of 0."""
    rng = np.random.default_rng(0)
    n = 120
    difficulty = rng.uniform(0.0, 1.0, n)
    base_sim, aligned_sim = difficulty, difficulty + 0.02 + rng.normal(0, 0.01, n)
    labels = [EMOTIONS[i % 3] for i in range(n)]
    base = _rows("base", base_sim, labels, [1] * n)
    aligned = _rows("aligned", aligned_sim, labels, [1] * n)
    diff = paired_differences(aligned, base, EMOTIONS, resamples=500, seed=1)["emo_sim"]
    assert diff.value == pytest.approx(float(np.mean(aligned_sim - base_sim)))
    assert 0.0 < diff.low < 0.02 < diff.high < 0.04
    weights = bootstrap_weights(n, 500, 2)
    row_a, row_b = estimate(mean_metric("a", aligned_sim), weights), estimate(mean_metric("b", base_sim), weights)
    assert row_a.low < row_b.high  # the rows' own intervals overlap
    assert diff.high - diff.low < (row_b.high - row_b.low) / 5


def test_recall_and_wer_differences_are_the_metrics_differences_on_shared_utterances_only():
    n = 30
    sim = np.linspace(0.1, 0.9, n)
    truth = [EMOTIONS[i % 3] for i in range(n)]
    base_pred = ["Neutral"] * n  # recall: Neutral 1, others 0 → 1/3
    aligned_pred = truth[:15] + ["Neutral"] * 15  # every class right on the first half
    base = _rows("base", sim, base_pred, [2] * n)
    aligned = _rows("aligned", sim, aligned_pred, [1] * n)
    diffs = paired_differences(aligned, base, EMOTIONS, resamples=200)
    # recall of aligned: Neutral 10/10, Angry 5/10, Happy 5/10 → 2/3
    assert diffs["emotion_recall"].value == pytest.approx(2 / 3 - 1 / 3)
    assert diffs["wer"].value == pytest.approx(0.1 - 0.2)  # 1 vs 2 edits per 10 words
    assert diffs["wer"].low == pytest.approx(-0.1) and diffs["emo_sim"].value == pytest.approx(0.0)
    # an utterance the aligned system lacks leaves both sides; a NaN leaves that metric's pair
    f0 = np.linspace(0.0, 1.0, n)
    f0_base = f0.copy()
    f0_base[0] = np.nan
    diffs = paired_differences(_rows("a", sim, aligned_pred, [1] * n, f0_corr=f0 + 0.5)[:-1],
                               _rows("b", sim, base_pred, [2] * n, f0_corr=f0_base), EMOTIONS, resamples=50)
    assert diffs["f0_corr"].value == pytest.approx(0.5) and diffs["f0_corr"].n == n - 2
    assert diffs["emo_sim"].n == n - 1


def test_the_report_compares_rows_after_the_first_model_row_and_round_trips(tmp_path):
    def result(name: str, kind: str) -> SystemResult:
        return SystemResult(name, kind, "src", 30, 1.0, {}, {}, [[0] * 3] * 3)

    n = 30
    sim = np.linspace(0.1, 0.9, n)
    labels = [EMOTIONS[i % 3] for i in range(n)]
    rows = (_rows("ground truth", sim + 0.5, labels, [0] * n) + _rows("base model", sim, labels, [2] * n)
            + _rows("aligned", sim + 0.1, labels, [2] * n))
    results = [result("ground truth", "resynthesis"), result("base model", "model"), result("aligned", "model")]
    baseline, paired = compare_with_baseline(results, rows, EMOTIONS, 100, 0.95, 0)
    assert baseline == "base model" and list(paired) == ["aligned"]
    assert paired["aligned"]["emo_sim"].value == pytest.approx(0.1)
    assert compare_with_baseline(results[:2], rows, EMOTIONS, 100, 0.95, 0) == (None, {})
    report = Report("test", n, EMOTIONS, 0.95, 100, results, {}, baseline, paired)
    report.write(tmp_path)
    again = Report.load(tmp_path / "report.json")
    assert again.baseline == "base model" and again.paired == paired
    assert "## Against the base model (paired)" in again.markdown() and "+10.0" in again.markdown()
    assert again.paired_table() is not None and Report("t", n, EMOTIONS, 0.95, 10, results[:2]).paired_table() is None


def test_a_signed_difference_that_rounds_to_zero_prints_without_a_minus():
    from rlhf_tts.eval.metrics import Estimate
    from rlhf_tts.eval.report import format_estimate

    assert format_estimate("duration_error", Estimate(-1e-6, -2e-6, 1e-6, 5), signed=True) == "+0.0 [+0.0, +0.0]"
    assert format_estimate("wer", Estimate(-0.001, -0.021, 0.022, 5), signed=True) == "-0.1 [-2.1, +2.2]"
    assert format_estimate("emo_sim", Estimate(0.4382, 0.40185, 0.47355, 5)) == "43.8 [40.2, 47.4]"
