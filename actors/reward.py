"""RewardActor: one reward model shared by every rollout actor, scoring their requests in batches.

An async actor: each `score` call queues its request and awaits a future; one batching task takes
requests until `max_batch` candidates are queued or `max_wait_ms` has passed since the first, runs
the reward model once on the concatenation, and resolves each caller with its own slice
(`rlhf_tts.rewards.base.concat_requests` / `split_result`, which keep order). The model call runs
in a worker thread so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import ray
import torch

from actors.wire import PackedScoreRequest, unpack_request
from rlhf_tts.config import RunConfig
from rlhf_tts.rewards.base import ScoreRequest, ScoreResult, concat_requests, split_result


class RewardService:
    """The batching logic, usable without Ray (the benchmark's unbatched baseline calls `model.score`)."""

    def __init__(self, model, max_batch: int, max_wait_ms: float, device: torch.device | str = "cpu") -> None:  # noqa: ANN001
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000.0
        self.device = torch.device(device)
        self.queue: asyncio.Queue | None = None
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self.candidates = 0
        self.busy_seconds = 0.0
        self._worker: asyncio.Task | None = None

    async def score(self, request: ScoreRequest | PackedScoreRequest) -> ScoreResult:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    async def _serve(self) -> None:
        assert self.queue is not None
        while True:
            first = await self.queue.get()
            waiting = [first]
            size = len(first[0])
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                waiting.append(item)
                size += len(item[0])
            await self._run(waiting)

    async def _run(self, waiting: list) -> None:  # noqa: ANN001
        started = time.monotonic()
        try:
            merged, sizes, result = await asyncio.to_thread(self._merge_and_score, [request for request, _ in waiting])
        except Exception as err:  # noqa: BLE001 - every waiting caller must hear about it
            for _, future in waiting:
                if not future.done():
                    future.set_exception(err)
            return
        self.busy_seconds += time.monotonic() - started
        self.batch_sizes[len(merged)] += 1
        self.requests += len(waiting)
        self.candidates += len(merged)
        for (_, future), part in zip(waiting, split_result(result, sizes)):
            if not future.done():
                future.set_result(part)

    def _merge_and_score(self, requests: list) -> tuple[ScoreRequest, list[int], ScoreResult]:  # noqa: ANN001
        """Unpacked (`actors/wire.py`) and concatenated in the worker thread: the event loop keeps queueing."""
        merged, sizes = concat_requests([unpack_request(r) for r in requests])
        return merged, sizes, self._score_on_device(merged)

    @torch.no_grad()
    def _score_on_device(self, request: ScoreRequest) -> ScoreResult:
        result = self.model.score(request.to(self.device))
        return ScoreResult(result.scores.cpu(), {k: v.cpu() for k, v in result.components.items()})

    def stats(self) -> dict:
        calls = sum(self.batch_sizes.values())
        return {"calls": calls, "requests": self.requests, "candidates": self.candidates,
                "mean_batch": self.candidates / calls if calls else 0.0, "busy_seconds": self.busy_seconds,
                "batch_size_histogram": dict(sorted(self.batch_sizes.items()))}


@ray.remote
class RewardActor:
    """Loads the configured reward model (EASPM) and serves batched `score` calls."""

    def __init__(self, cfg_json: dict) -> None:
        from rlhf_tts.training.align import load_reward

        cfg = RunConfig.model_validate(cfg_json)
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.service = RewardService(load_reward(cfg, device), cfg.distributed.reward_max_batch,
                                     cfg.distributed.reward_max_wait_ms, device)

    async def score(self, request: ScoreRequest | PackedScoreRequest) -> ScoreResult:
        return await self.service.score(request)

    async def stats(self) -> dict:
        return self.service.stats()

    async def ping(self) -> bool:
        return True
