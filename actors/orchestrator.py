"""The Ray EASPO loop: rollout actors → reward actor → learner actor, with weight broadcast,
bounded in-flight rollouts, staleness, fault tolerance and pair accounting.

Transport only. The driver holds object refs: a rollout returns two objects, a small stats dict the
driver reads and the `PreferenceBatch` it passes straight to the learner by ref. The decoder
weights rollouts use (the learner's, `align.policy_lag` versions back) are fetched into the object
store once per version and the same ref is sent to every rollout actor.

Failures: a rollout or reward actor that dies is restarted by Ray (`max_restarts`); its in-flight
rollouts are counted `lost_in_flight`, and a restarted rollout actor is resent the current weights
before its next rollout (actor calls run in order). A learner that dies is restarted with
`resume=True` and comes back at its last checkpoint: rollouts it had trained on since then are
counted `rolled_back` and not sent again, so no rollout is ever trained on twice.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, ObjectLostError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import LearnerActor
from actors.reward import RewardActor
from actors.rollout import RolloutActor
from rlhf_tts.config import RunConfig
from rlhf_tts.errors import InputError
from rlhf_tts.training.align import AlignedModel, aligned_model_location, history_row, time_breakdown

ProgressFn = Callable[..., None]


@dataclass
class TransportLedger:
    """What happened to every dispatched rollout, on the driver's side."""

    dispatched: int = 0
    completed: int = 0
    lost_in_flight: int = 0
    lost_in_learner: int = 0
    rolled_back: int = 0
    discarded_at_end: int = 0
    rollout_restarts_seen: int = 0
    learner_restarts_seen: int = 0
    sent_to_learner: list[str] = field(default_factory=list)


