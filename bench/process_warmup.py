"""How much faster one process runs the same alignment again: the warm-up a fresh process pays.

    python bench/process_warmup.py [--preset tiny] [--steps 12] [--runs 3] [key=value ...]
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python bench/process_warmup.py cache_dir=...   # no per-shape cache

Runs the in-process alignment `--runs` times in this process on the same config (same prompts, so the
same tensor shapes), deleting the aligned model before each, and prints each run's pairs/s and where
its time went. On the tiny preset the first run is ~20 % slower: oneDNN sets up its kernels once per
new shape and caches them. With the cache off every run is as slow as the first. This is why
`bench/align_overhead.py` runs each in-process loop in a fresh process, as each Ray run has fresh
actors. Needs the config's cached base model and EASPM (run the main job first, or pass its `cache_dir=`).
"""

from __future__ import annotations

import argparse
import shutil


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from rlhf_tts.config import load_config
    from rlhf_tts.training.align import aligned_model_location, run_inprocess_alignment

    cfg = load_config(None, [f"preset={args.preset}", f"align.steps={args.steps}", "tracking.enabled=false",
                             *args.overrides])
    location = aligned_model_location(cfg)
    for run in range(args.runs):
        shutil.rmtree(location.directory, ignore_errors=True)
        _, summary = run_inprocess_alignment(cfg)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in summary["time_breakdown"].items())
        print(f"run {run + 1}: {summary['pairs_produced'] / summary['seconds']:.2f} pairs/s (seconds: {parts})",
              flush=True)
    shutil.rmtree(location.directory, ignore_errors=True)


if __name__ == "__main__":
    main()
