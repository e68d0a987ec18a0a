"""The alignment stage's pieces shared by the in-process loop and the Ray loop (no Ray here).

Both loops draw rollout number r with `PromptSampler.batch(r)` and `rollout_generator(seed, r)`, so
a rollout is a pure function of (weights, r): with one rollout actor run synchronously the Ray loop
produces exactly the in-process loop's pairs (tested). The learner keeps a `PairLedger` in its
checkpoints; the orchestrator keeps the transport side (lost in flight, dropped as stale).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhf_tts.algos.easpo import EASPOLearner, PreferenceBatch, is_stale, rollout
from rlhf_tts.checkpoint import latest_checkpoint, load_checkpoint, restore, save_checkpoint
from rlhf_tts.config import RunConfig, stable_hash
from rlhf_tts.models.gradtts.model import GradTTS, TextBatch
from rlhf_tts.training.data import Vocabulary
from rlhf_tts.training.pretrain import BaseModel, base_model_location, resolve_device

ALIGN_VERSION = 2  # 2: candidates scored at their own time (easpo.candidate_time), not t - h
ProgressFn = Callable[..., None]


# ---------------------------------------------------------------------------------------- prompts

class PromptSampler:
    """Rollout prompts: (sentence, target emotion, speaker) drawn deterministically per rollout index.

    Target emotions cover all emotions (Neutral included: EASPM scores it like the others):
    `balanced` deals them from shuffled decks of one card per emotion, so every run of
    len(emotions) consecutive trajectories holds each emotion once; `iid` draws each independently
    (60 updates of 4 then give one emotion 40 trajectories and another 56). Sentences come from the
    configured split of the manifest, with their phonemes.
    """

    def __init__(self, rows: list[dict], vocab: Vocabulary, batch_size: int, seed: int,
                 emotions: str = "iid") -> None:
        self.rows = sorted((r for r in rows if r["speaker"] in vocab.speakers), key=lambda r: r["utt_id"])
        if not self.rows:
            raise ValueError("no prompts: the split has no utterances of the model's speakers")
        self.vocab, self.batch_size, self.seed, self.emotions = vocab, batch_size, seed, emotions

    def target_emotions(self, index: int, g: torch.Generator) -> torch.Tensor:
        """The target emotions of rollout `index`: a pure function of (seed, index), so any actor can
        redo a lost rollout; `balanced` reads trajectory positions index·B … index·B + B - 1 of the decks."""
        n = len(self.vocab.emotions)
        if self.emotions == "iid":
            return torch.randint(n, (self.batch_size,), generator=g)
        positions = range(index * self.batch_size, (index + 1) * self.batch_size)
        decks = {p // n: torch.randperm(n, generator=torch.Generator().manual_seed(
            stable_int(self.seed, "emotion deck", p // n))) for p in positions}
        return torch.stack([decks[p // n][p % n] for p in positions])

    def batch(self, index: int) -> tuple[TextBatch, list[str]]:
        g = torch.Generator().manual_seed(stable_int(self.seed, "prompts", index))
        picks = torch.randint(len(self.rows), (self.batch_size,), generator=g).tolist()
        emotions = self.target_emotions(index, g)
        rows = [self.rows[i] for i in picks]
        ids = [self.vocab.symbols.ids(r["phonemes"]) for r in rows]
        padded = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for i, seq in enumerate(ids):
            padded[i, : len(seq)] = torch.tensor(seq)
        text = TextBatch(padded, torch.tensor([len(s) for s in ids]), emotions,
                         torch.tensor([self.vocab.speakers.index(r["speaker"]) for r in rows]),
                         [[tuple(s) for s in r["word_spans"]] for r in rows])
        return text, [r["utt_id"] for r in rows]


def stable_int(*parts: object) -> int:
    return int(stable_hash(*parts, length=15), 16)


def align_seed(cfg: RunConfig) -> int:
    """`align.seed`, or the run's seed when unset."""
    return cfg.seed if cfg.align.seed is None else cfg.align.seed


