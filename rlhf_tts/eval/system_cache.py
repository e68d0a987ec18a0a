"""Per-system rows of the evaluation report, cached so a system is produced and judged once.

A report row is a pure function of the system (a model's weights, the vocoder, the sampler
settings), the judges, the utterances and the bootstrap seed. The main job's line-up repeats three
rows in every run — ground-truth resynthesis, recordings and the base model — while only the
aligned model changes between an alignment experiment and the next (a new lr, a second seed, a
Tune trial). Keeping each row under `<cache_dir>/evaluate/systems/<key>/` makes such a run pay for
the aligned model alone (about 4 of the stage's 11 minutes on the tiny preset).

A system opts in with `cache_key() -> str | None` (None: not cacheable, e.g. a folder of wavs that
may change under the same name). A row stores its `SystemResult`, its per-utterance rows and the
audio/mel/F0 of the report's example utterances, written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf_tts.config import stable_hash

CACHE_VERSION = 1

#: (audio, mel or None, F0 contour or None) of one example utterance, as the report's plots take them.
Example = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass
class CachedRow:
    result: dict  # SystemResult.to_json()
    rows: list[dict]  # per-utterance judgements (per_utterance.csv)
    examples: dict[str, Example]  # utt_id → example outputs


class SystemCache:
    """Rows keyed by `context` (judges, utterances, evaluate settings) + the system's own key + its place."""

    def __init__(self, root: str | Path, context: str) -> None:
        self.root, self.context = Path(root), context

    def key(self, system, number: int) -> str | None:  # noqa: ANN001 - a System
        own = getattr(system, "cache_key", None)
        own_key = own() if callable(own) else None
        # The bootstrap seed of a row depends on its place in the line-up, so the place is in the key.
        return None if own_key is None else stable_hash(self.context, own_key, system.name, number, CACHE_VERSION)

    def load(self, key: str | None) -> CachedRow | None:
        if key is None:
            return None
        folder = self.root / key
        try:
            meta = json.loads((folder / "row.json").read_text())
            examples: dict[str, Example] = {}
            if (folder / "examples.npz").is_file():
                with np.load(folder / "examples.npz", allow_pickle=False) as arrays:
                    for utt_id in meta["examples"]:
                        examples[utt_id] = tuple(arrays[f"{utt_id}/{part}"] if f"{utt_id}/{part}" in arrays else None
                                                 for part in ("audio", "mel", "f0"))  # type: ignore[assignment]
        except (OSError, ValueError, KeyError):
            return None  # missing or unreadable: produce the row again
        return CachedRow(meta["result"], meta["rows"], examples)

    def save(self, key: str | None, row: CachedRow) -> None:
        if key is None:
            return
        folder = self.root / key
        tmp = self.root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        arrays = {f"{utt_id}/{part}": np.asarray(value)
                  for utt_id, parts in row.examples.items()
                  for part, value in zip(("audio", "mel", "f0"), parts) if value is not None}
        np.savez(tmp / "examples.npz", **arrays)
        (tmp / "row.json").write_text(json.dumps({"result": row.result, "rows": row.rows,
                                                  "examples": list(row.examples)}, default=float))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)


def file_identity(path: Path) -> tuple[str, int, int] | None:
    """(path, size, mtime_ns) of a weights file: a model saved again under the same folder gets a new key."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns
