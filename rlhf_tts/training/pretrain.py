"""The `pretrain` stage: Grad-TTS base model on the corpus's train split.

AdamW with a linear warm-up then cosine decay (the tiny model's alignment does not lock in within
its CPU budget at Grad-TTS's constant lr; the `paper` preset keeps the constant 1e-4), gradient
clipping, length-bucketed batches, random decoder crops. The run lives in
`<cache_dir>/pretrain/<key>/` (key: dataset, model and pretraining config, seed), with atomic
checkpoints every `checkpoint_every` steps; `--resume` continues from the latest one exactly
(model, optimizer moments, RNG streams and data position are all restored). A finished run is
reused by later invocations with the same key.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf_tts.checkpoint import latest_checkpoint, load_checkpoint, restore, save_checkpoint
from rlhf_tts.config import RunConfig, stable_hash, stored_config
from rlhf_tts.data.frontend import SymbolTable
from rlhf_tts.data.manifest import read_manifest
from rlhf_tts.models.gradtts.model import GradTTS
from rlhf_tts.training.data import BucketedBatches, Vocabulary, load_utterances
from rlhf_tts.training.data_parallel import Ranks, gathered_rng, rank_rng, run_ranks, training_ranks

PRETRAIN_VERSION = 3  # 2: text-length buckets, utterance-length duration loss; 3: padding-invariant U-Net
ProgressFn = Callable[..., None]


@dataclass(frozen=True)
class BaseModel:
    """A finished pretraining run: where its final checkpoint and vocabulary are."""

    directory: Path

    @property
    def final(self) -> Path:
        return self.directory / "final"

    def load(self, device: str | torch.device = "cpu") -> tuple[GradTTS, Vocabulary, RunConfig]:
        from rlhf_tts.checkpoint import load_model_weights

        meta = json.loads((self.directory / "model.json").read_text())
        cfg, _ = stored_config(meta["config"])  # a model saved by another version loads too
        vocab = Vocabulary.from_json(meta["vocabulary"])
        model = build_model(cfg, vocab)
        load_model_weights(self.final, model)
        return model.to(device).eval(), vocab, cfg


def build_model(cfg: RunConfig, vocab: Vocabulary) -> GradTTS:
    return GradTTS(cfg.model, len(vocab.symbols), len(vocab.speakers), len(vocab.emotions), cfg.features.n_mels)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"pretrain.device={name} but CUDA is not available")
    return device


def pretrain_key(cfg: RunConfig, dataset_dir: Path, attempt: int = 0) -> str:
    """The cache key of pretraining attempt `attempt` (0: the first; see `lock_in_retries`)."""
    exclude = {"checkpoint_every", "log_every", "sample_every", "sample_steps", "threads", "device",
               "lock_in_max_duration_loss", "lock_in_retries"}
    if cfg.pretrain.flat_start_steps == 0:
        exclude.add("flat_start_steps")  # MAS from the first step: the key (and model) of the versions before
    if cfg.pretrain.data_parallel == 1:
        exclude.add("data_parallel")  # one process: the key (and model) of the versions before the option
    parts = [dataset_dir.name, cfg.model, cfg.pretrain.model_dump(exclude=exclude), cfg.seed, PRETRAIN_VERSION]
    return stable_hash(*parts, *([{"attempt": attempt}] if attempt else []))


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of pretraining attempt `attempt`: the run's own for the first, a derived one after."""
    return seed if attempt == 0 else int(stable_hash(seed, "pretrain attempt", attempt), 16) % 2**31


def base_model_attempts(cfg: RunConfig, dataset_dir: Path) -> list[BaseModel]:
    """Where each pretraining attempt `cfg` allows is (or will be)."""
    return [BaseModel(Path(cfg.cache_dir) / "pretrain" / pretrain_key(cfg, dataset_dir, attempt))
            for attempt in range(1 + cfg.pretrain.lock_in_retries)]


def choose_base_model(attempts: list[BaseModel], threshold: float) -> BaseModel:
    """The first attempt whose alignment locked in, or the one not yet built or checked (the stage's
    next), or, when every attempt was checked and none locked in, the one closest to it."""
    from rlhf_tts.training.lock_in import stored_check

    checked = []
    for base in attempts:
        check = stored_check(base.directory, threshold)
        if check is None or check.locked_in:
            return base
        checked.append((check.duration_loss, base))
    return min(checked, key=lambda item: item[0])[1]


