"""Sweeps: `python -m rlhf_tts.tune --space FILE [--scheduler asha|none] [--search grid|optuna]
[--num-samples N] [--resume] [key=value ...]`.

This module parses and validates (the space file against the config tree, the overrides, the
flags) without importing Ray, so a bad file is a one-line error and exit code 2 in well under a
second; the sweep itself runs in `actors.tune_runner`. It also holds the Tune metrics a space can
name: `judge_emo_sim` (the default), which scores a policy with the emotion judge the way the
evaluate stage does, on a validation subset, and `easpm_emotion_metrics`, a cheap EASPM-based
stand-in for smoke sweeps and tests.
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
    parser.add_argument("--metric-utterances", type=int, help="validation utterances the metric is computed on")
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
             "metric_utterances": args.metric_utterances,
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


_REWARD_CACHE: dict[tuple[str, str], Any] = {}


def validation_rows(cfg: RunConfig, vocab: Any, n_utterances: int, split: str = "val") -> list[dict]:
    """`n_utterances` rows of `split` spread evenly over it (sorted by id, so every trial sees the same ones)."""
    from rlhf_tts.data.manifest import read_manifest
    from rlhf_tts.data.pipeline import dataset_location

    dataset, _ = dataset_location(cfg)
    rows = sorted((r for r in read_manifest(dataset.manifest_path).to_pylist()
                   if r["split"] == split and r["speaker"] in vocab.speakers and r["emotion"] in vocab.emotions),
                  key=lambda r: r["utt_id"])
    if not rows:
        raise ValueError(f"no {split} utterances of the model's speakers to score the policy on")
    if len(rows) <= n_utterances:
        return rows
    stride = len(rows) / n_utterances
    return [rows[int(i * stride)] for i in range(n_utterances)]


def easpm_emotion_metrics(cfg: RunConfig, policy: Any, vocab: Any, n_utterances: int) -> dict[str, float]:
    """EASPM's opinion of the policy's finished mels on validation utterances: a cheap Tune metric.

    Each utterance is synthesised (deterministic ODE sampler, `align.sampler_steps`, a fixed seed)
    with its own text, speaker and emotion, and scored by EASPM at t = 0 against all emotion
    prompts. `easpm_score`: mean score of the target prompt; `easpm_accuracy`: share of utterances
    whose best prompt is the target; `easpm_margin`: target minus best other. No vocoder and no
    judge, so it costs a few sampler passes; but EASPM is the training reward, which a policy can
    learn to please without sounding more emotional, so rank real sweeps with the judge
    (`rlhf_tts.tune:judge_emo_sim`) and use this for smoke sweeps and tests.
    """
    import torch

    from rlhf_tts.models.gradtts.model import TextBatch
    from rlhf_tts.training.align import load_reward

    device = next(policy.parameters()).device
    key = (str(Path(cfg.cache_dir).resolve()), str(device))
    if key not in _REWARD_CACHE:
        _REWARD_CACHE.clear()
        _REWARD_CACHE[key] = load_reward(cfg, device)
    easpm = _REWARD_CACHE[key].model
    rows = validation_rows(cfg, vocab, n_utterances)
    ids = [vocab.symbols.ids(r["phonemes"]) for r in rows]
    padded = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, seq in enumerate(ids):
        padded[i, : len(seq)] = torch.tensor(seq)
    target = torch.tensor([vocab.emotions.index(r["emotion"]) for r in rows])
    text = TextBatch(padded, torch.tensor([len(s) for s in ids]), target,
                     torch.tensor([vocab.speakers.index(r["speaker"]) for r in rows]),
                     [[tuple(s) for s in r["word_spans"]] for r in rows]).to(device)
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            prior = policy.encode(text)
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
            mel = policy.sample(prior, n_steps=cfg.align.sampler_steps, temperature=cfg.align.temperature,
                                stochastic=False, guidance=cfg.align.guidance, generator=generator,
                                output_level=cfg.evaluate.output_level)
            prompts = easpm.embed_prompts([easpm.default_prompts()[easpm.emotions.index(e)] for e in vocab.emotions])
            logits = easpm.logits(easpm.embed_audio(mel, prior.mask, 0.0), prompts).float().cpu()
    finally:
        policy.train(was_training)
    rows_idx = torch.arange(len(rows))
    own = logits[rows_idx, target]
    others = logits.clone()
    others[rows_idx, target] = float("-inf")
    return {"easpm_score": float(own.mean()), "easpm_accuracy": float((logits.argmax(1) == target).float().mean()),
            "easpm_margin": float((own - others.max(1).values).mean()), "metric_utterances": float(len(rows))}


if __name__ == "__main__":
    sys.exit(main())
