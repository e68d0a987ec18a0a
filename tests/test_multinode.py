"""Placement across nodes with `ray.cluster_utils.Cluster`: a head and two worker nodes on one machine.

Only the worker nodes offer rollout slots (the custom resource `rollout_node`), and the rollout
bundles ask for one each (`distributed.rollout_resources={rollout_node: 1}`); the learner and
reward bundles ask for CPUs only. So resources decide which nodes may host what, and
`distributed.placement_strategy` decides how: SPREAD puts the two rollout actors on different
worker nodes, PACK puts every bundle on one node (a worker: the only kind with room for all).
Then a worker node is removed in the middle of a run: the bundles it held are rescheduled onto the
other nodes, Ray restarts the actors there, the work they had in flight is counted lost, and the
run completes.

The cluster runs in a child process (this file run as a script) so that token authentication
(RAY_AUTH_MODE=token, a token of its own) is set before Ray is imported, and nothing of it
outlives the test; the test asserts on the JSON that process writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import smoke_config

pytestmark = pytest.mark.slow

ROLLOUTS = ["distributed.num_rollout_actors=2", "distributed.rollout_num_cpus=0",
            "distributed.rollout_resources={rollout_node: 1}", "distributed.learner_num_cpus=0.5",
            "distributed.reward_num_cpus=0.5", "distributed.max_in_flight=1"]
STEPS = 6
REMOVE_AT = 2  # learner updates before a worker node is removed


def shared_smoke_cache(tmp_path_factory) -> Path:
    """One smoke cache for the sweep and cluster tests of a session: the first builds it, the rest reuse it."""
    return tmp_path_factory.getbasetemp() / "cluster_smoke_cache"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if text in cmdline and (entry / "stat").read_text().split()[2] != "Z":
                    found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    """Build the smoke prerequisites, then run `cluster_scenario` in a child process; its findings."""
    from rlhf_tts.run import main

    tmp = tmp_path_factory.mktemp("multinode")
    cache = shared_smoke_cache(tmp_path_factory)
    assert main(["preset=smoke", f"output_dir={tmp / 'prep'}", f"cache_dir={cache}", "tracking.enabled=false",
                 "stages=[data,pretrain,easpm]"]) == 0
    temp = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(temp),
               RAY_USAGE_STATS_ENABLED="0")
    result_file = tmp / "scenario.json"
    process = subprocess.Popen([sys.executable, __file__, str(result_file), str(tmp), str(cache)], env=env,
                               cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    finally:
        leftovers = _processes_mentioning(str(temp))
        for pid in leftovers:  # Ray processes of this scenario's cluster (their command lines name its temp dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    assert process.returncode == 0 and result_file.is_file(), output[-6000:]
    assert not leftovers, f"processes outlived the cluster: {leftovers}"
    return json.loads(result_file.read_text())


def test_token_auth_is_on_in_the_cluster(scenario):
    assert scenario["auth_mode"] == "token"


def test_rollout_bundles_spread_by_config_and_placed_by_resources(scenario):
    learner, reward, *rollouts = scenario["bundles"]["SPREAD"]
    assert {learner, reward} <= {scenario["head"], *scenario["workers"]}
    assert sorted(rollouts) == sorted(scenario["workers"])  # one per worker; never the head (no rollout slots)


def test_rollout_bundles_packed_by_config(scenario):
    where = scenario["bundles"]["PACK"]
    assert len(set(where)) == 1 and where[0] in scenario["workers"]  # all on one worker: the only fit


def test_rollout_actors_run_on_the_worker_nodes(scenario):
    assert sorted(scenario["rollout_nodes_before"]) == sorted(scenario["workers"])  # SPREAD: one per worker


def test_a_run_survives_losing_a_worker_node_and_completes(scenario):
    summary = scenario["summary"]
    survivor = next(w for w in scenario["workers"] if w != scenario["removed"])
    assert scenario["removed"] in scenario["rollout_nodes_before"]
    assert summary["nodes"]["rollout"] == [survivor, survivor]  # the lost actor came back on the other worker
    assert summary["updates"] == STEPS and scenario["published"]
    transport = summary["transport"]
    assert transport["rollout_restarts_seen"] >= 1 and transport["lost_in_flight"] >= 1, transport
    assert summary["accounting_consistent"], summary
    assert summary["learner"]["rollouts_duplicate"] == 0


# ----------------------------------------------------------------------- the child process

def cluster_scenario(result_file: Path, tmp: Path, cache: Path) -> None:
    """Head (1 CPU) + two workers (1 CPU, 2 rollout slots each); placement checks; a run losing a worker."""
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from actors.orchestrator import bundles, run_ray_alignment
    from rlhf_tts.training.align import aligned_model_location

    def cfg_for(*extra: str):  # noqa: ANN202
        return smoke_config(tmp, f"cache_dir={cache}", *ROLLOUTS, *extra)

    started = time.monotonic()
    def wait_until_released(timeout_s: float = 60.0) -> None:
        """Removing a placement group returns its resources asynchronously; the next one must see them all."""
        deadline = time.monotonic() + timeout_s
        while True:
            total, free = ray.cluster_resources(), ray.available_resources()
            if all(free.get(k, 0.0) >= total[k] for k in ("CPU", "rollout_node")) or time.monotonic() > deadline:
                return
            time.sleep(0.2)

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = {}
        for _ in range(2):
            node = nodes.add_node(num_cpus=1, resources={"rollout_node": 2})
            workers[node.node_id] = node
        nodes.wait_for_nodes()
        ray.init(address=nodes.address)
        found: dict = {"head": nodes.head_node.node_id, "workers": sorted(workers), "bundles": {},
                       "auth_mode": "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"}
        for strategy in ("SPREAD", "PACK"):
            group = placement_group(bundles(cfg_for(), gpus_available=False), strategy=strategy)
            ray.get(group.ready(), timeout=120)
            where = placement_group_table(group)["bundles_to_node_id"]
            found["bundles"][strategy] = [where[i] for i in range(len(where))]
            remove_placement_group(group)
            wait_until_released()
        found["seconds_to_cluster_and_placement"] = time.monotonic() - started

        cfg = cfg_for("distributed.placement_strategy=SPREAD", f"align.steps={STEPS}", "align.threshold=0.0",
                      "align.checkpoint_every=2", "distributed.max_staleness=3")
        shutil.rmtree(aligned_model_location(cfg).directory, ignore_errors=True)

        def remove_a_worker(updates: int, actors) -> None:  # noqa: ANN001
            if "rollout_nodes_before" not in found:
                found["rollout_nodes_before"] = ray.get([a.node_id.remote() for a in actors.rollouts], timeout=60)
            if updates >= REMOVE_AT and "removed" not in found:
                found["removed"] = found["rollout_nodes_before"][0]
                nodes.remove_node(workers.pop(found["removed"]))

        location, summary = run_ray_alignment(cfg, on_update=remove_a_worker)
        found["summary"] = summary
        found["published"] = (location.final / "state.json").is_file()
        found["seconds_total"] = time.monotonic() - started
        result_file.write_text(json.dumps(found, indent=1, default=str))
    finally:
        ray.shutdown()
        nodes.shutdown()


if __name__ == "__main__":
    cluster_scenario(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