def base_model_location(cfg: RunConfig) -> BaseModel:
    """Where the base model for `cfg` is (or will be), without building or training anything: with
    `pretrain.lock_in_retries`, the attempt `choose_base_model` picks from the stored lock-in checks."""
    from rlhf_tts.data.pipeline import dataset_location

    dataset, _ = dataset_location(cfg)
    return choose_base_model(base_model_attempts(cfg, dataset.directory), cfg.pretrain.lock_in_max_duration_loss)


def learning_rate(cfg: RunConfig, step: int) -> float:
    """The learning rate of update `step` (0-based): a pure function of the step, so a resumed run
    follows the uninterrupted run's schedule without scheduler state in the checkpoint."""
    p = cfg.pretrain
    if p.warmup_steps and step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    if p.lr_schedule == "constant":
        return p.lr
    progress = min(1.0, (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps))
    final = p.lr * p.lr_final_fraction
    return final + (p.lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "batch": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def run_pretraining(
    cfg: RunConfig, dataset_dir: Path, resume: bool = False, progress: ProgressFn | None = None,
    tracker=None, stop_after: int | None = None, attempt: int = 0,  # noqa: ANN001 - Tracker, optional for tests
) -> BaseModel:
    """Train (or reuse) the base model. `stop_after` ends early at that step (tests of resumption).
    With `pretrain.data_parallel` ranks > 1 (CPU) the steps run in that many one-thread processes.
    `attempt` > 0 trains another model from the same data and config under a derived seed (its own key)."""
    device = resolve_device(cfg.pretrain.device)
    world = training_ranks(cfg.pretrain.data_parallel, device, cfg.pretrain.batch_size)
    return run_ranks(_pretrain_rank, world, (cfg, dataset_dir, resume, stop_after, attempt), (progress, tracker))


def _pretrain_rank(
    ranks: Ranks, cfg: RunConfig, dataset_dir: Path, resume: bool, stop_after: int | None, attempt: int,
    progress: ProgressFn | None = None, tracker=None,  # noqa: ANN001
) -> BaseModel:
    """One rank's training loop (the only one when not data-parallel). Rank 0 alone writes the run's
    files, logs and reports; every rank restores and saves its own RNG streams through rank 0's
    checkpoints, so a resumed data-parallel run is the uninterrupted one too."""
    report = progress or (lambda *a, **k: None)
    base = BaseModel(Path(cfg.cache_dir) / "pretrain" / pretrain_key(cfg, dataset_dir, attempt))
    seed = attempt_seed(cfg.seed, attempt)
    metric = "pretrain" if attempt == 0 else f"pretrain_attempt{attempt + 1}"  # MLflow prefix: one curve per attempt
    directory = base.directory
    if (base.final / "state.json").is_file():
        return base
    checkpoints = directory / "checkpoints"
    if ranks.main and not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)  # a fresh run was asked for; --resume would have continued it
    ranks.barrier()
    if cfg.pretrain.threads and ranks.world == 1:
        torch.set_num_threads(cfg.pretrain.threads)
    device = resolve_device(cfg.pretrain.device)

    rows = read_manifest(dataset_dir / "manifest.parquet").to_pylist()
    vocab = Vocabulary(SymbolTable.load(dataset_dir / "symbols.json"), tuple(sorted({r["speaker"] for r in rows})))
    train_rows = [r for r in rows if r["split"] == "train"]
    utterances = load_utterances(train_rows, dataset_dir / "mels", vocab)
    batches = BucketedBatches(utterances, cfg.pretrain.batch_size, seed)

    torch.manual_seed(seed)
    model = build_model(cfg, vocab).to(device)  # the same initial weights on every rank
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, weight_decay=cfg.pretrain.weight_decay)
    generator = torch.Generator().manual_seed(ranks.seed(seed, "pretrain rank"))
    step, epoch, start_batch = 0, 0, 0
    latest = latest_checkpoint(checkpoints) if resume else None
    if latest is not None:
        checkpoint = load_checkpoint(latest)
        _set_rng_state(rank_rng(restore(checkpoint, model, optimizer), ranks), generator, device)
        step = checkpoint.step
        epoch, start_batch = checkpoint.state["data_position"]
    if ranks.main:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"config": cfg.model_dump(mode="json"), "vocabulary": vocab.to_json(), "dataset": str(dataset_dir),
                "n_parameters": sum(p.numel() for p in model.parameters())}
        (directory / "model.json").write_text(json.dumps(meta, indent=1))

    samples = sample_rows(rows, vocab)
    model.train()
    started, first_step = time.monotonic(), step
    losses: dict[str, float] = {}
    decoder_items = cfg.pretrain.decoder_batch_size
    if decoder_items is not None:
        decoder_items = len(ranks.shard(range(decoder_items)))  # this rank's share of the U-Net items
    for epoch, index, batch in batches.iterate(epoch, start_batch, ranks.shard if ranks.world > 1 else None):
        if step >= cfg.pretrain.steps or (stop_after is not None and step >= stop_after):
            break
        batch = batch.to(device)
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = model.compute_loss(batch.text, batch.mel, batch.mel_lengths, cfg.pretrain.segment_frames, generator,
                                 decoder_items=decoder_items, flat_start=step < cfg.pretrain.flat_start_steps)
        optimizer.zero_grad(set_to_none=True)
        ranks.backward(out["total"], len(batch.utt_ids) / cfg.pretrain.batch_size, list(model.parameters()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.pretrain.grad_clip)
        optimizer.step()
        step += 1
        losses = {k: float(v.detach()) for k, v in out.items()}
        next_position = (epoch, index + 1)
        if ranks.main and (step % cfg.pretrain.log_every == 0 or step == cfg.pretrain.steps):
            rate = (step - first_step) / max(time.monotonic() - started, 1e-6)
            if tracker is not None:
                tracker.log_metrics({f"{metric}/{k}": v for k, v in losses.items()} | {
                    f"{metric}/grad_norm": float(grad_norm), f"{metric}/steps_per_s": rate, f"{metric}/lr": lr}, step=step)
        report("pretrain Grad-TTS" + (f" (attempt {attempt + 1})" if attempt else ""), step, cfg.pretrain.steps,
               info=f"loss {losses['total']:.3f} (dur {losses['duration']:.3f} prior {losses['prior']:.3f} "
                    f"diff {losses['diffusion']:.3f})" + (" (rank 0's share)" if ranks.world > 1 else ""))
        if step % cfg.pretrain.checkpoint_every == 0 or step == cfg.pretrain.steps:
            rng = gathered_rng(_rng_state(generator, device), ranks)
            if ranks.main:
                save_checkpoint(checkpoints, step, model, optimizer, rng,
                                {"data_position": list(next_position), "losses": losses, "ranks": ranks.world})
        if ranks.main and tracker is not None and (step % cfg.pretrain.sample_every == 0 or step == cfg.pretrain.steps):
            log_samples(model, samples, vocab, cfg, device, step, tracker, f"{metric}/samples")
            model.train()
    if ranks.main and step >= cfg.pretrain.steps:
        final_tmp = directory / f".final.tmp-{os.getpid()}"
        shutil.rmtree(final_tmp, ignore_errors=True)
        shutil.copytree(latest_checkpoint(checkpoints), final_tmp)
        final_tmp.rename(base.final)
    return base


def sample_rows(rows: list[dict], vocab: Vocabulary) -> list[dict]:
    """One validation sentence of the first speaker per emotion, for listening during training."""
    picked: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["utt_id"]):
        if row["split"] in ("val", "test") and row["speaker"] == vocab.speakers[0]:
            picked.setdefault(row["emotion"], row)
    return [picked[e] for e in vocab.emotions if e in picked]


