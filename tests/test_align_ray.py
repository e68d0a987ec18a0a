"""EASPO on a real local Ray instance: same pairs as the in-process loop, and fault tolerance.

One Ray instance per module (DESIGN: `ray.init(num_cpus=…, include_dashboard=False)`); the smoke
base model and EASPM are built once in a module-scoped cache.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import smoke_config

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

ALIGN = ["align.steps=3", "align.prompts_per_rollout=2", "align.sampler_steps=6", "align.threshold=0.0",
         "align.checkpoint_every=1", "distributed.num_rollout_actors=1", "distributed.max_in_flight=1",
         "distributed.rollout_num_cpus=1", "distributed.reward_num_cpus=0.5", "distributed.learner_num_cpus=0.5"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from rlhf_tts.run import main

    tmp = tmp_path_factory.mktemp("align_ray")
    cfg = smoke_config(tmp)
    assert main([f"output_dir={cfg.output_dir}", f"cache_dir={cfg.cache_dir}", "preset=smoke",
                 "tracking.enabled=false", "stages=[data,pretrain,easpm]"]) == 0
    ray.init(num_cpus=3, include_dashboard=False)
    yield tmp
    ray.shutdown()


def _cfg(tmp, *extra):
    return smoke_config(tmp, *ALIGN, *extra)


# Windowed pools travel packed (actors/wire.py): the pairs must still be the in-process loop's, bit for bit.
WINDOWED = ("align.objective=pool_matched", "align.candidate_window=true", "align.learner_crop_frames=8")


@pytest.mark.parametrize("extra", [(), WINDOWED], ids=["whole", "windowed-packed"])
def test_ray_loop_with_one_rollout_actor_reproduces_the_in_process_pairs(prepared, extra):
    from actors.orchestrator import run_ray_alignment
    from actors.wire import PackedPreferenceBatch, pack_batch
    from rlhf_tts.training.align import LearnerCore, aligned_model_location, run_inprocess_alignment

    cfg = _cfg(prepared, *extra)
    location = aligned_model_location(cfg)
    shutil.rmtree(location.directory, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run single-threaded; float sums must be ordered the same
    packs = []
    try:
        _, local = run_inprocess_alignment(cfg, on_pairs=lambda _, batch: packs.append(
            isinstance(pack_batch(batch), PackedPreferenceBatch)))
    finally:
        torch.set_num_threads(threads)
    assert packs == [bool(extra)] * 3  # the windowed run's batches do travel packed
    local_core = LearnerCore(cfg, location, resume=True)
    local_digests = dict(local_core.ledger.pair_digests)
    local_weights = {k: v.clone() for k, v in local_core.learner.policy.decoder.state_dict().items()}
    assert local["pairs_consumed"] > 0 and len(local_digests) == 3

    shutil.rmtree(location.directory)
    _, remote = run_ray_alignment(cfg)
    ray_core = LearnerCore(cfg, location, resume=True)
    assert ray_core.ledger.pair_digests == local_digests  # identical pairs, rollout by rollout
    for name, value in ray_core.learner.policy.decoder.state_dict().items():
        assert torch.equal(value, local_weights[name]), name
    assert remote["accounting_consistent"] and remote["transport"]["lost_in_flight"] == 0
    # where each loop's time went: every update's rollout, its wait for scores and the update are timed
    for summary in (local, remote):
        rows = summary["history"]
        assert len(rows) == 3 and all(r["rollout_seconds"] > r["score_seconds"] > 0 and r["update_seconds"] > 0
                                      for r in rows)
        parts = summary["time_breakdown"]
        assert parts["scoring"] == pytest.approx(sum(r["score_seconds"] for r in rows), abs=0.01)
        assert parts["sampling"] + parts["scoring"] + parts["update"] + parts["other"] == pytest.approx(
            summary["seconds"], abs=0.03)
    # in-process the three run one after another and fill the loop's time
    assert 0 <= local["time_breakdown"]["other"] < 0.2 * local["seconds"]


def test_one_version_of_lag_in_either_loop_trains_on_the_pairs_of_two_rollouts_in_flight(prepared):
    """`align.policy_lag=1` with one rollout in flight (the tiny preset's schedule) reproduces the pairs and
    weights of two rollouts in flight without lag, in-process and on Ray, and a lagged in-process run
    stopped after two updates resumes to them exactly: one cache key for all of them is right. Without
    lag the pairs differ from the second rollout on."""
    from actors.orchestrator import run_ray_alignment
    from rlhf_tts.training.align import LearnerCore, aligned_model_location, run_inprocess_alignment

    four = ("align.steps=4",)
    overlapped = _cfg(prepared, *four, "distributed.max_in_flight=2")
    lagged = _cfg(prepared, *four, "align.policy_lag=1")
    location = aligned_model_location(overlapped)
    assert aligned_model_location(lagged) == location

    def trained() -> tuple[dict, dict]:
        core = LearnerCore(overlapped, location, resume=True)
        return (dict(core.ledger.pair_digests),
                {k: v.clone() for k, v in core.learner.policy.decoder.state_dict().items()})

    runs = {}
    shutil.rmtree(location.directory, ignore_errors=True)
    niceness = []
    _, summary = run_ray_alignment(overlapped, on_update=lambda updates, actors: niceness.append(
        os.getpriority(os.PRIO_PROCESS, ray.get(actors.learner.pid.remote()))))
    assert set(niceness) == {overlapped.distributed.actor_niceness} == {0}  # not Ray's default 15
    assert [r["staleness"] for r in summary["history"]] == [0.0, 1.0, 1.0, 1.0]
    runs["Ray, two in flight"] = trained()
    shutil.rmtree(location.directory)
    _, summary = run_ray_alignment(lagged)
    assert [r["staleness"] for r in summary["history"]] == [0.0, 1.0, 1.0, 1.0]
    runs["Ray, one in flight, lag 1"] = trained()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run single-threaded; float sums must be ordered the same
    try:
        shutil.rmtree(location.directory)
        run_inprocess_alignment(lagged)
        runs["in-process, lag 1"] = trained()
        shutil.rmtree(location.directory)
        run_inprocess_alignment(lagged, stop_after=2)  # checkpoint_every=1: killed after update 2
        run_inprocess_alignment(lagged, resume=True)
        runs["in-process, lag 1, resumed"] = trained()
        unlagged = _cfg(prepared, *four)
        shutil.rmtree(aligned_model_location(unlagged).directory, ignore_errors=True)
        run_inprocess_alignment(unlagged)
        no_lag = dict(LearnerCore(unlagged, aligned_model_location(unlagged), resume=True).ledger.pair_digests)
    finally:
        torch.set_num_threads(threads)
    digests, weights = runs.pop("Ray, two in flight")
    assert len(digests) == 4
    for name, (other_digests, other_weights) in runs.items():
        assert other_digests == digests, name
        assert all(torch.equal(other_weights[k], v) for k, v in weights.items()), name
    assert no_lag["r0"] == digests["r0"] and no_lag["r1"] != digests["r1"]


def test_weights_broadcast_every_second_update_give_the_same_pairs_in_either_loop(prepared):
    """`align.sync_every=2`: rollouts keep a version for two updates, through the in-process loop's rollout
    copy and through the Ray loop's broadcasts alike; the pairs differ from syncing every update."""
    from actors.orchestrator import run_ray_alignment
    from rlhf_tts.training.align import LearnerCore, aligned_model_location, run_inprocess_alignment

    def trained(cfg) -> tuple[dict, dict]:  # noqa: ANN001
        core = LearnerCore(cfg, aligned_model_location(cfg), resume=True)
        return (dict(core.ledger.pair_digests),
                {k: v.clone() for k, v in core.learner.policy.decoder.state_dict().items()})

    every_second = _cfg(prepared, "align.steps=4", "align.sync_every=2")
    every = _cfg(prepared, "align.steps=4")
    location = aligned_model_location(every_second)
    shutil.rmtree(location.directory, ignore_errors=True)
    run_ray_alignment(every_second)
    ray_digests, ray_weights = trained(every_second)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run single-threaded; float sums must be ordered the same
    try:
        shutil.rmtree(location.directory)
        run_inprocess_alignment(every_second)
        local_digests, local_weights = trained(every_second)
        shutil.rmtree(aligned_model_location(every).directory, ignore_errors=True)
        run_inprocess_alignment(every)
        every_digests, _ = trained(every)
    finally:
        torch.set_num_threads(threads)
    assert len(ray_digests) == 4 and ray_digests == local_digests
    assert all(torch.equal(local_weights[k], v) for k, v in ray_weights.items())
    assert every_digests["r0"] == ray_digests["r0"] and every_digests["r1"] != ray_digests["r1"]  # r1: still version 0


def test_killing_rollout_reward_and_learner_actors_mid_run(prepared):
    from actors.orchestrator import run_ray_alignment
    from rlhf_tts.training.align import aligned_model_location

    steps = 9
    cfg = _cfg(prepared, f"align.steps={steps}", "align.checkpoint_every=2", "distributed.max_in_flight=2",
               "distributed.max_staleness=3")
    shutil.rmtree(aligned_model_location(cfg).directory, ignore_errors=True)
    killed = []

    def chaos(updates, actors):
        if updates == 2 and "rollout" not in killed:
            killed.append("rollout")
            ray.kill(actors.rollouts[0], no_restart=False)
        elif updates == 4 and "reward" not in killed:
            killed.append("reward")
            ray.kill(actors.reward, no_restart=False)
        elif updates == 7 and "learner" not in killed:
            killed.append("learner")
            ray.kill(actors.learner, no_restart=False)

    location, summary = run_ray_alignment(cfg, on_update=chaos)
    assert killed == ["rollout", "reward", "learner"]
    assert summary["updates"] == steps
    assert (location.final / "state.json").is_file()
    t, learner = summary["transport"], summary["learner"]
    assert summary["accounting_consistent"], summary
    assert t["lost_in_flight"] >= 1  # the killed rollout actor's in-flight work
    assert t["learner_restarts_seen"] + t["lost_in_learner"] >= 1
    assert learner["rollouts_duplicate"] == 0
    # the learner resumed from its checkpoint at update 6: update 7 was rolled back and redone with new data
    assert t["rolled_back"] + t["lost_in_learner"] >= 1


def test_unplaceable_names_what_cannot_be_placed():
    from actors.orchestrator import unplaceable

    two_nodes = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert unplaceable([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}], "PACK", two_nodes) is None
    assert "bundle {'CPU': 3.0}" in unplaceable([{"CPU": 3.0}], "PACK", two_nodes)
    assert "in all" in unplaceable([{"CPU": 2.0}] * 3, "PACK", two_nodes)
    assert "STRICT_PACK" in unplaceable([{"CPU": 1.0}] * 3, "STRICT_PACK", two_nodes)
    assert "3 nodes" in unplaceable([{"CPU": 0.5}] * 3, "STRICT_SPREAD", two_nodes)
    assert unplaceable([{"CPU": 1.0, "GPU": 0.5}] * 2, "PACK", two_nodes) is None
    assert "GPU" in unplaceable([{"CPU": 1.0, "GPU": 1.0}] * 2, "PACK", two_nodes)
    assert "rollout_node" in unplaceable([{"CPU": 1.0, "rollout_node": 1.0}], "PACK", two_nodes)


def test_a_local_instance_too_small_for_the_actors_fails_at_once(prepared):
    """The module's instance has 3 CPUs; learner 1 + reward 1 + rollout 2 cannot fit. It used to wait
    (10 minutes) on a placement group that could never be granted; now it says why, at once."""
    import time

    from actors.orchestrator import run_ray_alignment
    from rlhf_tts.errors import InputError

    from rlhf_tts.training.align import aligned_model_location

    cfg = _cfg(prepared, "distributed.rollout_num_cpus=2", "distributed.reward_num_cpus=1",
               "distributed.learner_num_cpus=1")
    shutil.rmtree(aligned_model_location(cfg).directory, ignore_errors=True)  # else the cached model returns at once
    started = time.monotonic()
    with pytest.raises(InputError, match="need .*CPU.* 4.0"):
        run_ray_alignment(cfg)
    assert time.monotonic() - started < 30
    assert not ray.util.placement_group_table() or all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
