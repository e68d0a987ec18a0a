"""What a person wants to see after the data stage: utterances per speaker × emotion, hours, splits,
and what was quarantined and why."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from rlhf_tts.data.emotions import EMOTIONS
from rlhf_tts.data.quarantine import Quarantine


def summarize(rows: list[dict[str, Any]], quarantine: Quarantine) -> dict[str, Any]:
    counts = Counter((r["speaker"], r["emotion"]) for r in rows)
    speakers = sorted({r["speaker"] for r in rows})
    return {
        "utterances": len(rows),
        "hours": round(sum(r["duration_s"] for r in rows) / 3600.0, 4),
        "speakers": speakers,
        "per_speaker_emotion": {s: {e: counts.get((s, e), 0) for e in EMOTIONS} for s in speakers},
        "per_split": dict(sorted(Counter(r["split"] for r in rows).items())),
        "distinct_texts_per_split": {
            split: len({r["text"] for r in rows if r["split"] == split}) for split in ("train", "val", "test")
        },
        "quarantined": len(quarantine),
        "quarantine_reasons": dict(quarantine.reason_counts().most_common()),
    }


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"Corpus: {summary['utterances']} utterances, {summary['hours']:.2f} h, "
                        f"{summary['quarantined']} quarantined")
    table.add_column("speaker")
    for emotion in EMOTIONS:
        table.add_column(emotion, justify="right")
    table.add_column("total", justify="right")
    for speaker, per_emotion in summary["per_speaker_emotion"].items():
        table.add_row(speaker, *(str(per_emotion[e]) for e in EMOTIONS), str(sum(per_emotion.values())))
    return table


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Corpus summary\n\n{summary['utterances']} utterances, {summary['hours']:.2f} hours, "
        f"{summary['quarantined']} quarantined.\n",
        "| speaker | " + " | ".join(EMOTIONS) + " | total |",
        "|---|" + "---:|" * (len(EMOTIONS) + 1),
    ]
    for speaker, per_emotion in summary["per_speaker_emotion"].items():
        lines.append(f"| {speaker} | " + " | ".join(str(per_emotion[e]) for e in EMOTIONS)
                     + f" | {sum(per_emotion.values())} |")
    lines.append("\nSplits: " + ", ".join(f"{k} {v}" for k, v in summary["per_split"].items()))
    if summary["quarantine_reasons"]:
        lines.append("\n| quarantine reason | count |\n|---|---:|")
        lines.extend(f"| {reason} | {n} |" for reason, n in summary["quarantine_reasons"].items())
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], output_dir: str | Path) -> None:
    out = Path(output_dir)
    (out / "data_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "data_summary.md").write_text(summary_markdown(summary))
