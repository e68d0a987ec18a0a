"""LearnerActor: wraps `rlhf_tts.training.align.LearnerCore` (EASPO loss, optimizer, reference,
ledger, atomic checkpoints). Started with `resume=True` after a restart, so a killed learner comes
back at its last checkpoint with the ledger of the rollouts it had consumed, and never trains on one
of those twice."""

from __future__ import annotations

import uuid
import warnings

import ray
import torch

from actors.wire import PackedPreferenceBatch, unpack_batch
from rlhf_tts.algos.easpo import PreferenceBatch
from rlhf_tts.config import RunConfig
from rlhf_tts.training.align import LearnerCore, aligned_model_location


@ray.remote
class LearnerActor:
    def __init__(self, cfg_json: dict, resume: bool) -> None:
        cfg = RunConfig.model_validate(cfg_json)
        device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        # A restarted actor (restart count > 0) always resumes: its first life wrote the checkpoints.
        with warnings.catch_warnings():  # Ray 2.60's own property reads its deprecated `actor_id` and warns
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.core = LearnerCore(cfg, aligned_model_location(cfg), resume or restarted, device)
        # Calls queued while the actor restarts run on the new incarnation without an error, so every
        # answer names its incarnation: the driver sees a restart even when no call failed.
        self.incarnation = uuid.uuid4().hex

    def update(self, batch: PreferenceBatch | PackedPreferenceBatch) -> tuple[str, dict[str, float]]:
        return self.incarnation, self.core.update(unpack_batch(batch))

    def status(self) -> dict:
        return {"incarnation": self.incarnation, "updates": self.core.updates, "version": self.core.version,
                "rollout_version": self.core.rollout_version,
                "ledger": {k: v for k, v in self.core.ledger.to_json().items() if k not in ("consumed_ids", "pair_digests")},
                "pair_digests": dict(self.core.ledger.pair_digests),
                "consumed_ids": list(self.core.ledger.consumed_ids)}

    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.core.version, self.core.decoder_state()

    def decoder_weights(self) -> dict[str, torch.Tensor]:
        return self.core.decoder_state()

    def rollout_weights(self) -> dict[str, torch.Tensor]:
        """The decoder of `rollout_version` (`align.policy_lag` versions back), which rollout actors run."""
        return self.core.rollout_state()

    def checkpoint(self) -> str:
        return str(self.core.checkpoint())

    def publish(self) -> str:
        return str(self.core.publish().directory)

    def pid(self) -> int:
        import os

        return os.getpid()
