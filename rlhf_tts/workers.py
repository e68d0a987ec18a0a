"""Per-item CPU work spread over one-thread worker processes.

On a few CPU cores torch's intra-op threads scale poorly on the tiny models' small tensors:
`bench/threads.py` measured the sampler at 1.70x the calls/s as two one-thread processes against
one two-thread process. Work that is a loop over independent items (synthesising test utterances;
pocketsphinx's single-threaded forced alignments) therefore runs in `resolve_workers()` spawned
processes with one torch thread each. Spawned, not forked: a fork of a process whose OpenMP pool has
started can hang in the child.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container or `taskset` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(configured: int, device: "str | torch.device") -> int:
    """Worker processes for per-item work: `configured`, or 0 = auto: one per usable core on CPU (each
    with one thread), 1 (in process) on an accelerator, where batching is the faster route."""
    import torch

    if configured:
        return configured
    return max(1, usable_cores()) if torch.device(device).type == "cpu" else 1


def _start_worker(initializer: Callable[..., None] | None, args: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    if initializer is not None:
        initializer(*args)


def worker_pool(workers: int, initializer: Callable[..., None] | None = None, args: tuple = ()) -> ProcessPoolExecutor:
    """`workers` spawned processes, each limited to one torch thread and set up by `initializer(*args)`
    (a module-level function; `args` are pickled to each worker as it starts)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(initializer, args))


def worker_state() -> dict[str, Any]:
    """Per-process state an initializer fills and the tasks read (one dict per worker process)."""
    return _STATE


_STATE: dict[str, Any] = {}
