"""Figures people would rather look at than read (rendered off-screen with matplotlib's Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def mel_figure(mel: np.ndarray, title: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    image = ax.imshow(mel, origin="lower", aspect="auto", interpolation="none")
    ax.set_title(title[:90], fontsize=9)
    ax.set_xlabel("frame")
    ax.set_ylabel("mel bin")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(matrices: list[tuple[str, np.ndarray]], labels: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrices (target rows, judged columns) of several systems side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.4 * len(matrices) + 0.6, 3.6), squeeze=False)
    for ax, (name, counts) in zip(axes[0], matrices):
        rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(labels)), [l[:3] for l in labels], fontsize=7)
        ax.set_yticks(range(len(labels)), [l[:3] for l in labels], fontsize=7)
        ax.set_title(name[:32], fontsize=8)
        ax.set_xlabel("judged", fontsize=7)
    axes[0][0].set_ylabel("target", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def systems_figure(utterance, outputs: dict, reference_f0: np.ndarray, features, path: str | Path) -> Path:  # noqa: ANN001
    """One utterance across systems: a row per system with its mel (left) and F0 contour (right),
    the reference recording's F0 drawn in grey under each contour."""
    from rlhf_tts.data.features import log_mel

    plt = _pyplot()
    names = list(outputs)
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 1.9 * len(names) + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    hop_s = features.hop_length / features.sample_rate
    ref_t = np.arange(len(reference_f0)) * hop_s
    for row, name in enumerate(names):
        audio, mel, f0 = outputs[name]
        mel = log_mel(audio, features) if mel is None else mel
        axes[row][0].imshow(mel, origin="lower", aspect="auto", interpolation="none")
        axes[row][0].set_ylabel(name[:22], fontsize=7)
        axes[row][0].tick_params(labelsize=6)
        ax = axes[row][1]
        ax.plot(ref_t, np.where(reference_f0 > 0, reference_f0, np.nan), color="0.7", lw=2, label="recording")
        if f0 is not None:
            ax.plot(np.arange(len(f0)) * hop_s, np.where(f0 > 0, f0, np.nan), color="C3", lw=1, label=name[:20])
        ax.set_ylabel("F0 Hz", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="upper right")
    axes[-1][0].set_xlabel("frame", fontsize=7)
    axes[-1][1].set_xlabel("s", fontsize=7)
    fig.suptitle(f"{utterance.emotion}: {utterance.text}"[:110], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def alignment_curves_figure(history: list[dict[str, float]], title: str, path: str | Path) -> Path:
    """EASPO training curves against learner updates: loss, reward and log-ratio margins, kept pairs, the
    implicit accuracy on fresh pairs (with its no-preference line at 0.5) and the band-level KL to the
    reference (how far the decoder's per-band level has moved: on the tiny preset, where the judge's
    gains and losses came from) and the level of its clean estimate against mu's (align.level_target)."""
    plt = _pyplot()
    panels = [("loss", "loss"), ("reward_margin", "reward margin S_w - S_l"),
              ("log_ratio_margin", "log-ratio margin l_w - l_l"), ("kept_fraction", "kept-pair fraction"),
              ("implicit_accuracy", "implicit accuracy, fresh pairs"), ("band_kl", "band-level KL to reference"),
              ("level_gap", "level gap to mu (clean estimate)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(row["updates"], row[key]) for row in history if key in row and "updates" in row]
        if points:
            x, y = zip(*points)
            ax.plot(x, y, ".", ms=3, alpha=0.5)
            if len(y) >= 5:  # a moving average, since single updates are noisy
                window = max(3, len(y) // 10)
                smooth = np.convolve(y, np.ones(window) / window, mode="valid")
                ax.plot(x[window - 1:], smooth, "-", lw=1.5)
        if key == "implicit_accuracy":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")  # no preference carried to new states
        if key == "level_gap":
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")  # the clean estimate at mu's level
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("learner update", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title[:100], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