@torch.no_grad()
def log_samples(model: GradTTS, rows: list[dict], vocab: Vocabulary, cfg: RunConfig, device: torch.device,
                step: int, tracker, artifact_path: str) -> None:  # noqa: ANN001
    """Speak one held-out sentence per emotion and log its mel image and audio to MLflow."""
    import tempfile

    import soundfile as sf

    from rlhf_tts.eval.plots import mel_figure
    from rlhf_tts.inference import PreparedText, Synthesizer
    from rlhf_tts.models.vocoder import GriffinLimVocoder

    if not rows:
        return
    synthesizer = Synthesizer(model, vocab, cfg, GriffinLimVocoder(cfg.features).to(device))
    items = [PreparedText(tuple(vocab.symbols.ids(r["phonemes"])), vocab.emotions.index(r["emotion"]),
                          vocab.speakers.index(r["speaker"]), r["speaker"], tuple(tuple(s) for s in r["word_spans"]))
             for r in rows]
    mels = synthesizer.mels(items, n_steps=cfg.pretrain.sample_steps, generator=torch.Generator(device=device).manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for row, mel in zip(rows, mels):
            name = f"step{step:07d}_{row['emotion']}"
            sf.write(Path(tmp) / f"{name}.wav", synthesizer.vocoder(mel).cpu().numpy(), cfg.features.sample_rate)
            mel_figure(mel.cpu().numpy(), f"{row['emotion']}: {row['text']}", Path(tmp) / f"{name}.png")
            tracker.log_artifact(Path(tmp) / f"{name}.wav", artifact_path)
            tracker.log_artifact(Path(tmp) / f"{name}.png", artifact_path)
