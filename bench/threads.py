"""How well the tiny U-Net uses the machine's cores: one process with N torch threads against N
one-thread processes working at once, for sampler calls (inference) and training steps.

    python bench/threads.py [--preset tiny] [--frames 240] [--seconds 20]

Prints, per workload, the work per second of: one process, one thread; one process, all cores;
all cores as one-thread processes side by side; and the ratios. On a 2-core machine the sampler
(align's rollouts, evaluate's synthesis: most of a first run after pretraining) gains little from a
second thread, so independent work run side by side (two rollout actors, two synthesis workers,
two stages) is where the second core pays. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def _work(kind: str, preset: str, frames: int, threads: int, seconds: float, start: float) -> float:
    """Calls (or steps) per second of one worker, counted over `seconds` after a shared start time."""
    import torch

    torch.set_num_threads(threads)
    from rlhf_tts.config import load_config
    from rlhf_tts.models.gradtts.unet import ScoreUNet

    c = load_config(None, [f"preset={preset}"]).model
    torch.manual_seed(0)
    net = ScoreUNet(c.decoder_dim, tuple(c.decoder_dim_mults), c.speaker_dim, 80, c.pe_scale,
                    c.decoder_attention_heads, c.decoder_attention_dim_head)
    if kind == "sampler":  # one utterance per call, as the CPU sampler runs (synthesis_batch 1)
        x, mask, cond = torch.randn(1, 80, frames), torch.ones(1, 1, frames), torch.randn(1, c.speaker_dim)
        net.eval()

        def step() -> None:
            with torch.inference_mode():
                net(x, mask, x, torch.rand(1), cond)
    else:  # pretraining's shape: 8 crops of 64 frames, forward + backward + AdamW
        x, mask, cond = torch.randn(8, 80, 64), torch.ones(8, 1, 64), torch.randn(8, c.speaker_dim)
        optimizer = torch.optim.AdamW(net.parameters())

        def step() -> None:
            optimizer.zero_grad()
            net(x, mask, x, torch.rand(8), cond).pow(2).mean().backward()
            optimizer.step()
    for _ in range(3):
        step()
    while time.time() < start:  # side-by-side workers start together
        time.sleep(0.01)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def _side_by_side(kind: str, preset: str, frames: int, workers: int, threads: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    start = time.time() + 15.0  # room for every worker to import torch and build its network
    with ctx.Pool(workers) as pool:
        rates = pool.starmap(_work, [(kind, preset, frames, threads, seconds, start)] * workers)
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--frames", type=int, default=240, help="utterance length of a sampler call (tiny test mean)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per configuration")
    args = parser.parse_args()
    from rlhf_tts.workers import usable_cores

    cores = usable_cores()
    print(f"{cores} cores; preset {args.preset}; sampler calls at {args.frames} frames; training steps of 8 x 64 frames")
    for kind, unit in (("sampler", "calls/s"), ("train", "steps/s")):
        one = _side_by_side(kind, args.preset, args.frames, 1, 1, args.seconds)
        threaded = _side_by_side(kind, args.preset, args.frames, 1, cores, args.seconds)
        parallel = _side_by_side(kind, args.preset, args.frames, cores, 1, args.seconds)
        print(f"{kind}: 1 process x 1 thread {one:.2f} {unit}; 1 process x {cores} threads {threaded:.2f} "
              f"({threaded / one:.2f}x); {cores} processes x 1 thread {parallel:.2f} ({parallel / one:.2f}x); "
              f"side by side over threaded: {parallel / threaded:.2f}x")


if __name__ == "__main__":
    main()
