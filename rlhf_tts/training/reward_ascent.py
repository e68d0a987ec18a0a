"""Direct reward ascent on EASPO's rollouts: what EASPO's reward would do with unlimited pairs.

    python -m rlhf_tts.training.reward_ascent [--states 6] [--evaluate] [key=value ...]

Same config, prompts, rollouts (`align.*`: sampler steps, temperature, κ range, threshold, seed),
optimiser (AdamW on the decoder, `align.lr`, weight decay, clipping) and number of updates as the
align stage; the one difference is the learning signal. Per update, `--states` of the rollout's
preference states (those EASPO would train on) take one reparameterised policy step each, EASPM
scores it (`align.reward`), and the decoder ascends that reward by backpropagation
(`rlhf_tts/algos/reward_ascent.py` says why this is the direction EASPO's pairs estimate).

Before each step the policy's log-ratio ranks the rollout's (win, lose) pairs, which it has never
trained on: the same fresh-pair implicit accuracy the align stage reports, here for a policy that
moved along the reward's gradient. Side by side they say whether EASPO's reading near 0.5 is the
pairs' noise (here well above 0.5) or a reward whose preference does not carry across states
(here near 0.5 too). `--evaluate` then judges the model against the base
(`python -m rlhf_tts.evaluate --no-aligned --system reward-ascent=<model>`): whether the reward,
followed exactly, moves the judges at all. Needs the data, pretrain and easpm stages' caches (and
judges for `--evaluate`). The model goes to `<cache_dir>/reward_ascent/<key>/` (reused when it
exists), the summary and curves to `<output_dir>/reward_ascent/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rlhf_tts.checkpoint import write_json_atomic
from rlhf_tts.config import ConfigError, RunConfig, load_config, stable_hash

ASCENT_VERSION = 2  # 2: the step scored at easpo.candidate_time


def ascent_location(cfg: RunConfig, states: int):  # noqa: ANN201 - AlignedModel
    from rlhf_tts.training.align import AlignedModel, align_key

    return AlignedModel(Path(cfg.cache_dir) / "reward_ascent" / stable_hash(align_key(cfg), states, ASCENT_VERSION))


def run_reward_ascent(cfg: RunConfig, states: int, progress=None) -> tuple[object, dict]:  # noqa: ANN001
    """`align.steps` updates of reward ascent; returns (model location, summary with per-update history)."""
    from rlhf_tts.algos.easpo import (candidate_frames, crop_frames, crop_pairs, implicit_accuracy, pair_log_ratios,
                                      rollout)
    from rlhf_tts.algos.reward_ascent import reward_ascent_loss
    from rlhf_tts.training.align import (LearnerCore, align_seed, fresh_pair_accuracy, load_prompts, load_reward,
                                         reward_needs_condition, rollout_generator, stable_int)
    from rlhf_tts.training.pretrain import resolve_device

    report = progress or (lambda *a, **k: None)
    location = ascent_location(cfg, states)
    summary_path = location.directory / "ascent_summary.json"
    if (location.final / "state.json").is_file() and summary_path.is_file():
        return location, json.loads(summary_path.read_text())
    device = resolve_device(cfg.align.device)
    core = LearnerCore(cfg, location, resume=False, device=device)  # policy, frozen reference, EASPO's AdamW
    learner, align = core.learner, cfg.align
    reward = load_reward(cfg, device)
    prompts = load_prompts(cfg, core.vocab)
    seed = align_seed(cfg)
    history: list[dict[str, float]] = []
    started = time.monotonic()
    for index in range(align.steps):
        text, _ = prompts.batch(index)
        result = rollout(learner.policy, text.to(device), align, reward.score,
                         rollout_generator(seed, index, device), learner.version, f"r{index}",
                         reward_needs_condition(cfg))
        pairs = result.batch
        g = torch.Generator().manual_seed(stable_int(seed, "ascent", index))
        row = {"updates": float(index + 1), "pairs": float(len(pairs)),
               "kept_fraction": float(pairs.stats.get("kept_fraction", 0.0))}
        if len(pairs):
            row["reward_margin"] = float((pairs.score_win - pairs.score_lose).mean())
            judged = pairs
            frames = crop_frames(align, learner.policy.length_multiple)
            if frames:  # read as the EASPO learner reads them
                judged = crop_pairs(pairs, frames, g, candidate_frames(align, frames))
            judged = judged.to(device)
            with torch.no_grad():  # the pairs are new to the policy: read them before stepping
                l_w, l_l = pair_log_ratios(learner.policy, learner.reference, judged, align.reduce, align.guidance)
            row["implicit_accuracy"] = implicit_accuracy(l_w, l_l)
            row["log_ratio_margin"] = float((l_w - l_l).mean())
            chosen = pairs.take(torch.randperm(len(pairs), generator=g)[:states]).to(device)
            loss, rewards = reward_ascent_loss(learner.policy, chosen, reward.differentiable_scores,
                                               torch.Generator(device=device).manual_seed(stable_int(seed, "step", index)),
                                               align.guidance)
            learner.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(learner.policy.decoder.parameters(), align.grad_clip))
            learner.optimizer.step()
            row["loss"] = float(loss.detach())
            row["step_reward"] = float(rewards.mean())
        learner.updates += 1
        learner.version += 1
        history.append(row)
        report("reward ascent", index + 1, align.steps,
               info=f"reward {row.get('step_reward', float('nan')):.3f} acc {row.get('implicit_accuracy', float('nan')):.2f}")
    core.publish()
    summary = {"updates": align.steps, "states_per_update": states, "seconds": round(time.monotonic() - started, 2),
               "model": str(location.directory), "fresh_pair_accuracy": fresh_pair_accuracy(history),
               "history": history}
    meta_path = location.directory / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["aligned"]["objective"] = f"reward ascent (diagnostic), {states} states per update"
    write_json_atomic(meta_path, meta)
    write_json_atomic(summary_path, summary)  # last: its presence marks a finished model
    return location, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_tts.training.reward_ascent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=6,
                        help="preference states per update that take the reward's gradient (6 whole utterances cost "
                        "about what EASPO's learner spends on ~22 64-frame pairs)")
    parser.add_argument("--evaluate", action="store_true", help="then judge it against the base model (evaluate report)")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        if args.states < 1:
            raise ConfigError("--states: at least 1")
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from rich.console import Console

    from rlhf_tts.eval.plots import alignment_curves_figure
    from rlhf_tts.run import StageProgress, progress_bar

    console = Console()
    try:
        with progress_bar(console) as progress:
            location, summary = run_reward_ascent(cfg, args.states, StageProgress(progress))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir) / "reward_ascent"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ascent_summary.json").write_text(json.dumps(summary, indent=1))
    alignment_curves_figure(summary["history"], f"reward ascent on {cfg.preset}: {args.states} states per update",
                            out / "ascent_curves.png")
    accuracy = summary["fresh_pair_accuracy"]
    if accuracy is not None:
        console.print(f"fresh-pair implicit accuracy (last {accuracy['updates']} updates, {accuracy['pairs']:.0f} "
                      f"pairs): {accuracy['value']:.3f}")
    console.print(f"reward-ascent model: {location.directory} ({summary['seconds']:.0f} s); curves: {out}")
    if args.evaluate:
        from rlhf_tts import evaluate

        return evaluate.main(["--no-aligned", "--system", f"reward-ascent={location.directory}",
                              *(["--config", args.config] if args.config else []), *args.overrides])
    return 0


if __name__ == "__main__":
    sys.exit(main())
