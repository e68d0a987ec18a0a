"""Seconds per system of the comparison report, as a user runs it.

    python bench/evaluate.py [--preset tiny] [--work DIR] [--max-utts N] [-- key=value ...]
    python bench/evaluate.py --synthesis-batch 1 4 8 [--max-utts N] [-- key=value ...]

Runs `python -m rlhf_tts.evaluate --degraded --no-aligned evaluate.include_recordings=false` (ground-truth
resynthesis, the config's base model, the deliberately degraded system) on the preset's test split
with the default cache (the judges and the base model must exist: run `python -m rlhf_tts.run` first),
MLflow on, in a child process; then prints each system's seconds (producing its audio + judging it),
the shared set-up (judges loaded, references computed), the whole command's wall time, the
machine's CPU count and its load average before and after, so that figures taken on a busy machine
say so. CPU seconds are printed next to wall seconds; the verdict is taken on wall seconds,
and only a run on a quiet machine (load average below the CPU count before and after) counts.
The issue's budget is 5 minutes per system on the tiny test split on 2 cores.

`--synthesis-batch B ...` instead times the base model's synthesis alone (no vocoder, no judges) on
the same utterances at each batch size, in this process, and prints seconds per utterance and the
ratio to the first size: the measurement behind `evaluate.synthesis_batch`'s CPU default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_SECONDS = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--work", help="output folder (default: a new temporary folder)")
    parser.add_argument("--max-utts", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--synthesis-batch", type=int, nargs="+", help="time base-model synthesis at these batch sizes")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = parser.parse_args()
    if args.synthesis_batch:
        time_synthesis(args.preset, args.synthesis_batch, args.max_utts or 64, args.overrides)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="rlhf_tts_bench_eval_"))
    cmd = [sys.executable, "-m", "rlhf_tts.evaluate", "--degraded", "--no-aligned", f"preset={args.preset}",
           f"output_dir={work}", "evaluate.include_recordings=false", f"evaluate.max_utts={args.max_utts}",
           *args.overrides]
    load_before = os.getloadavg()
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    load_after = os.getloadavg()
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"evaluate failed ({result.returncode}): {' '.join(cmd)}")
    report = json.loads((work / "evaluate" / "report.json").read_text())
    info = report["info"]
    print(f"{args.preset} {report['split']} split, {report['n_utterances']} utterances; {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"({'other jobs were running' if max(load_before[0], load_after[0]) > (os.cpu_count() or 1) + 0.5 else 'quiet'})")
    busy = max(load_before[0], load_after[0]) > (os.cpu_count() or 1) + 0.5
    for system in report["systems"]:
        t = system["timing"]
        cpu = t["cpu_produce"] + t["cpu_judge"]
        dnsmos_thread = t["cpu_judge"] - t["cpu_judge_main"]
        verdict = ("within" if system["seconds"] <= BUDGET_SECONDS else "OVER") + " the 5-minute budget"
        print(f"  {system['name']:<26} wall {system['seconds']:6.1f} s (produce {t['produce']:.1f}, judge {t['judge']:.1f}); "
              f"CPU {cpu:6.1f} s (produce {t['cpu_produce']:.1f}, judge {t['cpu_judge_main']:.1f} + DNSMOS thread "
              f"{dnsmos_thread:.1f}) — {verdict}{' (busy machine: not a valid measurement)' if busy else ''}")
    print(f"  {'set-up (judges, references)':<26} {info['judges_setup_seconds'] + info['reference_seconds']:7.1f} s")
    print(f"  {'whole command':<26} {wall:7.1f} s (includes start-up and the report files)")
    print(f"report: {work / 'evaluate' / 'report.md'}")


def time_synthesis(preset: str, batches: list[int], max_utts: int, overrides: list[str]) -> None:
    """Seconds per utterance of the base model's synthesis (evaluate.* sampler settings) per batch size."""
    import torch

    from rlhf_tts.config import load_config
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.corpus import load_split
    from rlhf_tts.eval.systems import synthesize_utterances
    from rlhf_tts.training.pretrain import base_model_location

    cfg = load_config(None, [f"preset={preset}", "tracking.enabled=false", *overrides])
    dataset, _ = dataset_location(cfg)
    utterances = load_split(dataset, cfg.evaluate.split, max_utts, cfg.features)
    model, vocab, _ = base_model_location(cfg).load("cpu")
    if cfg.evaluate.threads:
        torch.set_num_threads(cfg.evaluate.threads)
    first = None
    print(f"{preset} {cfg.evaluate.split} split, {len(utterances)} utterances, {cfg.evaluate.sampler_steps} ODE steps, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}")
    for batch in batches:
        ev = cfg.evaluate.model_copy(update={"synthesis_batch": batch})
        start = time.perf_counter()
        synthesize_utterances(model, vocab, utterances, ev, cfg.features, "cpu")
        per_utt = (time.perf_counter() - start) / len(utterances)
        first = first or per_utt
        print(f"  batch {batch:>3}: {per_utt:.3f} s/utterance ({per_utt / first:.2f} x batch {batches[0]})", flush=True)


if __name__ == "__main__":
    main()
