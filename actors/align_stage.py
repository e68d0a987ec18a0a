"""The `align` stage of `python -m rlhf_tts.run`: EASPO on Ray (default) or in-process
(`distributed.mode=local`, the same functions without Ray)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from rlhf_tts.config import RunConfig


def run_align_stage(cfg: RunConfig, console: Console, tracker, resume: bool = False) -> dict:  # noqa: ANN001
    from rlhf_tts.run import StageProgress, progress_bar

    start = time.monotonic()
    with progress_bar(console) as progress:
        if cfg.distributed.mode == "local":
            from rlhf_tts.training.align import run_inprocess_alignment

            location, summary = run_inprocess_alignment(cfg, resume, StageProgress(progress), tracker)
        else:
            from actors.orchestrator import run_ray_alignment

            location, summary = run_ray_alignment(cfg, resume, StageProgress(progress), tracker)
    summary = dict(summary, aligned_model=str(location.directory), wall_seconds=round(time.monotonic() - start, 2))
    out = Path(cfg.output_dir) / "align_summary.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    tracker.log_artifact(out, "align")
    if "accounting_consistent" in summary:
        console.print(f"pair accounting consistent: {summary['accounting_consistent']} "
                      f"(transport {summary['transport']}, learner {summary['learner']})")
    if "reward_batching" in summary:
        console.print(f"reward batching: {summary['reward_batching']}")
    console.print(f"aligned model: {location.final} ({summary['wall_seconds']:.0f} s)")
    return summary
