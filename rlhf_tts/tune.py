"""Sweeps: `python -m rlhf_tts.tune --space FILE [--scheduler asha|none] [--search grid|optuna]
[--num-samples N] [--resume] [key=value ...]`.

This module parses and validates (the space file against the config tree, the overrides, the
flags) without importing Ray, so a bad file is a one-line error and exit code 2 in well under a
second; the sweep itself runs in `actors.tune_runner`. It also holds the default Tune metric,
`judge_emo_sim`, which scores a policy the way the evaluate stage does, on a validation subset.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from rlhf_tts.config import ConfigError, RunConfig
from rlhf_tts.tune_space import SearchSpace, load_space

EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_tts.tune",
        description="Sweep the alignment stage with Ray Tune over a search space file (tune_spaces/*.yaml). "
        "key=value overrides apply to every trial's config, e.g. preset=smoke output_dir=runs/sweep.",
    )
    parser.add_argument("--space", required=True, help="search space YAML (see tune_spaces/README.md)")
    parser.add_argument("--scheduler", choices=["asha", "none"], help="trial scheduler (default: the file's, else asha)")
    parser.add_argument("--search", choices=["grid", "optuna"], help="search algorithm (default: the file's, else grid)")
    parser.add_argument("--num-samples", type=int, help="grid: repeats of the grid; optuna: number of trials")
    parser.add_argument("--metric", help="reported metric to optimise (default: the file's, else emo_sim)")
    parser.add_argument("--mode", choices=["max", "min"])
    parser.add_argument("--metric-fn", help="module:function computing the metrics (default rlhf_tts.tune:judge_emo_sim)")
    parser.add_argument("--report-every", type=int, help="learner updates per Tune iteration")
    parser.add_argument("--max-concurrent-trials", type=int)
    parser.add_argument("--storage-path", help="Tune storage (default <output_dir>/tune; shared storage on a cluster)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep of this space and output_dir (Tuner.restore)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every trial")
    return parser


def parse(argv: list[str] | None = None) -> tuple[SearchSpace, argparse.Namespace]:
    """Parse flags and validate the space file; raise ConfigError (one line) when they cannot run."""
    args = _parser().parse_args(argv)
    flags = {"scheduler": args.scheduler, "search": args.search, "num_samples": args.num_samples,
             "metric": args.metric, "mode": args.mode, "metric_fn": args.metric_fn,
             "report_every": args.report_every, "max_concurrent_trials": args.max_concurrent_trials,
             "storage_path": args.storage_path}
    space = load_space(args.space, args.overrides, {k: v for k, v in flags.items() if v is not None})
    return space, args


def main(argv: list[str] | None = None) -> int:
    try:
        space, args = parse(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    runner = importlib.import_module("actors.tune_runner")  # Ray only from here on
    runner.run_sweep(space, resume=args.resume)
    return 0


# ---------------------------------------------------------------------------- the default metric

def judge_emo_sim(cfg: RunConfig, policy: Any, vocab: Any, n_utterances: int) -> dict[str, float]:
    """Emo SIM and emotion recall of `policy` on the first `n_utterances` validation utterances.

    Each utterance is synthesised with its own text, speaker and emotion (the reference's), heard
    through the evaluation vocoder and embedded by the emotion judge; Emo SIM is the mean cosine
    similarity to the recording's embedding (METHOD §5). The judge is never a reward: this runs
    only in the Tune trial's process, after the learner's update, to rank trials.
    """
    from rlhf_tts.eval.tune_metric import policy_emotion_metrics

    return policy_emotion_metrics(cfg, policy, vocab, n_utterances)


if __name__ == "__main__":
    sys.exit(main())
