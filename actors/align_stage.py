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
    from rlhf_tts.training.align import fresh_pair_accuracy

    start = time.monotonic()
    with progress_bar(console) as progress:
        if cfg.distributed.mode == "local":
            from rlhf_tts.training.align import run_inprocess_alignment

            location, summary = run_inprocess_alignment(cfg, resume, StageProgress(progress), tracker)
        else:
            from actors.orchestrator import run_ray_alignment

            location, summary = run_ray_alignment(cfg, resume, StageProgress(progress), tracker)
    summary = dict(summary, aligned_model=str(location.directory), wall_seconds=round(time.monotonic() - start, 2))
    accuracy = fresh_pair_accuracy(summary.get("history", []))
    if accuracy is not None:
        summary["fresh_pair_accuracy"] = accuracy
        tracker.log_metrics({"align/fresh_pair_accuracy": accuracy["value"]})
    out = Path(cfg.output_dir) / "align_summary.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    tracker.log_artifact(out, "align")
    if summary.get("history"):
        from rlhf_tts.eval.plots import alignment_curves_figure

        figure = alignment_curves_figure(summary["history"], f"EASPO on {cfg.preset}: k={cfg.align.k}, "
                                         f"t in {list(cfg.align.timestep_range())}, {cfg.align.objective}",
                                         Path(cfg.output_dir) / "align_curves.png")
        tracker.log_artifact(figure, "align")
    if tracker.enabled:
        _log_aligned_samples(cfg, location, tracker)
    if "accounting_consistent" in summary:
        console.print(f"pair accounting consistent: {summary['accounting_consistent']} "
                      f"(transport {summary['transport']}, learner {summary['learner']})")
    if "reward_batching" in summary:
        console.print(f"reward batching: {summary['reward_batching']}")
    if accuracy is not None:
        console.print(f"fresh-pair implicit accuracy (last {accuracy['updates']} updates, {accuracy['pairs']:.0f} "
                      f"pairs never trained on): {accuracy['value']:.3f} (0.5: the policy's change does not yet "
                      "prefer the reward's winners on new states)")
    console.print(f"aligned model: {location.final} ({summary['wall_seconds']:.0f} s)")
    return summary


def _log_aligned_samples(cfg: RunConfig, location, tracker) -> None:  # noqa: ANN001
    """One held-out sentence per emotion from the aligned policy, as audio and mel images in MLflow."""
    from rlhf_tts.data.manifest import read_manifest
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.training.pretrain import log_samples, resolve_device, sample_rows

    device = resolve_device(cfg.align.device)
    model, vocab, base_cfg = location.as_base().load(device)
    rows = read_manifest(dataset_location(cfg)[0].manifest_path).to_pylist()
    log_samples(model, sample_rows(rows, vocab), vocab, base_cfg, device, int(cfg.align.steps), tracker, "align/samples")
