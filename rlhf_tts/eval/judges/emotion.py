"""The emotion judge: utterance embedding, emotion posteriors and word-level VAD from audio.

Architecture (chosen to differ from EASPM's time-FiLM transformer): an ECAPA-TDNN-style network
over log-mels of the project's front end — a conv stem, three SE-Res2-like dilated TDNN blocks
(dilations 2, 3, 4), multi-layer feature aggregation, attentive statistics pooling with global
context — then a linear embedding (batch-normalised, the vector Emo SIM compares) and a linear
classifier. A word head pools the aggregated frame features over each word's frames (mean and
standard deviation) and predicts valence, arousal and dominance in [0, 1].

Training sees only the train split's recordings (mels cached by the data stage), never a generated
utterance. Because every system is heard through a vocoder (Griffin-Lim by default) while the
recordings are not, each training item is, with probability `judges.emotion_augment`, replaced by
its own Griffin-Lim resynthesis (mel → Griffin-Lim → audio → log-mel), computed once per split in the
shared cache of `rlhf_tts.data.resynthesis` (EASPM can train on the same round trips): the judge
learns that the vocoder's smearing carries no emotion. Loss: cross-entropy with label smoothing 0.1,
plus `emotion_vad_weight` × (MSE + mean over V, A, D of 1 − CCC) over the words of the batch that
have trusted boundaries (see `rlhf_tts.eval.corpus`).

The judge is cached under `<cache_dir>/judges/emotion/<key>/`, the key hashing the dataset, the
features, the `judges.emotion_*` fields and the seed (like the base model's `pretrain_key`), with
atomic checkpoints every epoch (`rlhf_tts.checkpoint`) so `--resume` continues an interrupted run.
It is an evaluation instrument only: nothing under rlhf_tts/algos, rlhf_tts/rewards or actors may
import it (a test parses their imports).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlhf_tts.config import FeatureConfig, RunConfig, stable_hash
from rlhf_tts.data.emotions import EMOTIONS
from rlhf_tts.data.resynthesis import length_batches as _length_batches, pad_mels as _pad
from rlhf_tts.eval.metrics import macro_recall

JUDGE_VERSION = 1
ProgressFn = Callable[..., None]

# ----------------------------------------------------------------------------- network


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1.0)


class SEResBlock(nn.Module):
    """1x1 → dilated k=3 → 1x1 convolutions with squeeze-excitation and a residual connection."""

    def __init__(self, channels: int, dilation: int, se_ratio: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 1)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, dilation=dilation, padding=dilation)
        self.bn2 = nn.BatchNorm1d(channels)
        self.conv3 = nn.Conv1d(channels, channels, 1)
        self.bn3 = nn.BatchNorm1d(channels)
        self.se = nn.Sequential(nn.Linear(channels, channels // se_ratio), nn.ReLU(),
                                nn.Linear(channels // se_ratio, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x))) * mask
        h = F.relu(self.bn2(self.conv2(h))) * mask
        h = self.bn3(self.conv3(h)) * mask
        scale = self.se(_masked_mean(h, mask).squeeze(-1)).unsqueeze(-1)
        return F.relu(x + h * scale) * mask


class AttentiveStatsPool(nn.Module):
    """Channel-wise attention over time with global context (ECAPA), returning weighted mean and std."""

    def __init__(self, channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.attention = nn.Sequential(nn.Conv1d(channels * 3, hidden, 1), nn.Tanh(), nn.Conv1d(hidden, channels, 1))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mean = _masked_mean(h, mask)
        std = torch.sqrt(_masked_mean((h - mean) ** 2, mask) + 1e-5)
        context = torch.cat([h, mean.expand_as(h), std.expand_as(h)], dim=1)
        logits = self.attention(context).masked_fill(mask == 0, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        mu = (weights * h).sum(-1)
        sigma = torch.sqrt(((weights * h * h).sum(-1) - mu**2).clamp_min(1e-5))
        return torch.cat([mu, sigma], dim=1)


class EmotionJudgeNet(nn.Module):
    def __init__(self, n_mels: int, channels: int, embedding_dim: int, n_emotions: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(n_mels))
        self.register_buffer("feature_std", torch.ones(n_mels))
        self.stem = nn.Conv1d(n_mels, channels, 5, padding=2)
        self.stem_bn = nn.BatchNorm1d(channels)
        self.blocks = nn.ModuleList([SEResBlock(channels, d) for d in (2, 3, 4)])
        wide = channels * 3
        self.aggregate = nn.Conv1d(wide, wide, 1)
        self.pool = AttentiveStatsPool(wide)
        self.pool_bn = nn.BatchNorm1d(wide * 2)
        self.embed = nn.Linear(wide * 2, embedding_dim)
        self.embed_bn = nn.BatchNorm1d(embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, n_emotions)
        self.word_head = nn.Sequential(nn.Linear(wide * 2, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 3))

    def frames(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (mel - self.feature_mean[:, None]) / self.feature_std[:, None] * mask
        h = F.relu(self.stem_bn(self.stem(x))) * mask
        outs = []
        for block in self.blocks:
            h = block(h, mask)
            outs.append(h)
        return F.relu(self.aggregate(torch.cat(outs, dim=1))) * mask

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor,
                word_spans: Sequence[Sequence[tuple[int, int]] | None] | None = None) -> dict[str, object]:
        """(B, n_mels, T) log-mels → embedding (B, E), logits (B, K), per-utterance word VAD (n_words, 3)."""
        mask = (torch.arange(mel.shape[-1], device=mel.device)[None, :] < lengths[:, None]).unsqueeze(1).to(mel.dtype)
        frames = self.frames(mel, mask)
        embedding = self.embed_bn(self.embed(self.pool_bn(self.pool(frames, mask))))
        logits = self.classifier(self.dropout(embedding))
        word_vad: list[torch.Tensor | None] = []
        if word_spans is not None:
            pooled, counts = [], []
            for b, spans in enumerate(word_spans):
                if not spans:
                    counts.append(0)
                    continue
                n = int(lengths[b])
                weights = torch.zeros(len(spans), frames.shape[-1], device=mel.device)
                for w, (start, end) in enumerate(spans):
                    start, end = min(max(start, 0), n - 1), min(max(end, start + 1), n)
                    weights[w, start:max(end, start + 1)] = 1.0
                weights = weights / weights.sum(-1, keepdim=True)
                mean = weights @ frames[b].T  # (W, C)
                std = torch.sqrt((weights @ (frames[b].T ** 2) - mean**2).clamp_min(1e-5))
                pooled.append(torch.cat([mean, std], dim=1))
                counts.append(len(spans))
            predicted = torch.sigmoid(self.word_head(torch.cat(pooled))) if pooled else None
            offset = 0
            for count in counts:
                word_vad.append(predicted[offset:offset + count] if count and predicted is not None else None)
                offset += count
        return {"embedding": embedding, "logits": logits, "word_vad": word_vad}


# ----------------------------------------------------------------------------- location and loading


@dataclass(frozen=True)
class JudgeLocation:
    directory: Path

    @property
    def final(self) -> Path:
        return self.directory / "final"

    @property
    def meta(self) -> Path:
        return self.directory / "judge.json"

    def exists(self) -> bool:
        return (self.final / "state.json").is_file() and self.meta.is_file()


def emotion_judge_key(cfg: RunConfig, dataset_dir: Path) -> str:
    fields = {k: v for k, v in cfg.judges.model_dump(mode="json").items()
              if k.startswith("emotion_") and k != "emotion_log_every"}
    return stable_hash(dataset_dir.name, cfg.features, fields, cfg.seed, JUDGE_VERSION)


def emotion_judge_location(cfg: RunConfig) -> JudgeLocation:
    """Where the emotion judge for `cfg` is (or will be), without training anything."""
    from rlhf_tts.data.pipeline import dataset_location

    dataset, _ = dataset_location(cfg)
    return JudgeLocation(Path(cfg.cache_dir) / "judges" / "emotion" / emotion_judge_key(cfg, dataset.directory))


@dataclass
class JudgeOutput:
    embeddings: np.ndarray  # (N, E)
    posteriors: np.ndarray  # (N, K) softmax
    word_vad: list[np.ndarray | None]  # per utterance (n_words, 3), where word spans were given

    @property
    def predictions(self) -> np.ndarray:
        return self.posteriors.argmax(axis=1)


class EmotionJudge:
    """A trained judge with batched inference on mels or audio."""

    def __init__(self, net: EmotionJudgeNet, features: FeatureConfig, emotions: tuple[str, ...],
                 device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.net = net.to(device).eval()
        self.features, self.emotions, self.device, self.batch_size = features, emotions, torch.device(device), batch_size
        self._extractor = None

    @classmethod
    def load(cls, location: JudgeLocation, device: str | torch.device = "cpu", batch_size: int = 32) -> "EmotionJudge":
        from rlhf_tts.checkpoint import load_model_weights

        meta = json.loads(location.meta.read_text())
        net = EmotionJudgeNet(meta["n_mels"], meta["channels"], meta["embedding_dim"], len(meta["emotions"]),
                              meta["dropout"])
        load_model_weights(location.final, net)
        return cls(net, FeatureConfig.model_validate(meta["features"]), tuple(meta["emotions"]), device, batch_size)

    @torch.no_grad()
    def judge_mels(self, mels: Sequence[np.ndarray],
                   word_spans: Sequence[Sequence[tuple[int, int]] | None] | None = None) -> JudgeOutput:
        """Batched (length-sorted) inference on (n_mels, T) log-mels of the judge's front end."""
        n = len(mels)
        embeddings: list[np.ndarray | None] = [None] * n
        posteriors: list[np.ndarray | None] = [None] * n
        vad: list[np.ndarray | None] = [None] * n
        for index in _length_batches([m.shape[-1] for m in mels], self.batch_size):
            batch, lengths = _pad(mels, index)
            spans = [word_spans[i] for i in index] if word_spans is not None else None
            out = self.net(batch.to(self.device), lengths.to(self.device), spans)
            emb = out["embedding"].cpu().numpy()
            post = torch.softmax(out["logits"], dim=-1).cpu().numpy()
            for row, i in enumerate(index):
                embeddings[i], posteriors[i] = emb[row], post[row]
                if spans is not None and out["word_vad"][row] is not None:
                    vad[i] = out["word_vad"][row].cpu().numpy()
        return JudgeOutput(np.stack(embeddings), np.stack(posteriors), vad)  # type: ignore[arg-type]

    def log_mel(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        from rlhf_tts.data.features import LogMel, log_mel
        from rlhf_tts.eval.asr import to_rate

        if self._extractor is None:
            self._extractor = LogMel(self.features)
        return log_mel(to_rate(audio, sample_rate, self.features.sample_rate), self.features, self._extractor)

    def judge_audio(self, audios: Sequence[np.ndarray], sample_rate: int,
                    word_spans: Sequence[Sequence[tuple[int, int]] | None] | None = None) -> JudgeOutput:
        return self.judge_mels([self.log_mel(a, sample_rate) for a in audios], word_spans)


# ----------------------------------------------------------------------------- training


def ccc(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Concordance correlation coefficient along dim 0 (per column)."""
    mx, my = x.mean(0), y.mean(0)
    vx, vy = x.var(0, unbiased=False), y.var(0, unbiased=False)
    cov = ((x - mx) * (y - my)).mean(0)
    return 2 * cov / (vx + vy + (mx - my) ** 2 + 1e-8)


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state(), "batch": generator.get_state()}


def train_emotion_judge(cfg: RunConfig, resume: bool = False, progress: ProgressFn | None = None,
                        tracker=None) -> JudgeLocation:  # noqa: ANN001 - Tracker
    """Train (or reuse) the emotion judge for `cfg`; returns its location (`judges.threads` torch
    threads while training, restored after)."""
    from rlhf_tts.eval.judges_stage import torch_threads

    location = emotion_judge_location(cfg)
    if location.exists():
        return location
    with torch_threads(cfg.judges.threads):
        return _train_emotion_judge(cfg, resume, progress, tracker)


def _train_emotion_judge(cfg: RunConfig, resume: bool, progress: ProgressFn | None, tracker) -> JudgeLocation:  # noqa: ANN001
    from safetensors.numpy import load_file

    from rlhf_tts.checkpoint import latest_checkpoint, load_checkpoint, restore, save_checkpoint
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.data.resynthesis import resynthesised_split
    from rlhf_tts.eval.corpus import load_split
    from rlhf_tts.training.pretrain import resolve_device

    report = progress or (lambda *a, **k: None)
    jc = cfg.judges
    location = emotion_judge_location(cfg)
    if location.exists():
        return location
    dataset, _ = dataset_location(cfg)
    if not dataset.manifest_path.is_file():
        from rlhf_tts.errors import InputError

        raise InputError(f"no dataset at {dataset.directory}: run the data stage with the same config first")
    device = resolve_device(jc.device)
    directory = location.directory
    checkpoints = directory / "checkpoints"
    if not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
    directory.mkdir(parents=True, exist_ok=True)

    train = load_split(dataset, "train", features=cfg.features)
    val = load_split(dataset, "val", features=cfg.features)  # monitoring only; empty val: no monitoring
    emotions = tuple(EMOTIONS)
    targets = np.array([emotions.index(u.emotion) for u in train])
    clean = [u.mel for u in train]
    legacy = directory / "griffin_lim_mels.safetensors"  # where versions before the shared cache kept them
    if legacy.is_file():
        stored = load_file(str(legacy))
        augmented = [stored.get(u.utt_id, u.mel) for u in train]
        val_gl = [stored[f"val/{u.utt_id}"] for u in val]
    else:
        # The shared round-trip cache (rlhf_tts.data.resynthesis): the same values this stage used to
        # compute for itself, now reused by EASPM when it augments too. Train items only when some will
        # be used; val always (the vocoder-robustness monitor).
        resynthesised = (resynthesised_split(cfg, "train", report, "judge: griffin-lim train mels")
                         if jc.emotion_augment > 0 else {})
        augmented = [resynthesised.get(u.utt_id, u.mel) for u in train]
        val_resynthesised = resynthesised_split(cfg, "val", report, "judge: griffin-lim val mels") if val else {}
        val_gl = [val_resynthesised[u.utt_id] for u in val]

    torch.manual_seed(cfg.seed)
    net = EmotionJudgeNet(cfg.features.n_mels, jc.emotion_channels, jc.emotion_embedding_dim, len(emotions),
                          jc.emotion_dropout)
    frames = np.concatenate([m for m in clean], axis=1)
    net.feature_mean.copy_(torch.from_numpy(frames.mean(1)))
    net.feature_std.copy_(torch.from_numpy(frames.std(1) + 1e-3))
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=jc.emotion_lr, weight_decay=jc.emotion_weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches_per_epoch = len(_length_batches([m.shape[-1] for m in clean], jc.emotion_batch_size, 2))
    total_steps = jc.emotion_epochs * batches_per_epoch
    warmup = max(1, total_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return jc.emotion_lr * (step + 1) / warmup
        return jc.emotion_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    epoch, step = 0, 0
    latest = latest_checkpoint(checkpoints) if resume else None
    if latest is not None:
        checkpoint = load_checkpoint(latest)
        rng = restore(checkpoint, net, optimizer)
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["batch"])
        epoch, step = int(checkpoint.state["epoch"]), checkpoint.step

    meta = {"n_mels": cfg.features.n_mels, "channels": jc.emotion_channels, "embedding_dim": jc.emotion_embedding_dim,
            "dropout": jc.emotion_dropout, "emotions": list(emotions), "features": cfg.features.model_dump(mode="json"),
            "dataset": str(dataset.directory), "train_utterances": len(train), "version": JUDGE_VERSION,
            "config": {k: v for k, v in jc.model_dump(mode="json").items() if k.startswith("emotion_")}}
    started = time.monotonic()
    val_targets = np.array([emotions.index(u.emotion) for u in val])
    while epoch < jc.emotion_epochs:
        net.train()
        lengths = [m.shape[-1] for m in clean]
        order = _length_batches(lengths, jc.emotion_batch_size, 2)
        permutation = torch.randperm(len(order), generator=generator).tolist()
        use_gl = (torch.rand(len(clean), generator=generator) < jc.emotion_augment).numpy()
        for batch_number, b in enumerate(permutation):
            index = order[b]
            mels = [augmented[i] if use_gl[i] else clean[i] for i in index]
            spans = [train[i].word_frame_spans for i in index]
            if jc.emotion_crop_frames:
                mels, spans = _crop(mels, spans, jc.emotion_crop_frames, generator)
            batch, lens = _pad(mels, list(range(len(mels))))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            out = net(batch.to(device), lens.to(device), spans)
            y = torch.from_numpy(targets[index]).to(device)
            ce = F.cross_entropy(out["logits"], y, label_smoothing=0.1)
            loss = ce
            vad_loss = torch.zeros((), device=device)
            pred = [p for p, i in zip(out["word_vad"], index) if p is not None and train[i].word_vad is not None]
            if pred and jc.emotion_vad_weight > 0:
                true = torch.cat([torch.from_numpy(train[i].word_vad) for p, i in zip(out["word_vad"], index)
                                  if p is not None and train[i].word_vad is not None]).to(device)
                pred_t = torch.cat(pred)
                vad_loss = F.mse_loss(pred_t, true) + (1 - ccc(pred_t, true)).mean() if len(true) > 1 else F.mse_loss(pred_t, true)
                loss = loss + jc.emotion_vad_weight * vad_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimizer.step()
            step += 1
            if tracker is not None and (step % jc.emotion_log_every == 0):
                tracker.log_metrics({"judges/emotion/loss": loss.item(), "judges/emotion/ce": ce.item(),
                                     "judges/emotion/vad_loss": vad_loss.item(), "judges/emotion/lr": lr_at(step - 1)},
                                    step=step)
            report("train emotion judge", step, total_steps,
                   info=f"epoch {epoch + 1}/{jc.emotion_epochs} ce {ce.item():.3f} vad {vad_loss.item():.3f}")
        epoch += 1
        judge = EmotionJudge(net, cfg.features, emotions, device, jc.batch_size)
        recall = recall_gl = float("nan")
        if val:
            recall = macro_recall(val_targets, judge.judge_mels([u.mel for u in val]).predictions, len(emotions))
            recall_gl = macro_recall(val_targets, judge.judge_mels(val_gl).predictions, len(emotions))
        if tracker is not None:
            tracker.log_metrics({"judges/emotion/val_recall": recall, "judges/emotion/val_recall_griffin_lim": recall_gl,
                                 "judges/emotion/epoch": epoch}, step=step)
        report("train emotion judge", step, total_steps,
               info=f"epoch {epoch}/{jc.emotion_epochs} val recall {recall:.3f} (griffin-lim {recall_gl:.3f})")
        meta["val_recall"], meta["val_recall_griffin_lim"] = recall, recall_gl
        save_checkpoint(checkpoints, step, net, optimizer, _rng_state(generator), {"epoch": epoch, "val_recall": recall},
                        keep=2)
    meta["seconds"] = round(time.monotonic() - started, 1)
    final_tmp = directory / f".final.tmp-{os.getpid()}"
    shutil.rmtree(final_tmp, ignore_errors=True)
    shutil.copytree(latest_checkpoint(checkpoints), final_tmp)
    (directory / "judge.json.tmp").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(location.final, ignore_errors=True)
    final_tmp.rename(location.final)
    os.replace(directory / "judge.json.tmp", location.meta)
    return location


def _crop(mels: list[np.ndarray], spans: list, frames: int, generator: torch.Generator) -> tuple[list[np.ndarray], list]:
    """Random crops; word spans are kept for the words wholly inside the crop."""
    out_mels, out_spans = [], []
    for mel, word_spans in zip(mels, spans):
        n = mel.shape[-1]
        if n <= frames:
            out_mels.append(mel)
            out_spans.append(word_spans)
            continue
        start = int(torch.randint(0, n - frames + 1, (1,), generator=generator))
        out_mels.append(mel[:, start:start + frames])
        out_spans.append(None)  # word targets need whole utterances; cropped items train the classifier only
    return out_mels, out_spans