def rollout_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The RNG of rollout `index`: the same on every actor, so any actor can redo a lost rollout."""
    return torch.Generator(device=device).manual_seed(stable_int(seed, "rollout", index))


# ----------------------------------------------------------------------------------------- ledger

@dataclass
class PairLedger:
    """Where every rollout's pairs went. Invariant: produced = consumed + stale + lost_in_flight +
    rolled_back (+ pending while running); `consumed_ids` guards against training on one twice."""

    rollouts_produced: int = 0
    pairs_produced: int = 0
    pairs_consumed: int = 0
    pairs_dropped_stale: int = 0
    pairs_rolled_back: int = 0
    rollouts_lost_in_flight: int = 0
    rollouts_duplicate: int = 0
    consumed_ids: list[str] = field(default_factory=list)
    pair_digests: dict[str, str] = field(default_factory=dict)  # rollout id → digest of the pairs trained on

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PairLedger":
        return cls(**data)


# ------------------------------------------------------------------------------------ components

@dataclass
class AlignedModel:
    """The aligned policy, saved in the base model's layout (model.json + final/) so that every tool
    that loads a base model (synthesize, evaluate) loads it too."""

    directory: Path

    @property
    def final(self) -> Path:
        return self.directory / "final"

    @property
    def checkpoints(self) -> Path:
        return self.directory / "checkpoints"

    def as_base(self) -> BaseModel:
        return BaseModel(self.directory)


# The schedule of every aligned model cached before the schedule entered the key: one rollout actor with
# two rollouts in flight, so each rollout one version behind the learner.
_UNKEYED_SCHEDULE = {"lag": 1}


def rollout_schedule(cfg: RunConfig) -> dict[str, int]:
    """What of the loop decides which pairs the learner trains on: how many versions behind the learner the
    rollouts' weights are. With one rollout actor that is `align.policy_lag`, plus one per further rollout in
    flight (a queued rollout was dispatched before the update whose weights it would get; with
    `sync_every=1`), whichever loop runs it: one rollout in flight with `policy_lag=1` trains on the pairs of
    two in flight without it. More actors finish in a varying order: their schedule is their counts."""
    d, lag = cfg.distributed, cfg.align.policy_lag
    if d.mode == "local":
        return {"lag": lag}
    if d.num_rollout_actors == 1 and (d.max_in_flight == 1 or cfg.align.sync_every == 1):
        schedule = {"lag": lag + d.max_in_flight - 1}
        return schedule if schedule["lag"] <= d.max_staleness else schedule | {"max_staleness": d.max_staleness}
    return {"lag": lag, "rollout_actors": d.num_rollout_actors, "in_flight": d.max_in_flight,
            "max_staleness": d.max_staleness}


def align_key(cfg: RunConfig) -> str:
    from rlhf_tts.training.easpm import easpm_location

    exclude = {"checkpoint_every", "log_every", "device", "policy_lag"}  # the lag is in the schedule
    if cfg.align.prompt_emotions == "iid":
        exclude.add("prompt_emotions")  # the key of the versions before the option
    if cfg.align.candidate_window_frames is None:
        exclude.add("candidate_window_frames")  # likewise
    if cfg.align.plain_steps == "stochastic":
        exclude.add("plain_steps")  # likewise
    if not cfg.align.level_anchor:
        exclude.add("level_anchor")  # likewise
    if not cfg.align.level_target:
        exclude.add("level_target")  # likewise
    settings = {**cfg.align.model_dump(exclude=exclude), "seed": align_seed(cfg)}  # unset == the run's seed
    if (schedule := rollout_schedule(cfg)) != _UNKEYED_SCHEDULE:
        settings["schedule"] = schedule
    return stable_hash(base_model_location(cfg).directory.name, easpm_location(cfg).directory.name,
                       settings, cfg.seed, ALIGN_VERSION)


def aligned_model_location(cfg: RunConfig) -> AlignedModel:
    return AlignedModel(Path(cfg.cache_dir) / "align" / align_key(cfg))


def load_policy(cfg: RunConfig, device: torch.device | str = "cpu") -> tuple[GradTTS, Vocabulary, RunConfig]:
    base = base_model_location(cfg)
    if not (base.final / "state.json").is_file():
        raise FileNotFoundError(f"no base model at {base.directory}: run the pretrain stage first")
    return base.load(device)


def load_reward(cfg: RunConfig, device: torch.device | str = "cpu"):  # noqa: ANN201 - a RewardModel
    from rlhf_tts.rewards.easpm_reward import EASPMReward

    return EASPMReward.from_config(cfg, device, form=cfg.align.reward)


def reward_needs_condition(cfg: RunConfig) -> bool:
    """Whether score requests must carry each candidate's mu and speaker: an EASPM that scores the
    base model's clean estimate (`easpm.input=x0_hat`) runs the base decoder on them."""
    return cfg.easpm.input == "x0_hat"


