"""Ray's overhead on EASPO, measured in one run on one config.

    python bench/align_overhead.py [--preset tiny] [--steps 12] [--rounds 3] [--warm-driver] [key=value ...]

1. Pairs per second of the Ray loop (one rollout actor, reward actor, learner actor) over the
   in-process loop (the same functions in one process). Target ≥ 0.8. Both are timed from the
   first rollout to the last update (`summary["seconds"]`: models loaded, actors alive), `--rounds`
   runs each in alternating order (a shared machine's speed drifts by 20 % within minutes), pooled;
   the wall time including Ray's start-up is printed beside it, and where each loop's time went.
   Each in-process run gets a fresh process, as each Ray run gets fresh actors (and as the main job
   runs one alignment per process): a process's first rollouts pay oneDNN's set-up of each new
   tensor shape, and a driver that ran the same prompts before runs them ~20 % faster
   (`bench/process_warmup.py` measures it). `--warm-driver` runs the
   in-process loop in this process instead, the comparison earlier versions printed.
2. Reward scoring throughput of the reward actor with dynamic batching over the same actor scoring
   each request alone (`reward_max_batch=1`), for 256 one-candidate requests sent concurrently, as
   many rollout actors would; both with the config's `distributed.reward_num_cpus`. Target ≥ 2.

Needs the cached base model and EASPM of the config: run the main job first (or
`python -m rlhf_tts.run stages=[data,pretrain,easpm]`), or pass its `cache_dir=`.
Each run first deletes the aligned model of the config's cache key (12 updates by default: not the
main job's 40), so nothing is reused between runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor

import torch


def _inprocess_run(cfg_json: dict) -> tuple[dict, float]:
    """One in-process alignment in a fresh (spawned) process: (its summary, seconds with model loading)."""
    from rlhf_tts.config import RunConfig
    from rlhf_tts.training.align import run_inprocess_alignment

    start = time.monotonic()
    _, summary = run_inprocess_alignment(RunConfig.model_validate(cfg_json))
    return summary, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each loop, in alternating order")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--warm-driver", action="store_true",
                        help="run the in-process loop in this process (warm after its first run), not a fresh one")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from actors.orchestrator import connect, run_ray_alignment
    from actors.reward import RewardActor
    from rlhf_tts.config import load_config
    from rlhf_tts.rewards.base import ScoreRequest
    from rlhf_tts.training.align import aligned_model_location, run_inprocess_alignment
    from rlhf_tts.training.easpm import easpm_location
    from rlhf_tts.training.pretrain import base_model_location

    cfg = load_config(None, [f"preset={args.preset}", f"align.steps={args.steps}", "tracking.enabled=false",
                             "distributed.num_rollout_actors=1", *args.overrides])
    missing = [f"{name} at {where.directory}" for name, where in
               (("base model", base_model_location(cfg)), ("EASPM", easpm_location(cfg)))
               if not (where.final / "state.json").is_file()]
    if missing:
        raise SystemExit(f"no {' and no '.join(missing)}: run the main job with the same preset and overrides first "
                         "(`python -m rlhf_tts.run`), or pass the cache_dir= it used")
    location = aligned_model_location(cfg)

    connect(cfg)  # a local instance sized for the config's actors, as the main job starts it
    try:
        runs: dict[str, list[tuple[dict, float]]] = {"in-process": [], "Ray loop": []}

        def timed(label: str) -> None:
            shutil.rmtree(location.directory, ignore_errors=True)  # nothing reused between runs
            if label == "in-process" and not args.warm_driver:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
                    runs[label].append(fresh.submit(_inprocess_run, cfg.model_dump(mode="json")).result())
                return
            start = time.monotonic()
            _, summary = (run_inprocess_alignment if label == "in-process" else run_ray_alignment)(cfg)
            runs[label].append((summary, time.monotonic() - start))

        # Alternating order (AB, BA, AB, …): a machine whose speed drifts during the run slows both alike.
        for round_ in range(args.rounds):
            for label in (("in-process", "Ray loop") if round_ % 2 == 0 else ("Ray loop", "in-process")):
                timed(label)

        def pairs(summary: dict, key: str) -> int:
            return summary["learner"][key] if "learner" in summary else summary[key]

        rate, with_start_up = {}, {}
        for label, done in runs.items():
            produced = sum(pairs(summary, "pairs_produced") for summary, _ in done)
            seconds = sum(summary["seconds"] for summary, _ in done)
            wall = sum(w for _, w in done)
            rate[label], with_start_up[label] = produced / seconds, produced / wall
            per_run = ", ".join(f"{pairs(summary, 'pairs_produced') / summary['seconds']:.2f}" for summary, _ in done)
            print(f"{label:10s}: {produced} pairs in {seconds:.1f} s over {len(done)} runs = {rate[label]:.2f} pairs/s "
                  f"(per run {per_run}; "
                  f"{wall:.1f} s with model loading{', Ray and actor start-up' if label == 'Ray loop' else ''}); "
                  f"{sum(pairs(s, 'pairs_consumed') for s, _ in done)} trained on, "
                  f"{sum(pairs(s, 'pairs_dropped_stale') for s, _ in done)} dropped as stale")
            parts = {k: sum(s["time_breakdown"][k] for s, _ in done) for k in done[0][0]["time_breakdown"]}
            print(f"{'':10s}  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
        # Each round's own ratio (its two runs back to back): their spread says how far the pooled ratio can be read.
        per_round = [pairs(ray_summary, "pairs_produced") / ray_summary["seconds"]
                     / (pairs(local_summary, "pairs_produced") / local_summary["seconds"])
                     for (local_summary, _), (ray_summary, _) in zip(runs["in-process"], runs["Ray loop"])]
        print("Ray / in-process per round: " + ", ".join(f"{r:.2f}" for r in per_round)
              + (f" (mean {sum(per_round) / len(per_round):.2f}, standard error "
                 f"{torch.tensor(per_round).std().item() / len(per_round) ** 0.5:.2f})" if len(per_round) > 1 else ""))
        remote = runs["Ray loop"][-1][0]
        print(f"reward batching in the Ray loop: {remote['reward_batching']['mean_batch']:.1f} candidates/call")
        print(f"RATIO Ray / in-process pairs/s: {rate['Ray loop'] / rate['in-process']:.2f} (target >= 0.8)")
        print(f"ratio with start-up: {with_start_up['Ray loop'] / with_start_up['in-process']:.2f}")

        g = torch.Generator().manual_seed(0)
        frames = 128
        requests = [ScoreRequest(torch.randn(1, cfg.features.n_mels, frames, generator=g), torch.ones(1, 1, frames),
                                 torch.rand(1, generator=g), torch.randint(5, (1,), generator=g))
                    for _ in range(args.requests)]
        cfg_json = cfg.model_dump(mode="json")
        rates = {}
        for label, max_batch in (("unbatched", 1), ("batched", cfg.distributed.reward_max_batch)):
            actor_cfg = dict(cfg_json, distributed=dict(cfg_json["distributed"], reward_max_batch=max_batch))
            actor = RewardActor.options(num_cpus=cfg.distributed.reward_num_cpus, max_concurrency=1000).remote(actor_cfg)
            ray.get(actor.ping.remote())
            ray.get([actor.score.remote(r) for r in requests[:8]])  # warm-up
            refs = [ray.put(r) for r in requests]
            start = time.monotonic()
            ray.get([actor.score.remote(r) for r in refs])
            rates[label] = len(requests) / (time.monotonic() - start)
            stats = ray.get(actor.stats.remote())
            print(f"reward {label:9s}: {rates[label]:8.1f} candidates/s (mean batch {stats['mean_batch']:.1f})")
            ray.kill(actor)
        print(f"RATIO reward batched / unbatched throughput: {rates['batched'] / rates['unbatched']:.2f} (target >= 2)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
