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
