"""Pretraining and EASPM training: one process with every core's threads against one-thread
data-parallel ranks (`pretrain.data_parallel`, `easpm.data_parallel`), in one run on one config.

    python bench/data_parallel.py [--preset tiny] [--steps 400] [--ranks 2] [--stages pretrain,easpm]
                                  [key=value ...]

Per stage, the same work is timed both ways from scratch in scratch cache folders (nothing is
reused between the two): `--steps` training steps, start-up included (the ranks' processes, and
for EASPM preparing its items with the base model, which every rank repeats). The two ways train
different models (each rank draws its own noise); only speed is compared. `easpm` needs the
config's base model in `cache_dir` (`python -m rlhf_tts.run stages=[data,pretrain]`). Nothing else
should run meanwhile.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def _link(cache: Path, source: Path, *stages: str) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if (source / stage).exists():
            (cache / stage).symlink_to(source / stage)


def _seconds(stage: str, cfg, steps: int) -> float:  # noqa: ANN001 - RunConfig
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.training.easpm import train_easpm
    from rlhf_tts.training.pretrain import run_pretraining

    start = time.perf_counter()
    if stage == "pretrain":
        run_pretraining(cfg, dataset_location(cfg)[0].directory, stop_after=steps)
    else:
        train_easpm(cfg, stop_after=steps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=400, help="training steps per measurement")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stages", default="pretrain,easpm")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from rlhf_tts.config import load_config
    from rlhf_tts.data.pipeline import build_dataset
    from rlhf_tts.training.pretrain import base_model_location
    from rlhf_tts.workers import usable_cores

    base = [f"preset={args.preset}", "tracking.enabled=false", *args.overrides]
    cfg = load_config(None, base)
    build_dataset(cfg)
    source = Path(cfg.cache_dir)
    stages = args.stages.split(",")
    if "easpm" in stages and not (base_model_location(cfg).final / "state.json").is_file():
        raise SystemExit(f"easpm needs the base model of this config in {source}: "
                         "python -m rlhf_tts.run stages=[data,pretrain] (same overrides), or --stages pretrain")
    print(f"{usable_cores()} cores; preset {args.preset}; one process at {torch.get_num_threads()} threads "
          f"against {args.ranks} one-thread ranks")
    for stage in stages:
        extra = {"pretrain": [f"pretrain.checkpoint_every={args.steps * 10}"],
                 "easpm": [f"easpm.checkpoint_every={args.steps * 10}", f"easpm.eval_every={args.steps * 10}"]}[stage]
        seconds = {}
        with tempfile.TemporaryDirectory(prefix="bench-dp-") as scratch:
            for ranks in (1, args.ranks):
                cache = Path(scratch) / str(ranks)
                _link(cache, source, "corpus", "data", *(["pretrain"] if stage == "easpm" else []))
                run = load_config(None, [*base, f"cache_dir={cache}", f"{stage}.data_parallel={ranks}", *extra])
                seconds[ranks] = _seconds(stage, run, args.steps)
                shutil.rmtree(cache, ignore_errors=True)
        print(f"{stage} ({args.steps} steps): 1 process {seconds[1]:.1f} s, {args.ranks} ranks {seconds[args.ranks]:.1f} s, "
              f"speed-up {seconds[1] / seconds[args.ranks]:.2f}")


if __name__ == "__main__":
    main()
