"""The reward interface every reward model implements, and that the reward actor batches.

A `ScoreRequest` carries whole candidate pools: the k candidates of each of B prompts, their
diffusion time, the target emotion, and the utterance context a multi-level reward needs (mask,
durations, word spans, reference utterance id). A `ScoreResult` gives one scalar per candidate plus
named components (HPRO's `frame`, `word`, `sentence`; EASPM leaves them empty).

Requests from different rollout actors are concatenated along the batch axis by `concat_requests`
and the result split back by `split_result`; both preserve order, so batching is invisible to
callers and a batched score equals the unbatched one (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PoolLayout:
    """How a request's N = B·k candidates were drawn: item-major pools of `k` that are equal outside one
    window of `frames` frames from `starts[b]` (EASPO's `candidate_window`), and share one mask, time,
    emotion and condition per pool. Reward models ignore it; a transport uses it to send each pool's
    common part once (`actors/wire.py`: 5x fewer bytes to the reward actor on the tiny preset)."""

    k: int
    starts: Tensor  # (B,) first frame of each pool's window
    frames: int


@dataclass
class ScoreRequest:
    """Candidates to score: `states` (N, n_feats, T) with `mask` (N, 1, T), at diffusion times `t` (N,).

    `emotion` (N,) is the target emotion index; `prompt` optional free-text prompts (len N) for
    prompt-tower models. `durations` (N, T_text), `word_frame_spans` and `utt_ids` are the utterance
    context multi-level rewards use; single-score models ignore them. `mu` (N, n_feats, T) and `speaker`
    (N,) are the items' decoder condition, which a reward that scores the base model's clean estimate
    of each state (`easpm.input=x0_hat`) needs; rollouts fill them. `pools` says, when the candidates
    come in windowed pools, how (`PoolLayout`); scores never depend on it.
    """

    states: Tensor
    mask: Tensor
    t: Tensor
    emotion: Tensor
    prompt: list[str] | None = None
    durations: Tensor | None = None
    word_frame_spans: list[list[tuple[int, int]]] | None = None
    utt_ids: list[str] | None = None
    mu: Tensor | None = None
    speaker: Tensor | None = None
    pools: PoolLayout | None = None

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def to(self, device: torch.device | str) -> "ScoreRequest":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return ScoreRequest(self.states.to(device), self.mask.to(device), self.t.to(device), self.emotion.to(device),
                            self.prompt, move(self.durations), self.word_frame_spans, self.utt_ids, move(self.mu),
                            move(self.speaker), self.pools)


@dataclass
class ScoreResult:
    """One scalar per candidate (N,), higher is better, plus optional named components (N,) each."""

    scores: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


class RewardModel(Protocol):
    """Anything that scores candidate states. Must be a pure function of the request (eval mode, no
    dropout), so that batching requests together never changes a score."""

    def score(self, request: ScoreRequest) -> ScoreResult: ...


def _pad_time(x: Tensor, length: int) -> Tensor:
    return F.pad(x, (0, length - x.shape[-1]))


def concat_requests(requests: list[ScoreRequest]) -> tuple[ScoreRequest, list[int]]:
    """Stack requests along the batch axis (time padded to the longest) → (request, sizes)."""
    if not requests:
        raise ValueError("concat_requests: no requests")
    if len(requests) == 1 and requests[0].t.numel() == len(requests[0]):
        return requests[0], [len(requests[0])]  # nothing to stack: no copy of a pool's states
    length = max(r.states.shape[-1] for r in requests)
    sizes = [len(r) for r in requests]

    def cat_optional(name: str, pad: bool = True) -> Tensor | None:
        values = [getattr(r, name) for r in requests]
        if any(v is None for v in values):
            return None
        if not pad:
            return torch.cat(values)
        width = max(v.shape[-1] for v in values)
        return torch.cat([_pad_time(v, width) for v in values])

    def join_lists(name: str) -> list | None:
        values = [getattr(r, name) for r in requests]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    merged = ScoreRequest(
        states=torch.cat([_pad_time(r.states, length) for r in requests]),
        mask=torch.cat([_pad_time(r.mask, length) for r in requests]),
        t=torch.cat([r.t.reshape(-1).expand(len(r)) if r.t.numel() == 1 else r.t for r in requests]),
        emotion=torch.cat([r.emotion for r in requests]),
        prompt=join_lists("prompt"),
        durations=cat_optional("durations"),
        word_frame_spans=join_lists("word_frame_spans"),
        utt_ids=join_lists("utt_ids"),
        mu=cat_optional("mu"),
        speaker=cat_optional("speaker", pad=False),
    )
    return merged, sizes


def split_result(result: ScoreResult, sizes: list[int]) -> list[ScoreResult]:
    """Undo `concat_requests` on the result."""
    scores = result.scores.split(sizes)
    parts = {name: value.split(sizes) for name, value in result.components.items()}
    return [ScoreResult(s, {name: p[i] for name, p in parts.items()}) for i, s in enumerate(scores)]
