"""RolloutActor: a policy copy that runs `rlhf_tts.algos.easpo.rollout` and sends scoring to the
reward actor. It holds no state worth saving: after a restart it loads the base model and waits for
the orchestrator to resend the current weights (`set_weights`), so a restarted actor never rolls
out with weights older than the learner's latest broadcast."""

from __future__ import annotations

import ray
import torch

from actors.wire import PackedPreferenceBatch, pack_batch, pack_request
from rlhf_tts.algos.easpo import PreferenceBatch
from rlhf_tts.config import RunConfig
from rlhf_tts.rewards.base import ScoreRequest, ScoreResult
from rlhf_tts.training.align import load_policy, load_prompts, timed_rollout


@ray.remote
class RolloutActor:
    def __init__(self, cfg_json: dict, reward_actor_name: str, actor_index: int) -> None:
        self.cfg = RunConfig.model_validate(cfg_json)
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.policy, vocab, _ = load_policy(self.cfg, self.device)
        self.policy.requires_grad_(False)  # sampling only; weights arrive by set_weights
        self.prompts = load_prompts(self.cfg, vocab)
        self.reward = ray.get_actor(reward_actor_name)  # a name, so a restart needs nothing from the object store
        self.actor_index = actor_index
        self.version = 0

    def set_weights(self, version: int, decoder_state: dict[str, torch.Tensor]) -> int:
        """Load the decoder of policy `version` (passed as a shared object ref, resolved here)."""
        self.policy.decoder.load_state_dict(decoder_state)
        self.version = version
        return version

    def _score(self, request: ScoreRequest) -> ScoreResult:
        return ray.get(self.reward.score.remote(pack_request(request.to("cpu"))))

    def run(self, index: int) -> PreferenceBatch:
        """Rollout number `index` with the current weights; the batch is tagged with their version."""
        text, _ = self.prompts.batch(index)
        result = timed_rollout(self.policy, text, self.cfg, self._score, index, self.version, self.device)
        batch = result.batch.to("cpu")
        batch.stats["actor"] = float(self.actor_index)
        return batch

    @ray.method(num_returns=2)
    def run_with_stats(self, index: int) -> tuple[dict, PreferenceBatch | PackedPreferenceBatch]:
        """(small stats the driver reads, the batch it only forwards by ref, packed for the wire)."""
        batch = self.run(index)
        return dict(batch.stats, version=batch.version, pairs=len(batch)), pack_batch(batch)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def ping(self) -> int:
        return self.version
