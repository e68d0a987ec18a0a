"""Griffin-Lim round trips of the corpus's mels (mel → audio → log-mel), computed once per split and cached.

Every evaluated system reaches the judges through the vocoder; the recordings do not. Two models
train on these round trips so that the vocoder's smearing carries no emotion for them: the emotion
judge (`judges.emotion_augment`) and EASPM (`easpm.resynthesis_augment`). Measured on the tiny preset's
test split, an EASPM trained on clean mels only names Sad for 97 of 100 round-tripped recordings and
Angry for 79 of 100 base-model outputs, while the judge hears both mostly right: smoothed speech is
off its manifold. The cache lives under `<cache_dir>/resynthesis/<key>/<split>.safetensors` (key: the
dataset, the features and the vocoder's settings), written atomically, so whichever stage needs a
split first pays for it and the other reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from rlhf_tts.config import FeatureConfig, RunConfig, stable_hash

RESYNTHESIS_VERSION = 1
ProgressFn = Callable[..., None]


def length_batches(lengths: Sequence[int], batch_size: int, min_size: int = 1) -> list[list[int]]:
    """Indices grouped by length (little padding); a last batch under `min_size` joins the one before
    (training needs >= 2 items per batch for batch normalisation)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        batches[-2].extend(batches.pop())
    return batches


def pad_mels(mels: Sequence[np.ndarray], index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """mels[index] zero-padded to a (B, n_mels, T_max) batch, with their lengths."""
    n = max(mels[i].shape[-1] for i in index)
    batch = torch.zeros(len(index), mels[index[0]].shape[0], n)
    for row, i in enumerate(index):
        batch[row, :, : mels[i].shape[-1]] = torch.from_numpy(np.asarray(mels[i], dtype=np.float32))
    return batch, torch.tensor([mels[i].shape[-1] for i in index])


def griffin_lim_mels(mels: Sequence[np.ndarray], features: FeatureConfig, progress: ProgressFn | None = None,
                     label: str = "griffin-lim resynthesis", batch_size: int = 16) -> list[np.ndarray]:
    """mel → Griffin-Lim audio → log-mel, the path every evaluated system's audio takes."""
    from rlhf_tts.data.features import LogMel
    from rlhf_tts.models.vocoder import GriffinLimVocoder

    vocoder, extractor = GriffinLimVocoder(features), LogMel(features)
    out: list[np.ndarray | None] = [None] * len(mels)
    done = 0
    with torch.no_grad():
        for index in length_batches([m.shape[-1] for m in mels], batch_size):
            batch, lengths = pad_mels(mels, index)
            audio = vocoder(batch)
            for row, i in enumerate(index):
                n = int(lengths[row])
                out[i] = extractor(audio[row, : n * features.hop_length]).numpy()[:, :n]
            done += len(index)
            if progress:
                progress(label, done, len(mels))
    return out  # type: ignore[return-value]


def resynthesis_directory(cfg: RunConfig, dataset_dir: Path) -> Path:
    """Where the round trips of `dataset_dir` under `cfg.features` are cached (nothing is built)."""
    from rlhf_tts.models.vocoder import GriffinLimVocoder

    vocoder = GriffinLimVocoder(cfg.features)
    key = stable_hash(Path(dataset_dir).name, cfg.features, {"vocoder": "griffin_lim", "n_iter": vocoder.n_iter,
                                                              "momentum": vocoder.momentum}, RESYNTHESIS_VERSION)
    return Path(cfg.cache_dir) / "resynthesis" / key


def resynthesised_split(cfg: RunConfig, split: str, progress: ProgressFn | None = None,
                        label: str | None = None) -> dict[str, np.ndarray]:
    """utt_id → Griffin-Lim round trip of that recording's mel, for every utterance of `split`.

    The split is always resynthesised whole and in the manifest's order (`load_split`'s: the batches,
    and so the zero-padded edges of each clip, do not depend on who asks first)."""
    from safetensors.numpy import load_file, save_file

    from rlhf_tts.data.manifest import read_manifest
    from rlhf_tts.data.pipeline import dataset_location

    dataset, _ = dataset_location(cfg)
    path = resynthesis_directory(cfg, dataset.directory) / f"{split}.safetensors"
    if path.is_file():
        return load_file(str(path))
    rows = [r for r in read_manifest(dataset.manifest_path).to_pylist() if r["split"] == split]  # manifest order
    shards: dict[str, dict[str, np.ndarray]] = {}
    for row in rows:
        if row["speaker"] not in shards:
            shards[row["speaker"]] = load_file(str(dataset.mel_dir / f"{row['speaker']}.safetensors"))
    recordings = [shards[r["speaker"]][r["utt_id"]] for r in rows]
    mels = griffin_lim_mels(recordings, cfg.features, progress, label or f"griffin-lim round trip ({split})") if rows else []
    stored = {r["utt_id"]: np.ascontiguousarray(m) for r, m in zip(rows, mels)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if stored:
        save_file(stored, str(tmp))
        os.replace(tmp, path)
    return stored
