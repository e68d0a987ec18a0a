"""Data-parallel training on one machine's CPU cores: one-thread rank processes, gradients summed by gloo.

Why: a small model's training step uses a second torch thread poorly, while one-thread processes
side by side scale better (`python bench/threads.py`: a bare U-Net step 1.76x against 1.33x). The
real loops gain less (every rank repeats the optimizer step, and pays for its process and the
all-reduce): on 2 cores `python bench/data_parallel.py` measured 1.10x for tiny pretraining and 1.03x for EASPM (so
the presets keep one process); more cores than a model's step can use is where ranks pay. Each rank takes its share of every global batch
(`Ranks.shard`), weights its loss by its share of the items, and `Ranks.sum_gradients` adds the
ranks' gradients, so an update follows the global batch's item-mean loss, as one process would (up
to float summation order and each rank's own noise draws: a model trained on R ranks is another
model than one trained in one process, and the stages key their caches by R).

Rank 0 runs in the calling process (it keeps the tracker, the progress bar and the checkpoints);
ranks 1 … R-1 are spawned children. The ranks meet through a file store in a temporary folder and
gloo sockets on the loopback interface: nothing listens beyond this machine. A child that fails
fails the parent's collective call, and the parent's error names the child's exit code.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from rlhf_tts.config import stable_hash

T = TypeVar("T")
COLLECTIVE_TIMEOUT = timedelta(minutes=15)  # rank 0 may spend minutes on samples/checkpoints between steps


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks; with `world == 1` every method is the identity."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items of a global batch (strided, so length-sorted batches split evenly)."""
        return list(items[self.rank :: self.world])

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def backward(self, loss: torch.Tensor, share: float, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Backpropagate this rank's loss weighted by its `share` of the global batch's items and sum
        the gradients over the ranks: the global batch's mean loss, as one process would have it."""
        if self.world == 1:
            loss.backward()
            return
        (loss * share).backward()
        self.sum_gradients(parameters)

    def seed(self, seed: int, stream: str) -> int:
        """This rank's seed for its own draws: `seed` on rank 0 (the one-process stream, untouched);
        a hash of (seed, stream, rank) elsewhere, which also reseeds torch's global RNG (dropout)."""
        if self.main:
            return seed
        mine = int(stable_hash(seed, stream, self.rank, length=15), 16)
        torch.manual_seed(mine)
        return mine

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def training_ranks(configured: int, device: torch.device, batch_size: int) -> int:
    """Data-parallel ranks: 1 on an accelerator; else `configured`, at most one per batch item."""
    return 1 if device.type != "cpu" else max(1, min(configured, batch_size))


def gathered_rng(state: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, torch.Tensor]:
    """Every rank's RNG `state`, gathered, as one flat dict for rank 0's checkpoint (a collective:
    every rank calls it); one process keeps the unprefixed names it always had."""
    if ranks.world == 1:
        return state
    return {f"rank{r}/{k}": v for r, each in enumerate(ranks.gather(state)) for k, v in each.items()}


def rank_rng(saved: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, torch.Tensor]:
    """This rank's RNG states out of a checkpoint written by `gathered_rng`."""
    if ranks.world == 1:
        return saved
    prefix = f"rank{ranks.rank}/"
    mine = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
    if not mine:
        raise ValueError(f"the checkpoint has no RNG state for data-parallel rank {ranks.rank}: resume with the "
                         "data_parallel setting it was written with")
    return mine


def loopback_interface() -> str | None:
    """The loopback interface's name (`lo` on Linux, `lo0` on macOS and the BSDs), so gloo's sockets
    stay on this machine; None where the platform cannot list interfaces (gloo then picks one)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _join(store: Path, ranks: Ranks) -> None:
    if "GLOO_SOCKET_IFNAME" not in os.environ and (loopback := loopback_interface()) is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback  # loopback only; a user's own setting wins
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=ranks.rank,
                                         world_size=ranks.world, timeout=COLLECTIVE_TIMEOUT)


def _child(worker: Callable[..., Any], store: Path, ranks: Ranks, args: tuple) -> None:
    torch.set_num_threads(1)
    _join(store, ranks)
    worker(ranks, *args)  # an exception ends this process with a non-zero exit code
    torch.distributed.barrier()  # every rank done before any tears its sockets down
    torch.distributed.destroy_process_group()


def run_ranks(worker: Callable[..., T], world: int, args: tuple, main_args: tuple = ()) -> T:
    """`worker(Ranks(r, world), *args)` on every rank r, with `main_args` appended on rank 0 (a tracker,
    a progress callback: things that stay in this process); returns rank 0's result. `worker` must be
    a module-level function (the children import it); each rank runs one torch thread."""
    if world == 1:
        return worker(Ranks(), *args, *main_args)
    context = mp.get_context("spawn")
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="rlhf_tts-ranks-") as folder:
        store = Path(folder) / "store"
        children = [context.Process(target=_child, args=(worker, store, Ranks(r, world), args), daemon=True)
                    for r in range(1, world)]
        for child in children:
            child.start()
        torch.set_num_threads(1)
        try:
            _join(store, Ranks(0, world))
            try:
                result = worker(Ranks(0, world), *args, *main_args)
                torch.distributed.barrier()
            except Exception as err:
                for child in children:  # a rank that died makes this one fail: give it time to report
                    child.join(timeout=10)
                failed = [f"rank {r} exit code {c.exitcode}" for r, c in enumerate(children, 1)
                          if c.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"data-parallel training failed: {', '.join(failed)} (its traceback is "
                                       "above)") from err
                raise
            finally:
                torch.distributed.destroy_process_group()
            for r, child in enumerate(children, 1):
                child.join(timeout=COLLECTIVE_TIMEOUT.total_seconds())
                if child.exitcode != 0:
                    raise RuntimeError(f"data-parallel training: rank {r} ended with exit code {child.exitcode}")
        finally:
            torch.set_num_threads(threads)
            for child in children:
                if child.is_alive():
                    child.terminate()
    return result
