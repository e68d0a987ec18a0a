"""The corpus manifest: one Parquet row per usable utterance, the contract every later stage reads.

Paths are stored relative to the corpus root (kept in the schema metadata), so the same corpus built
in two cache folders gives identical rows, and a manifest can move with its corpus.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema([
    ("utt_id", pa.string()),
    ("speaker", pa.string()),
    ("emotion", pa.string()),
    ("intensity", pa.float32()),  # null where the corpus does not record it (real ESD)
    ("text", pa.string()),
    ("phonemes", pa.list_(pa.string())),
    ("words", pa.list_(pa.string())),
    ("word_spans", pa.list_(pa.list_(pa.int32(), 2))),  # [start, end) phoneme indices per word
    ("word_vad", pa.list_(pa.list_(pa.float32(), 3))),  # per word (valence, arousal, dominance) or null
    ("wav_path", pa.string()),  # relative to the corpus root
    ("sample_rate", pa.int32()),  # of the source file; features are at the configured rate
    ("duration_s", pa.float32()),
    ("n_frames", pa.int32()),
    ("split", pa.string()),
    ("audio_sha1", pa.string()),
])


def write_manifest(rows: list[dict[str, Any]], path: str | Path, metadata: dict[str, str]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["utt_id"])
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    tmp = Path(path).with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return table


def read_manifest(path: str | Path) -> pa.Table:
    return pq.read_table(path)


def corpus_root(table: pa.Table) -> Path:
    return Path((table.schema.metadata or {})[b"corpus_root"].decode())


def manifest_digest(table: pa.Table) -> str:
    """SHA-256 of the rows (not of the file bytes, which embed writer versions)."""
    blob = json.dumps(table.to_pylist(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
