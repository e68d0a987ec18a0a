"""The `data` stage: corpus → checked audio → phonemes → log-mels → manifest, quarantine and summary.

The built dataset lives in `<cache_dir>/data/<key>/`, where the key hashes everything that changes
its content (data and feature config, seed, the corpus itself); a second run with the same key
reuses it. Audio decoding, phonemisation and mel extraction run in worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rlhf_tts.config import DataConfig, FeatureConfig, RunConfig, stable_hash
from rlhf_tts.data.audio import AudioDefect, load_audio
from rlhf_tts.data.esd import UtteranceRecord, scan_esd
from rlhf_tts.data.features import LogMel, log_mel
from rlhf_tts.data.frontend import SYMBOL_TABLE_VERSION, FrontendError, SymbolTable, phonemize
from rlhf_tts.data.manifest import read_manifest, write_manifest
from rlhf_tts.data.quarantine import Quarantine
from rlhf_tts.data.synthetic import build_synthetic_corpus, synthetic_corpus_dir

#: Bump when the stage's output changes for the same inputs.
DATA_STAGE_VERSION = 1
SPLITS = ("train", "val", "test")

ProgressFn = Callable[[str, int, int], None]


class NoUsableDataError(RuntimeError):
    """Every input was quarantined; `quarantine` says why, item by item."""

    def __init__(self, message: str, quarantine: Quarantine) -> None:
        super().__init__(message)
        self.quarantine = quarantine


@dataclass(frozen=True)
class Dataset:
    """A built dataset: where its manifest, mels and quarantine list are."""

    directory: Path
    corpus_root: Path

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.parquet"

    @property
    def quarantine_path(self) -> Path:
        return self.directory / "quarantine.csv"

    @property
    def mel_dir(self) -> Path:
        return self.directory / "mels"

    def load_mel(self, speaker: str, utt_id: str) -> np.ndarray:
        from safetensors.numpy import safe_open

        with safe_open(str(self.mel_dir / f"{speaker}.safetensors"), framework="numpy") as shard:
            return shard.get_tensor(utt_id)


# ----------------------------------------------------------------------------- worker side

_EXTRACTOR: dict[str, LogMel] = {}


def _process(args: tuple[UtteranceRecord, DataConfig, FeatureConfig]) -> dict[str, Any]:
    """Check, phonemise and featurise one utterance; a defect comes back as {'defect': reason}."""
    record, data_cfg, feat_cfg = args
    try:
        audio = load_audio(record.wav_path, feat_cfg.sample_rate, data_cfg.silence_peak)
    except AudioDefect as defect:
        return {"defect": str(defect)}
    except OSError as err:
        return {"defect": f"unreadable file ({err.strerror or err})"}
    if audio.duration_s < data_cfg.min_duration_s:
        return {"defect": f"too short ({audio.duration_s:.2f} s < {data_cfg.min_duration_s} s)"}
    if audio.duration_s > data_cfg.max_duration_s:
        return {"defect": f"too long ({audio.duration_s:.2f} s > {data_cfg.max_duration_s} s)"}
    try:
        text = phonemize(record.text)
    except FrontendError as err:
        return {"defect": f"transcript not readable by the front end: {err}"}
    key = stable_hash(feat_cfg)
    if key not in _EXTRACTOR:
        _EXTRACTOR[key] = LogMel(feat_cfg)
    mel = log_mel(audio.samples, feat_cfg, _EXTRACTOR[key])
    word_vad = None
    annotations = record.word_annotations
    if annotations and [a["word"] for a in annotations] == list(text.words):
        word_vad = [a["vad"] for a in annotations]
    return {
        "row": {
            "utt_id": record.utt_id, "speaker": record.speaker, "emotion": record.emotion,
            "intensity": record.intensity, "text": record.text, "phonemes": list(text.tokens),
            "words": list(text.words), "word_spans": [list(s) for s in text.word_spans], "word_vad": word_vad,
            "sample_rate": audio.source_sample_rate, "duration_s": audio.duration_s,
            "n_frames": int(mel.shape[-1]), "audio_sha1": audio.sha1,
        },
        "mel": mel,
    }


def _map(items: list, workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(items) < 500:  # below this, starting workers (torch import) costs more
        yield from map(_process, items)
        return
    from rlhf_tts.workers import worker_pool

    with worker_pool(workers) as pool:
        yield from pool.map(_process, items, chunksize=16)


# ----------------------------------------------------------------------------- driver side


def assign_splits(rows: list[dict[str, Any]], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Fill `split` where the corpus gave none, by sentence, so no text appears in two splits.

    Distinct texts are ordered by a seeded hash; the first share is test, the next val. Where a
    corpus has official split folders (real ESD), those are kept as they are.
    """
    texts = sorted({r["text"] for r in rows if r.get("split") is None})
    order = sorted(texts, key=lambda t: hashlib.sha1(f"{seed}:{t}".encode()).hexdigest())
    n = len(order)
    n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
    n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
    split_of = {t: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, t in enumerate(order)}
    for row in rows:
        if row.get("split") is None:
            row["split"] = split_of[row["text"]]