def load_prompts(cfg: RunConfig, vocab: Vocabulary) -> PromptSampler:
    from rlhf_tts.data.manifest import read_manifest
    from rlhf_tts.data.pipeline import dataset_location

    dataset, _ = dataset_location(cfg)
    rows = [r for r in read_manifest(dataset.manifest_path).to_pylist() if r["split"] == cfg.align.split]
    return PromptSampler(rows, vocab, cfg.align.prompts_per_rollout, align_seed(cfg), cfg.align.prompt_emotions)


def timed_rollout(policy: GradTTS, text: TextBatch, cfg: RunConfig, score: Callable, index: int,
                  version: int, device: torch.device | str):  # noqa: ANN201 - a RolloutResult
    """Rollout number `index` (`rlhf_tts.algos.easpo.rollout`), as both loops run it, with its wall seconds
    and the part of them spent waiting for scores in the batch's stats (`rollout_seconds`, `score_seconds`):
    the figures that say where a loop's time goes (bench/align_overhead.py prints them side by side)."""
    waited = 0.0

    def timed_score(request):  # noqa: ANN001, ANN202
        nonlocal waited
        start = time.perf_counter()
        try:
            return score(request)
        finally:
            waited += time.perf_counter() - start

    start = time.perf_counter()
    result = rollout(policy, text.to(device), cfg.align, timed_score, rollout_generator(align_seed(cfg), index, device),
                     version, f"r{index}", reward_needs_condition(cfg))
    result.batch.stats.update(rollout_seconds=time.perf_counter() - start, score_seconds=waited)
    return result


def batch_digest(batch: PreferenceBatch) -> str:
    """SHA-1 of a batch's pairs (states, candidates, scores, times): equal digests = identical pairs."""
    import hashlib

    h = hashlib.sha1()
    for tensor in (batch.x_t, batch.x_win, batch.x_lose, batch.score_win, batch.score_lose, batch.t, batch.step,
                   batch.pool, batch.pool_scores):
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------- learner state