def connect(cfg: RunConfig) -> bool:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local instance.

    Returns True when this call started Ray (and so should shut it down). Token authentication is
    Ray's default for local clusters in 2.60 and is left on.
    """
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return True
    needed = _bundle_cpus(cfg)
    num_cpus = cfg.distributed.local_num_cpus or max(os.cpu_count() or 1, int(sum(needed) + 0.999))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def _bundle_cpus(cfg: RunConfig) -> list[float]:
    d = cfg.distributed
    return [d.learner_num_cpus, d.reward_num_cpus] + [d.rollout_num_cpus] * d.num_rollout_actors


def bundles(cfg: RunConfig, gpus_available: bool) -> list[dict[str, float]]:
    """Placement-group bundles: learner, reward, then one per rollout actor (GPU only where there are GPUs)."""
    d = cfg.distributed

    def bundle(cpus: float, gpus: float, extra: dict[str, float] | None = None) -> dict[str, float]:
        out = {"CPU": cpus} if cpus else {}
        if gpus and gpus_available:
            out["GPU"] = gpus
        out.update(extra or {})
        return out or {"CPU": 0.01}

    return ([bundle(d.learner_num_cpus, d.learner_num_gpus, d.learner_resources),
             bundle(d.reward_num_cpus, d.reward_num_gpus, d.reward_resources)]
            + [bundle(d.rollout_num_cpus, d.rollout_num_gpus, d.rollout_resources)] * d.num_rollout_actors)


def unplaceable(specs: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> str | None:
    """Why `specs` can never be placed on nodes with these total resources, or None.

    Necessary conditions only (no false alarms): every bundle fits some node; STRICT_PACK: all of
    them fit one node; STRICT_SPREAD: there are as many nodes as bundles; otherwise the cluster's
    totals cover the sum.
    """
    def fits(need: dict[str, float], node: dict[str, float]) -> bool:
        return all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items())

    total = {k: sum(n.get(k, 0.0) for n in nodes) for n in nodes for k in n}
    for spec in specs:
        if not any(fits(spec, n) for n in nodes):
            return f"no node has the resources of bundle {spec} (nodes: {nodes})"
    needed: dict[str, float] = {}
    for spec in specs:
        for k, v in spec.items():
            needed[k] = needed.get(k, 0.0) + v
    if strategy == "STRICT_PACK" and not any(fits(needed, n) for n in nodes):
        return f"STRICT_PACK needs {needed} on one node (nodes: {nodes})"
    if strategy == "STRICT_SPREAD" and len(nodes) < len(specs):
        return f"STRICT_SPREAD needs {len(specs)} nodes, the cluster has {len(nodes)}"
    if not fits(needed, total):
        return f"the actors need {needed} in all, the cluster has {total}"
    return None


@dataclass
class Actors:
    learner: ray.actor.ActorHandle
    reward: ray.actor.ActorHandle
    rollouts: list[ray.actor.ActorHandle]
    placement: object
    owns_placement: bool = True  # False inside a Tune trial: the trial's group is Tune's to remove


def start_actors(cfg: RunConfig, resume: bool, placement: tuple[object, int] | None = None) -> Actors:
    """Start learner, reward and rollout actors, one per bundle of `bundles(cfg)`.

    `placement=(group, first)` puts them in an existing placement group whose bundles `first`,
    `first + 1`, … are `bundles(cfg)` (a Tune trial's group: bundle 0 is the trial's own process);
    otherwise a group of its own is created with `distributed.placement_strategy`.
    """
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    specs = bundles(cfg, gpus)
    if placement is None:
        strategy = cfg.distributed.placement_strategy
        reason = unplaceable(specs, strategy, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        if reason and not os.environ.get("RAY_ADDRESS"):
            # A local instance gains no nodes: waiting would hang for nothing.
            raise InputError(f"distributed: {reason}; lower distributed.*_num_cpus / *_num_gpus or "
                             "num_rollout_actors, or start Ray with more resources")
        if reason:  # a cluster may be autoscaling (KubeRay): say why it waits, then wait
            print(f"waiting up to {cfg.distributed.placement_timeout_s:.0f} s for the cluster to grow: {reason}",
                  flush=True)
        pg, first = placement_group(specs, strategy=strategy), 0
        try:
            ray.get(pg.ready(), timeout=cfg.distributed.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise InputError(f"distributed: the cluster did not grant the actors' placement group {specs} "
                             f"({strategy}) within {cfg.distributed.placement_timeout_s:.0f} s; cluster has "
                             f"{ray.cluster_resources()}") from None
    else:
        pg, first = placement
        ray.get(pg.ready(), timeout=cfg.distributed.placement_timeout_s)
    cfg_json = cfg.model_dump(mode="json")

    def at(i: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=first + i)

    # Ray starts workers at niceness 15 unless told otherwise (its job supervisor tells itself 0 the same way).
    niceness = {"env_vars": {"RAY_worker_niceness": str(cfg.distributed.actor_niceness)}}

    def resources(i: int) -> dict:
        spec = specs[i]
        custom = {k: v for k, v in spec.items() if k not in ("CPU", "GPU")}
        return {"num_cpus": spec.get("CPU", 0), "num_gpus": spec.get("GPU", 0), "resources": custom,
                "runtime_env": niceness}

    d = cfg.distributed
    learner = LearnerActor.options(max_restarts=d.max_restarts, scheduling_strategy=at(0), **resources(0)).remote(
        cfg_json, resume)
    # Rollout actors find the reward actor by a name unique to this run, not by a handle among their
    # constructor arguments: a handle argument lives in the object store, and Ray cannot restart an actor
    # whose constructor arguments were evicted there (ray-project/ray#53727).
    reward_name = f"rlhf_tts-reward-{uuid.uuid4().hex[:12]}"
    reward = RewardActor.options(name=reward_name, max_restarts=d.max_restarts, max_concurrency=1000,
                                 scheduling_strategy=at(1), **resources(1)).remote(cfg_json)
    rollouts = [RolloutActor.options(max_restarts=d.max_restarts, scheduling_strategy=at(2 + i),
                                     **resources(2 + i)).remote(cfg_json, reward_name, i)
                for i in range(d.num_rollout_actors)]
    return Actors(learner, reward, rollouts, pg, owns_placement=placement is None)


def _wait_alive(handle, method: str = "ping", timeout_s: float = 300.0):  # noqa: ANN001, ANN202
    """Call `method` until the (restarting) actor answers; an actor whose constructor raised (a missing
    base model or EASPM, no GPU) fails at once with its error instead of being waited on."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(getattr(handle, method).remote(), timeout=30)
        except ActorDiedError as err:
            if getattr(err, "actor_init_failed", False) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        except (RayActorError, GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_ray_alignment(
    cfg: RunConfig, resume: bool = False, progress: ProgressFn | None = None, tracker=None,  # noqa: ANN001
    on_update: Callable[[int, Actors], None] | None = None, placement: tuple[object, int] | None = None,
) -> tuple[AlignedModel, dict]:
    """Run EASPO on Ray until the learner has made `align.steps` updates; publish the aligned model.

    `on_update(updates, actors)` is called after each learner update (tests use it to kill actors;
    Tune trials report from it). `placement`: see `start_actors`.
    """
    import json

    report = progress or (lambda *a, **k: None)
    location = aligned_model_location(cfg)
    if (location.final / "state.json").is_file():
        return location, json.loads((location.directory / "model.json").read_text())["aligned"]
    started_ray = connect(cfg)
    try:
        actors = start_actors(cfg, resume, placement)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    ledger = TransportLedger()
    try:
        summary = _loop(cfg, actors, ledger, report, tracker, on_update)
        ray.get(actors.learner.publish.remote())
        summary["reward_batching"] = ray.get(actors.reward.stats.remote())
        summary["nodes"] = {"rollout": ray.get([a.node_id.remote() for a in actors.rollouts])}
        return location, summary
    finally:
        for handle in [actors.learner, actors.reward, *actors.rollouts]:
            ray.kill(handle, no_restart=True)
        if actors.owns_placement:
            remove_placement_group(actors.placement)
        if started_ray:
            ray.shutdown()


def _loop(cfg: RunConfig, actors: Actors, ledger: TransportLedger, report: ProgressFn, tracker,  # noqa: ANN001
          on_update: Callable[[int, Actors], None] | None) -> dict:
    d = cfg.distributed
    status = _wait_alive(actors.learner, "status")
    # Every actor loads its models before the clock starts: a constructor that fails (a missing
    # EASPM, a GPU that is not there) fails the run here, and throughput excludes start-up.
    _wait_alive(actors.reward)
    for actor in actors.rollouts:
        _wait_alive(actor)
    consumed = status["consumed_ids"]
    next_index = 1 + max((int(r[1:]) for r in consumed), default=-1)
    version = status["rollout_version"]  # the version rollout actors run (`align.policy_lag` behind the learner)
    updates = status["updates"]
    initial_rollouts = status["ledger"]["rollouts_produced"]  # from an earlier run, when resuming
    learner_incarnation = status["incarnation"]
    weights = actors.learner.rollout_weights.remote()  # one object, shared by every rollout actor
    for actor in actors.rollouts:
        actor.set_weights.remote(version, weights)
    in_flight: dict[ray.ObjectRef, tuple[int, int, ray.ObjectRef]] = {}  # stats ref → (actor, index, batch ref)
    per_actor = [0] * len(actors.rollouts)
    started = time.monotonic()
    pairs_seen = 0
    history: list[dict[str, float]] = []
    while updates < cfg.align.steps:
        for i, actor in enumerate(actors.rollouts):
            while per_actor[i] < d.max_in_flight:
                stats_ref, batch_ref = actor.run_with_stats.remote(next_index)
                in_flight[stats_ref] = (i, next_index, batch_ref)
                per_actor[i] += 1
                next_index += 1
                ledger.dispatched += 1
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        stats_ref = ready[0]
        i, index, batch_ref = in_flight.pop(stats_ref)
        per_actor[i] -= 1
        try:
            rollout_stats = ray.get(stats_ref)
        except (RayActorError, RayTaskError) as err:
            ledger.lost_in_flight += 1
            if isinstance(err, RayActorError):  # the rollout actor itself died: Ray restarts it from the base
                ledger.rollout_restarts_seen += 1
            actors.rollouts[i].set_weights.remote(version, weights)
            continue
        ledger.completed += 1
        pairs_seen += int(rollout_stats["pairs_kept"])
        try:
            incarnation, stats = ray.get(actors.learner.update.remote(batch_ref))
        except RayActorError:  # the learner died during this update
            ledger.lost_in_learner += 1
            incarnation, stats = None, None
        except ObjectLostError:
            # The batch lived in the object store of a node that died (multi-node) before the learner
            # fetched it: the learner never saw it, so it counts as lost in flight, not completed.
            ledger.completed -= 1
            ledger.lost_in_flight += 1
            continue
        if incarnation != learner_incarnation:
            # The learner restarted from its checkpoint: what it trained on since then is rolled back.
            ledger.learner_restarts_seen += 1
            status = _wait_alive(actors.learner, "status")
            learner_incarnation = status["incarnation"]
            restored = set(status["consumed_ids"])
            if stats is not None:
                ledger.sent_to_learner.append(f"r{index}")
            elif f"r{index}" in restored:  # it died after checkpointing this very update
                ledger.lost_in_learner -= 1
                ledger.sent_to_learner.append(f"r{index}")
            ledger.rolled_back += sum(1 for r in ledger.sent_to_learner if r not in restored)
            ledger.sent_to_learner = [r for r in ledger.sent_to_learner if r in restored]
            updates, version = status["updates"], status["rollout_version"]
            weights = actors.learner.rollout_weights.remote()
            for actor in actors.rollouts:
                actor.set_weights.remote(version, weights)
            continue
        ledger.sent_to_learner.append(f"r{index}")
        updates = int(stats.get("updates", updates))
        if stats.get("skipped"):
            report("align EASPO (Ray)", updates, cfg.align.steps, info="dropped a stale batch")
            continue
        if int(stats["rollout_version"]) != version:
            version = int(stats["rollout_version"])
            weights = actors.learner.rollout_weights.remote()
            for actor in actors.rollouts:
                actor.set_weights.remote(version, weights)
        elapsed = max(time.monotonic() - started, 1e-6)
        history.append(history_row(stats, pairs_seen / elapsed))
        if tracker is not None and updates % cfg.align.log_every == 0:
            tracker.log_metrics({f"align/{k}": float(v) for k, v in stats.items()}
                                | {"align/pairs_per_s": pairs_seen / elapsed,
                                   "align/rollouts_lost_in_flight": ledger.lost_in_flight}, step=updates)
        report("align EASPO (Ray)", updates, cfg.align.steps,
               info=f"loss {stats.get('loss', float('nan')):.4f} kept {stats.get('kept_fraction', 0):.2f} "
                    f"stale {stats.get('staleness', 0):.0f}")
        if on_update is not None:
            on_update(updates, actors)
    ledger.discarded_at_end = len(in_flight)
    final = _wait_alive(actors.learner, "status")
    seconds = time.monotonic() - started
    summary = {"updates": final["updates"], "seconds": seconds, "pairs_kept_seen": pairs_seen,
               "learner_rollouts_before": initial_rollouts, "history": history,
               "time_breakdown": time_breakdown(history, seconds),
               "learner": final["ledger"], "transport": {k: v for k, v in asdict(ledger).items() if k != "sent_to_learner"}}
    summary["accounting_consistent"] = accounting_consistent(summary)
    return summary


def accounting_consistent(summary: dict) -> bool:
    """Every dispatched rollout is accounted exactly once, and the learner's counts match the driver's."""
    t, learner = summary["transport"], summary["learner"]
    driver_side = t["dispatched"] == t["completed"] + t["lost_in_flight"] + t["discarded_at_end"]
    learner_side = (t["completed"] == learner["rollouts_produced"] - summary["learner_rollouts_before"]
                    + t["lost_in_learner"] + t["rolled_back"])
    return driver_side and learner_side and learner["rollouts_duplicate"] == 0


