"""Ray's overhead on EASPO, measured in one run on one config.

    python bench/align_overhead.py [--preset tiny] [--steps 12] [key=value ...]

1. Pairs per second of the Ray loop (one rollout actor, reward actor, learner actor) over the
   in-process loop (the same functions in one process). Target ≥ 0.8. Both are timed from the
   first rollout to the last update (`summary["seconds"]`: models loaded, actors alive); the wall
   time including Ray's start-up is printed beside it.
2. Reward scoring throughput of the reward actor with dynamic batching over the same actor scoring
   each request alone (`reward_max_batch=1`), for 256 one-candidate requests sent concurrently, as
   many rollout actors would. Target ≥ 2.

Needs the cached base model and EASPM of the config (`python -m rlhf_tts.run stages=[data,pretrain,easpm]`).
Each loop runs into a scratch copy of the alignment cache so nothing is reused between them.
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from actors.orchestrator import connect, run_ray_alignment
    from actors.reward import RewardActor
    from rlhf_tts.config import load_config
    from rlhf_tts.rewards.base import ScoreRequest
    from rlhf_tts.training.align import aligned_model_location, run_inprocess_alignment

    cfg = load_config(None, [f"preset={args.preset}", f"align.steps={args.steps}", "tracking.enabled=false",
                             "distributed.num_rollout_actors=1", *args.overrides])
    location = aligned_model_location(cfg)

    shutil.rmtree(location.directory, ignore_errors=True)
    start = time.monotonic()
    _, local = run_inprocess_alignment(cfg)
    local_wall = time.monotonic() - start
    local_rate = local["pairs_produced"] / local["seconds"]

    shutil.rmtree(location.directory, ignore_errors=True)
    connect(cfg)  # a local instance sized for the config's actors, as the main job starts it
    try:
        start = time.monotonic()
        _, remote = run_ray_alignment(cfg)
        ray_wall = time.monotonic() - start
        ray_pairs = remote["learner"]["pairs_produced"]
        ray_rate = ray_pairs / remote["seconds"]
        # Consumed: pairs the learner trained on (the Ray loop also delivers pairs it drops as stale).
        ray_consumed = remote["learner"]["pairs_consumed"] / remote["seconds"]
        local_consumed = local["pairs_consumed"] / local["seconds"]
        print(f"in-process: {local['pairs_produced']} pairs in {local['seconds']:.1f} s = {local_rate:.2f} pairs/s "
              f"({local_wall:.1f} s with model loading)")
        print(f"Ray loop:   {ray_pairs} pairs in {remote['seconds']:.1f} s = {ray_rate:.2f} pairs/s, "
              f"{remote['learner']['pairs_consumed']} trained on, {remote['learner']['pairs_dropped_stale']} dropped "
              f"as stale ({ray_wall:.1f} s with Ray and actor start-up; reward batching "
              f"{remote['reward_batching']['mean_batch']:.1f} candidates/call)")
        print(f"RATIO Ray / in-process pairs/s: {ray_rate / local_rate:.2f} (target >= 0.8)")
        print(f"ratio of pairs trained on per second: {ray_consumed / local_consumed:.2f}")
        print(f"ratio with start-up: {(ray_pairs / ray_wall) / (local['pairs_produced'] / local_wall):.2f}")

        g = torch.Generator().manual_seed(0)
        frames = 128
        requests = [ScoreRequest(torch.randn(1, cfg.features.n_mels, frames, generator=g), torch.ones(1, 1, frames),
                                 torch.rand(1, generator=g), torch.randint(5, (1,), generator=g))
                    for _ in range(args.requests)]
        cfg_json = cfg.model_dump(mode="json")
        rates = {}
        for label, max_batch in (("unbatched", 1), ("batched", cfg.distributed.reward_max_batch)):
            actor_cfg = dict(cfg_json, distributed=dict(cfg_json["distributed"], reward_max_batch=max_batch))
            actor = RewardActor.options(num_cpus=1, max_concurrency=1000).remote(actor_cfg)
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