class LearnerCore:
    """EASPOLearner + ledger + atomic checkpoints; the learner actor is a thin wrapper of this."""

    def __init__(self, cfg: RunConfig, directory: AlignedModel, resume: bool, device: torch.device | str = "cpu") -> None:
        self.cfg, self.location = cfg, directory
        policy, self.vocab, self.base_cfg = load_policy(cfg, device)
        self.learner = EASPOLearner(policy, cfg.align)
        self.ledger = PairLedger()
        self._consumed = set()
        # The decoder at each of the last `policy_lag` + 1 versions: rollouts use the oldest (`rollout_state`).
        self._published: dict[int, dict[str, torch.Tensor]] = {}
        latest = latest_checkpoint(directory.checkpoints) if resume else None
        if latest is not None:
            checkpoint = load_checkpoint(latest)
            extra = restore(checkpoint, self.learner.policy.decoder, self.learner.optimizer)
            state = checkpoint.state
            self.learner.version, self.learner.updates = state["version"], state["updates"]
            self.learner.pairs_trained = state["pairs_trained"]
            self.ledger = PairLedger.from_json(state["ledger"])
            self._consumed = set(self.ledger.consumed_ids)
            for version in state.get("published_versions", []):
                prefix = f"published/{version}/"
                self._published[int(version)] = {k.removeprefix(prefix): v for k, v in extra.items()
                                                 if k.startswith(prefix)}
        elif not resume and directory.checkpoints.exists():
            shutil.rmtree(directory.checkpoints)
        self._publish()

    @property
    def updates(self) -> int:
        return self.learner.updates

    @property
    def version(self) -> int:
        return self.learner.version

    @property
    def rollout_version(self) -> int:
        """The version rollouts use: `align.policy_lag` before the learner's (fewer at the start)."""
        return min(self._published) if self._published else self.version

    def rollout_state(self) -> dict[str, torch.Tensor]:
        """The decoder weights of `rollout_version`, for the rollout policy (the learner's own when no lag)."""
        return self._published.get(self.rollout_version) or self.decoder_state()

    def _publish(self) -> None:
        if not self.cfg.align.policy_lag:
            return
        if self.version not in self._published:
            self._published[self.version] = self.decoder_state()
        for version in [v for v in self._published if v < self.version - self.cfg.align.policy_lag]:
            del self._published[version]

    def update(self, batch: PreferenceBatch) -> dict[str, float]:
        """Train on one rollout's pairs unless stale or already consumed; checkpoint on schedule."""
        staleness = self.version - batch.version
        if batch.rollout_id in self._consumed:
            self.ledger.rollouts_duplicate += 1
            return {"skipped": 1.0, "duplicate": 1.0, "staleness": float(staleness)}
        self.ledger.rollouts_produced += 1
        self.ledger.pairs_produced += len(batch)
        if is_stale(batch.version, self.version, self.cfg.distributed.max_staleness):
            self.ledger.pairs_dropped_stale += len(batch)
            self._consumed.add(batch.rollout_id)
            self.ledger.consumed_ids.append(batch.rollout_id)
            return {"skipped": 1.0, "stale": 1.0, "staleness": float(staleness)}
        start = time.perf_counter()
        stats = self.learner.update(batch, torch.Generator().manual_seed(stable_int(align_seed(self.cfg), "crop", batch.rollout_id)))
        stats["update_seconds"] = time.perf_counter() - start
        self.ledger.pair_digests[batch.rollout_id] = batch_digest(batch)
        self.ledger.pairs_consumed += len(batch)
        self._consumed.add(batch.rollout_id)
        self.ledger.consumed_ids.append(batch.rollout_id)
        stats.update({k: float(v) for k, v in batch.stats.items()})
        self._publish()
        stats["staleness"] = float(staleness)
        stats["version"] = float(self.version)
        stats["rollout_version"] = float(self.rollout_version)
        stats["updates"] = float(self.updates)
        if self.updates % self.cfg.align.checkpoint_every == 0 or self.updates >= self.cfg.align.steps:
            self.checkpoint()
        return stats

    def checkpoint(self) -> Path:
        state = {"version": self.version, "updates": self.updates, "pairs_trained": self.learner.pairs_trained,
                 "ledger": self.ledger.to_json(), "published_versions": sorted(self._published)}
        # the lagged versions ride in the checkpoint's extra tensors (beside RNG states), so a resume is exact
        published = {f"published/{v}/{k}": t for v, weights in self._published.items() for k, t in weights.items()}
        return save_checkpoint(self.location.checkpoints, self.updates, self.learner.policy.decoder,
                               self.learner.optimizer, published, state)

    def publish(self) -> AlignedModel:
        """Write the whole aligned policy as `final/` (atomic rename), in the base model's layout."""
        location = self.location
        location.directory.mkdir(parents=True, exist_ok=True)
        base_meta = json.loads((base_model_location(self.cfg).directory / "model.json").read_text())
        base_meta["aligned"] = {"align": self.cfg.align.model_dump(mode="json"), "updates": self.updates,
                                "ledger": {k: v for k, v in self.ledger.to_json().items() if k != "consumed_ids"}}
        (location.directory / "model.json").write_text(json.dumps(base_meta, indent=1))
        staging = location.directory / f".final-staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        written = save_checkpoint(staging, self.updates, self.learner.policy, None, {}, {"ledger": base_meta["aligned"]})
        tmp = location.directory / f".final.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        written.rename(tmp)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(location.final, ignore_errors=True)
        tmp.rename(location.final)
        return location

    def decoder_state(self) -> dict[str, torch.Tensor]:
        return self.learner.decoder_state()


def history_row(stats: dict[str, float], pairs_per_s: float) -> dict[str, float]:
    """The per-update figures both loops keep for the training-curve plot."""
    keys = ("updates", "pairs", "loss", "reward_margin", "kept_fraction", "log_ratio_margin", "implicit_accuracy",
            "win_score", "staleness", "band_kl", "level_gap", "rollout_seconds", "score_seconds", "update_seconds")
    return {k: float(stats[k]) for k in keys if k in stats} | {"pairs_per_s": float(pairs_per_s)}


