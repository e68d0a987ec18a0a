"""The report's metrics as sums over utterances, so that one bootstrap serves every metric.

Each metric is defined by per-utterance *sufficient statistics* (a small row of numbers per
utterance) and a function from their column sums to the value (`Metric.value`). The value over a
set of utterances is `value(S.sum(0))`; a bootstrap resample is a vector of utterance counts `w`,
and its value is `value(w @ S)`, so 1,000 resamples of every metric cost a few matrix products.
This covers ratios of sums (corpus WER = total edits / total reference words, not a mean of
per-utterance rates), macro averages (emotion recall: per-class hits and counts), pooled
correlations (word VAD CCC from the pooled moments of all words) and plain means (Emo SIM,
prosody, DNSMOS), with NaN entries (an utterance with no voiced frames) left out of their mean.

Confidence intervals are percentile intervals over utterance resamples (Efron's percentile
bootstrap): utterances are the unit that varies, frames and words within one are not independent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A metric's value over the utterances and its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict[str, float]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "Estimate":
        return cls(*(float("nan") if data[k] is None else data[k] for k in ("value", "low", "high")), int(data["n"]))


@dataclass(frozen=True)
class Metric:
    """Per-utterance statistics (N, k) and how their column sums become the metric."""

    name: str
    stats: np.ndarray
    value: Callable[[np.ndarray], np.ndarray]  # (..., k) sums → (...) values
    counted: Callable[[np.ndarray], int] | None = None  # how many utterances contribute (default: all rows)

    @property
    def n(self) -> int:
        return int(self.counted(self.stats)) if self.counted is not None else int(self.stats.shape[0])

    def over(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Value for all utterances (weights None) or per row of a (B, N) weight matrix."""
        sums = self.stats.sum(0) if weights is None else weights @ self.stats
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(self.value(sums), dtype=np.float64)


# ----------------------------------------------------------------------------- statistics


def _ratio(sums: np.ndarray) -> np.ndarray:
    return np.where(sums[..., 1] > 0, sums[..., 0] / np.maximum(sums[..., 1], 1e-300), np.nan)


def mean_metric(name: str, values: Sequence[float]) -> Metric:
    """Mean over utterances of finite values (NaN/inf entries are left out, not counted as zero)."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    return Metric(name, np.stack([np.where(finite, x, 0.0), finite.astype(np.float64)], axis=1), _ratio,
                  lambda stats: stats[:, 1].sum())


def ratio_metric(name: str, numerators: Sequence[float], denominators: Sequence[float]) -> Metric:
    """Sum of numerators over sum of denominators (corpus WER: edits / reference words)."""
    return Metric(name, np.stack([np.asarray(numerators, float), np.asarray(denominators, float)], axis=1), _ratio)


def macro_recall_metric(name: str, targets: Sequence[int], predictions: Sequence[int], n_classes: int) -> Metric:
    """Recall per class, averaged over the classes present (macro): chance is 1 / n_classes."""
    t, p = np.asarray(targets), np.asarray(predictions)
    stats = np.zeros((len(t), 2 * n_classes))
    stats[np.arange(len(t)), t] = (t == p).astype(float)
    stats[np.arange(len(t)), n_classes + t] = 1.0

    def value(sums: np.ndarray) -> np.ndarray:
        hits, counts = sums[..., :n_classes], sums[..., n_classes:]
        present = counts > 0
        recall = np.where(present, hits / np.maximum(counts, 1e-300), 0.0)
        return np.where(present.any(-1), recall.sum(-1) / np.maximum(present.sum(-1), 1), np.nan)

    return Metric(name, stats, value)


def pooled_ccc_metric(name: str, predicted: Sequence[np.ndarray | None], target: Sequence[np.ndarray | None]) -> Metric:
    """Concordance correlation of (n_words, D) predictions and targets, pooled over all words of the
    utterances and averaged over the D dimensions (valence, arousal, dominance).

    Pooled rather than per utterance (HPRO's training loss takes it within one utterance): an
    utterance has 5-12 words, too few for a stable CCC each, and pooling keeps the between-utterance
    differences that an emotion shows. Utterances without word predictions contribute nothing.
    """
    dims = next((p.shape[1] for p in predicted if p is not None), 3)
    stats = np.zeros((len(predicted), 6 * dims))
    for i, (p, y) in enumerate(zip(predicted, target)):
        if p is None or y is None or len(p) == 0:
            continue
        n = min(len(p), len(y))
        p, y = np.asarray(p[:n], float), np.asarray(y[:n], float)
        stats[i] = np.concatenate([np.full(dims, n), p.sum(0), y.sum(0), (p * p).sum(0), (y * y).sum(0), (p * y).sum(0)])

    def value(sums: np.ndarray) -> np.ndarray:
        n, sx, sy, sxx, syy, sxy = (sums[..., k * dims:(k + 1) * dims] for k in range(6))
        n = np.maximum(n, 1e-300)
        mx, my = sx / n, sy / n
        vx, vy = sxx / n - mx**2, syy / n - my**2
        cov = sxy / n - mx * my
        ccc = 2 * cov / (vx + vy + (mx - my) ** 2 + 1e-12)
        return np.where(sums[..., 0] >= 2, ccc.mean(-1), np.nan)

    return Metric(name, stats, value)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two (N, E) arrays."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def macro_recall(targets: Sequence[int], predictions: Sequence[int], n_classes: int) -> float:
    return float(macro_recall_metric("recall", targets, predictions, n_classes).over())


def confusion_matrix(targets: Sequence[int], predictions: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts (target row, predicted column)."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Concordance correlation coefficient of two 1-D arrays (Lin, 1989)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    return float(2 * cov / (x.var() + y.var() + (mx - my) ** 2 + 1e-12))


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts of each utterance in each resample (multinomial, n draws)."""
    if n == 0:
        return np.zeros((resamples, 0))
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def estimate(metric: Metric, weights: np.ndarray, confidence: float = 0.95) -> Estimate:
    """The metric over all utterances, and the percentile interval of its bootstrap resamples."""
    return percentile_estimate(float(metric.over()), metric.n, lambda: metric.over(weights), confidence)


def percentile_estimate(value: float, n: int, resampled: Callable[[], np.ndarray], confidence: float = 0.95
                        ) -> Estimate:
    """`value` with the percentile interval of `resampled()` (its finite entries); no interval when
    nothing is counted or the value is not finite (then the resamples are not computed)."""
    if n == 0 or not np.isfinite(value):
        return Estimate(value, float("nan"), float("nan"), n)
    samples = resampled()
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return Estimate(value, float("nan"), float("nan"), n)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Estimate(value, float(low), float(high), n)


def subset(metric: Metric, index: np.ndarray) -> Metric:
    return Metric(metric.name, metric.stats[index], metric.value, metric.counted)