def _tree_fingerprint(root: Path, speakers: list[str] | None) -> str:
    """Paths, sizes and mtimes of a user corpus, so an edited corpus is rebuilt, not reused."""
    digest = hashlib.sha256()
    tops = [root / s for s in speakers] if speakers else [root]
    for top in tops:
        for path in sorted(top.rglob("*")) if top.exists() else []:
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def dataset_key(cfg: RunConfig, corpus_id: str) -> str:
    data = cfg.data.model_dump(mode="json", exclude={"num_workers": True, "synthetic": {"num_workers"}})
    if cfg.data.source == "esd":
        data.pop("synthetic")
    return stable_hash(data, cfg.features, cfg.seed, corpus_id, DATA_STAGE_VERSION)


def dataset_location(cfg: RunConfig) -> tuple[Dataset, str]:
    """Where the dataset for `cfg` is (or will be) cached, without building anything."""
    if cfg.data.source == "synthetic":
        corpus = synthetic_corpus_dir(cfg.data.synthetic, cfg.seed, cfg.cache_dir)
        corpus_id = corpus.name
    else:
        corpus = Path(cfg.data.root).expanduser().resolve()  # type: ignore[arg-type]
        corpus_id = f"{corpus}#{_tree_fingerprint(corpus, cfg.data.speakers)}"
    return Dataset(Path(cfg.cache_dir) / "data" / dataset_key(cfg, corpus_id), corpus), corpus_id


def build_dataset(cfg: RunConfig, progress: ProgressFn | None = None) -> Dataset:
    """Build or reuse the dataset for `cfg`; raise NoUsableDataError if nothing usable remains."""
    report = progress or (lambda stage, done, total: None)
    dataset, corpus_id = dataset_location(cfg)
    if dataset.manifest_path.is_file():
        return dataset
    if cfg.data.source == "synthetic":
        build_synthetic_corpus(cfg.data.synthetic, cfg.seed, cfg.cache_dir, lambda d, t: report("synthesise corpus", d, t))
    corpus, directory = dataset.corpus_root, dataset.directory

    records, scan_defects = scan_esd(corpus, cfg.data.speakers)
    quarantine = Quarantine()
    quarantine.extend(scan_defects)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "mels").mkdir(parents=True)

    rows: list[dict[str, Any]] = []
    shard: dict[str, np.ndarray] = {}
    shard_speaker: str | None = None

    def flush() -> None:
        if shard:
            from safetensors.numpy import save_file

            save_file(shard, str(tmp / "mels" / f"{shard_speaker}.safetensors"))
            shard.clear()

    records.sort(key=lambda r: (r.speaker, r.utt_id))
    jobs = [(r, cfg.data, cfg.features) for r in records]
    for i, (record, result) in enumerate(zip(records, _map(jobs, cfg.data.num_workers)), start=1):
        if "defect" in result:
            quarantine.add(record.wav_path, result["defect"])
        else:
            if record.speaker != shard_speaker:
                flush()
                shard_speaker = record.speaker
            shard[record.utt_id] = result["mel"]
            row = result["row"]
            row["wav_path"] = str(record.wav_path.relative_to(corpus))
            row["split"] = record.split
            rows.append(row)
        report("check audio, phonemise, log-mel", i, len(records))
    flush()

    quarantine.write_csv(tmp / "quarantine.csv")
    if not rows:
        shutil.rmtree(tmp, ignore_errors=True)
        raise NoUsableDataError(
            f"no usable utterances in {corpus}: all {len(quarantine)} inputs quarantined", quarantine
        )
    assign_splits(rows, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    write_manifest(rows, tmp / "manifest.parquet", {
        "corpus_root": str(corpus), "corpus_id": corpus_id, "symbol_table_version": str(SYMBOL_TABLE_VERSION),
        "features": json.dumps(cfg.features.model_dump(mode="json"), sort_keys=True),
    })
    SymbolTable().save(tmp / "symbols.json")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return dataset


def publish(dataset: Dataset, output_dir: str | Path) -> None:
    """Copy what a person reads (manifest, quarantine list, symbol table) into the run's output folder."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.parquet", "quarantine.csv", "symbols.json"):
        shutil.copyfile(dataset.directory / name, out / name)


def manifest_rows(dataset: Dataset) -> list[dict[str, Any]]:
    return read_manifest(dataset.manifest_path).to_pylist()