def time_breakdown(history: list[dict[str, float]], seconds: float) -> dict[str, float]:
    """Where a loop's wall `seconds` went, summed over the updates in `history`: sampling (rollout minus
    scoring), scoring as the rollout waited for it (the reward model, plus transport on Ray), learner
    updates. In-process they run one after another and `other` is the loop's remainder; on Ray the
    learner's updates overlap the next rollout, so the parts can add up to more than the wall time."""
    total = {k: sum(r.get(k, 0.0) for r in history) for k in ("rollout_seconds", "score_seconds", "update_seconds")}
    parts = {"sampling": total["rollout_seconds"] - total["score_seconds"], "scoring": total["score_seconds"],
             "update": total["update_seconds"]}
    return {k: round(v, 2) for k, v in parts.items()} | {"wall": round(seconds, 2),
                                                          "other": round(seconds - sum(parts.values()), 2)}


def fresh_pair_accuracy(history: list[dict[str, float]]) -> dict[str, float] | None:
    """The learner's implicit accuracy on the pairs of the second half of its updates, pooled by pairs.

    Each batch is scored before the learner steps on it, so these are pairs it has never trained on: above
    0.5, the policy's change so far prefers the reward's winners on new states; at 0.5, whatever moved the
    policy does not carry from one state to the next (the judge then sees side effects, not the reward)."""
    rows = [r for r in history if "implicit_accuracy" in r and r.get("pairs", 0) > 0]
    late = rows[len(rows) // 2:]
    pairs = sum(r["pairs"] for r in late)
    if not pairs:
        return None
    return {"value": sum(r["implicit_accuracy"] * r["pairs"] for r in late) / pairs, "pairs": pairs,
            "updates": len(late)}


# ------------------------------------------------------------------------------- in-process loop

def run_inprocess_alignment(
    cfg: RunConfig, resume: bool = False, progress: ProgressFn | None = None, tracker=None,  # noqa: ANN001
    stop_after: int | None = None, on_pairs: Callable[[int, PreferenceBatch], None] | None = None,
) -> tuple[AlignedModel, dict]:
    """EASPO without Ray: rollout r, then one learner update, for r = 0, 1, … until `align.steps`.

    Rollouts use the learner's version `align.policy_lag` before its current one (every `sync_every`
    updates a version), as the Ray loop's rollout actors do; with no lag, the learner's own policy.
    """
    report = progress or (lambda *a, **k: None)
    location = aligned_model_location(cfg)
    if (location.final / "state.json").is_file():
        return location, json.loads((location.directory / "model.json").read_text())["aligned"]
    device = resolve_device(cfg.align.device)
    core = LearnerCore(cfg, location, resume, device)
    reward = load_reward(cfg, device)
    prompts = load_prompts(cfg, core.vocab)
    index = core.ledger.rollouts_produced  # in-process, rollout r is produced once, in order
    # The learner's own policy rolls out when it is the version rollouts use; otherwise a copy holds that version.
    lagged = cfg.align.policy_lag > 0 or cfg.align.sync_every > 1
    rollout_policy = copy.deepcopy(core.learner.policy).requires_grad_(False) if lagged else core.learner.policy
    rollout_version = None
    started = time.monotonic()
    history: list[dict[str, float]] = []
    while core.updates < cfg.align.steps and (stop_after is None or core.updates < stop_after):
        text, _ = prompts.batch(index)
        if lagged and rollout_version != core.rollout_version:
            rollout_version = core.rollout_version
            rollout_policy.decoder.load_state_dict(core.rollout_state())
        result = timed_rollout(rollout_policy, text, cfg, reward.score, index, core.rollout_version, device)
        if on_pairs is not None:
            on_pairs(index, result.batch)
        stats = core.update(result.batch)
        index += 1
        elapsed = max(time.monotonic() - started, 1e-6)
        history.append(history_row(stats, core.ledger.pairs_produced / elapsed))
        if tracker is not None and (core.updates % cfg.align.log_every == 0):
            tracker.log_metrics({f"align/{k}": v for k, v in stats.items()} |
                                {"align/pairs_per_s": core.ledger.pairs_produced / elapsed}, step=core.updates)
        report("align EASPO (in-process)", core.updates, cfg.align.steps,
               info=f"loss {stats.get('loss', float('nan')):.4f} kept {stats.get('kept_fraction', 0):.2f}")
    seconds = time.monotonic() - started
    summary = {"updates": core.updates, "seconds": seconds, "history": history,
               "time_breakdown": time_breakdown(history, seconds),
               **{k: v for k, v in core.ledger.to_json().items() if k != "consumed_ids"}}
    if core.updates >= cfg.align.steps:
        core.publish()
    return location, summary
