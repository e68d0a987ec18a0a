"""Compact wire forms of the Ray loop's two big messages, exact inverses of each other.

With `align.candidate_window` a pool's k candidates are equal outside one window (they share their
noise there), so a score request or a preference batch repeats the same frames k times: on the tiny
preset a request is 15.7 MB of which 3.1 MB differ, and a batch 17.3 MB of which 4.5 MB. The rollout
actor sends each pool's common part once plus every candidate's window; the reward and learner actors
rebuild the tensors bit for bit before any computation sees them (tested), so packing changes bytes
on the wire, never a score, a pair or a digest. Anything without windows passes as is.

On one machine the bytes are cheap (the Ray/in-process ratio of `bench/align_overhead.py --warm-driver`
stayed at 0.79 with packing); between nodes of a cluster they cross the network, once per sampler
step in range per rollout actor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from rlhf_tts.algos.easpo import PreferenceBatch, window_index
from rlhf_tts.rewards.base import PoolLayout, ScoreRequest


@dataclass
class PackedScoreRequest:
    """`first`: the request's first candidate of each pool (rows 0, k, 2k, …), whole; `windows`
    (B, k, n_feats, frames): every candidate's window."""

    first: ScoreRequest
    windows: Tensor
    layout: PoolLayout

    def __len__(self) -> int:
        return len(self.first) * self.layout.k


@dataclass
class PackedPreferenceBatch:
    """A batch whose `pool` holds only each candidate's window (P, k, n_feats, window_frames); the rest
    of each candidate equals the pair's winner (`x_win`), itself one of the pool."""

    batch: PreferenceBatch

    def __len__(self) -> int:
        return len(self.batch)


def _every_kth(x, k: int):  # noqa: ANN001, ANN202 - a tensor or list, or None
    if x is None:
        return None
    return x[::k].clone() if isinstance(x, Tensor) else x[::k]  # a clone: a pickled view carries its whole storage


def _repeat(x, k: int):  # noqa: ANN001, ANN202
    if x is None:
        return None
    return x.repeat_interleave(k, 0) if isinstance(x, Tensor) else [v for v in x for _ in range(k)]


def pack_request(request: ScoreRequest) -> ScoreRequest | PackedScoreRequest:
    layout = request.pools
    if layout is None or layout.k < 2:
        return request
    k = layout.k
    if len(request) % k or len(layout.starts) != len(request) // k:
        raise ValueError(f"pool layout of {len(layout.starts)} pools of {k} does not fit {len(request)} candidates")
    pools = request.states.reshape(len(request) // k, k, *request.states.shape[1:])
    windows = pools.gather(-1, window_index(layout.starts, layout.frames, pools))
    t = request.t.reshape(-1).expand(len(request))
    first = ScoreRequest(*(_every_kth(x, k) for x in (request.states, request.mask, t, request.emotion,
                                                       request.prompt, request.durations, request.word_frame_spans,
                                                       request.utt_ids, request.mu, request.speaker)))
    return PackedScoreRequest(first, windows, layout)


def unpack_request(message: ScoreRequest | PackedScoreRequest) -> ScoreRequest:
    if isinstance(message, ScoreRequest):
        return message
    first, k, layout = message.first, message.layout.k, message.layout
    states = first.states.unsqueeze(1).repeat(1, k, *([1] * (first.states.dim() - 1)))
    states.scatter_(-1, window_index(layout.starts, layout.frames, states), message.windows)
    rest = (_repeat(x, k) for x in (first.mask, first.t, first.emotion, first.prompt, first.durations,
                                    first.word_frame_spans, first.utt_ids, first.mu, first.speaker))
    return ScoreRequest(states.reshape(len(message), *states.shape[2:]), *rest, pools=layout)


def pack_batch(batch: PreferenceBatch) -> PreferenceBatch | PackedPreferenceBatch:
    if (not batch.window_frames or not len(batch) or batch.pool.shape[1] == 0
            or bool((batch.window_start < 0).any())):
        return batch
    windows = batch.pool.gather(-1, window_index(batch.window_start, batch.window_frames, batch.pool))
    return PackedPreferenceBatch(replace(batch, pool=windows))


def unpack_batch(message: PreferenceBatch | PackedPreferenceBatch) -> PreferenceBatch:
    if isinstance(message, PreferenceBatch):
        return message
    batch = message.batch
    k = batch.pool.shape[1]
    pool = batch.x_win.unsqueeze(1).repeat(1, k, *([1] * (batch.x_win.dim() - 1)))
    pool.scatter_(-1, window_index(batch.window_start, batch.window_frames, pool), batch.pool)
    return replace(batch, pool=pool)


__all__ = ["PackedPreferenceBatch", "PackedScoreRequest", "pack_batch", "pack_request", "unpack_batch",
           "unpack_request"]
