"""actors/wire.py: the packed score requests and preference batches the Ray loop sends are exact,
smaller, and leave anything without candidate windows alone."""

import asyncio
import pickle

import torch

from actors.reward import RewardService
from actors.wire import (PackedPreferenceBatch, PackedScoreRequest, pack_batch, pack_request, unpack_batch,
                         unpack_request)
from rlhf_tts.algos import easpo
from rlhf_tts.rewards.base import ScoreRequest, ScoreResult
from rlhf_tts.training.align import batch_digest
from test_easpo import align_cfg, emotion_energy_reward
from test_gradtts import text_batch, tiny_model


def _windowed_rollout(**overrides):
    """A real rollout with windowed pools; returns (every score request it sent, its batch)."""
    cfg = align_cfg(threshold=0.0, sampler_steps=8, k=4, objective="pool_matched", candidate_window=True,
                    learner_crop_frames=8, **overrides)
    sent: list[ScoreRequest] = []

    def recording(request: ScoreRequest) -> ScoreResult:
        sent.append(request)
        return emotion_energy_reward(request)

    batch = easpo.rollout(tiny_model(), text_batch(3, 9), cfg, recording, torch.Generator().manual_seed(2),
                          send_condition=True).batch
    return sent, batch


def _fields(x) -> dict:  # noqa: ANN001
    return {name: value for name, value in vars(x).items() if name != "pools"}


def _equal(a, b) -> bool:  # noqa: ANN001
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_packed_score_requests_rebuild_bit_for_bit_in_fewer_bytes():
    sent, _ = _windowed_rollout(candidate_window_frames=3)
    assert sent and all(r.pools is not None and r.pools.k == 4 and r.pools.frames == 3 for r in sent)
    for request in sent:
        packed = pack_request(request)
        assert isinstance(packed, PackedScoreRequest) and len(packed) == len(request)
        wire = pickle.loads(pickle.dumps(packed))
        rebuilt = unpack_request(wire)
        assert set(_fields(rebuilt)) == set(_fields(request))
        for name, value in _fields(request).items():
            if name == "t":
                assert torch.equal(rebuilt.t, value.reshape(-1).expand(len(request)))
            else:
                assert _equal(getattr(rebuilt, name), value), name
        assert torch.equal(emotion_energy_reward(rebuilt).scores, emotion_energy_reward(request).scores)
        assert len(pickle.dumps(packed)) < len(pickle.dumps(request)) / 2  # the pools' common frames go once


def test_packed_preference_batches_rebuild_bit_for_bit_in_fewer_bytes():
    _, batch = _windowed_rollout()
    assert len(batch) and batch.window_frames == 8 and batch.pool.shape[1] == 4
    packed = pack_batch(batch)
    assert isinstance(packed, PackedPreferenceBatch) and packed.batch.pool.shape[-1] == 8
    rebuilt = unpack_batch(pickle.loads(pickle.dumps(packed)))
    for name, value in vars(batch).items():
        assert _equal(getattr(rebuilt, name), value), name
    assert batch_digest(rebuilt) == batch_digest(batch)
    frames = batch.x_t.shape[-1]
    assert frames > 8 and packed.batch.pool.numel() * frames == batch.pool.numel() * 8  # a pool's windows only
    assert len(pickle.dumps(packed)) < len(pickle.dumps(batch)) - batch.pool.numel() * 4 * (frames - 8) / frames * 0.9
    # a batch the learner has cut to its crop no longer knows where its window is: it travels whole
    assert pack_batch(easpo.crop_pairs(batch, 8, torch.Generator().manual_seed(0))).__class__ is easpo.PreferenceBatch


def test_pack_leaves_requests_and_batches_without_windows_alone():
    cfg = align_cfg(threshold=0.0, sampler_steps=6, k=3, objective="pool_matched")
    sent: list[ScoreRequest] = []
    batch = easpo.rollout(tiny_model(), text_batch(2, 7), cfg, lambda r: sent.append(r) or emotion_energy_reward(r),
                          torch.Generator().manual_seed(5)).batch
    assert sent and all(r.pools is None for r in sent) and batch.window_frames == 0
    assert all(pack_request(r) is r for r in sent) and pack_batch(batch) is batch
    assert unpack_request(sent[0]) is sent[0] and unpack_batch(batch) is batch


def test_reward_service_scores_packed_and_plain_requests_alike_in_one_batch():
    sent, _ = _windowed_rollout()

    class Energy:
        def score(self, request: ScoreRequest) -> ScoreResult:
            return emotion_energy_reward(request)

    async def both() -> list[ScoreResult]:
        service = RewardService(Energy(), max_batch=10_000, max_wait_ms=50.0)
        return await asyncio.gather(service.score(pack_request(sent[0])), service.score(sent[1]))

    packed_result, plain_result = asyncio.run(both())
    assert torch.equal(packed_result.scores, emotion_energy_reward(sent[0]).scores)
    assert torch.equal(plain_result.scores, emotion_energy_reward(sent[1]).scores)
