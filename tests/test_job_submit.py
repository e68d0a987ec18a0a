"""`ray job submit` to a local `ray start --head`, with Ray's token authentication on.

The head is started with `--block` in a child process of the test and stopped by signalling that
process (which stops every process it started): `ray stop` would stop every Ray instance on the
machine, including ones this test did not start. Its temp dir, token and ports are the test's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD_PORT = 8265  # the documented address; another free port only if something else holds it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def shared_smoke_cache(tmp_path_factory) -> Path:
    """One smoke cache for the sweep and cluster tests of a session: the first builds it, the rest reuse it."""
    return tmp_path_factory.getbasetemp() / "cluster_smoke_cache"


def _get(url: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local head node: dashboard on 127.0.0.1, token auth with a token of its own, killed afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="rjs-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    token_file = temp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    dashboard = DASHBOARD_PORT if port_is_free(DASHBOARD_PORT) else free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_TMPDIR=str(temp),
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
               "--num-cpus=3", f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"]
    log = open(temp / "ray_start.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp,
                               start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                status, _ = _get(f"{address}/api/version", token)
                if status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up: {(temp / 'ray_start.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "token": token, "env": env, "temp": temp,
               "cache": shared_smoke_cache(tmp_path_factory)}
    finally:
        process.send_signal(signal.SIGTERM)  # `ray start --block` stops every process it started on SIGTERM
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: only what this test started
            process.wait(timeout=30)
        log.close()
        leftovers = _processes_under(temp)
        for pid in leftovers:  # started by this head (their command line names its temp dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftovers, f"processes outlived the head: {leftovers}"


def _processes_under(temp: Path) -> list[int]:
    """Live processes whose command line mentions `temp` (the head's own temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if str(temp) in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_dashboard_is_local_and_requires_the_token(head):
    status, body = _get(f"{head['address']}/api/authentication_mode", None)
    assert status == 200 and json.loads(body)["authentication_mode"] == "token"
    assert _get(f"{head['address']}/api/jobs/", None)[0] == 401
    assert _get(f"{head['address']}/api/jobs/", "not-the-token")[0] == 403
    assert _get(f"{head['address']}/api/jobs/", head["token"])[0] == 200
    # Bound to loopback only: the kernel's table of listening sockets, and the machine's own address.
    port = int(head["address"].rsplit(":", 1)[1])
    assert _listening_addresses(port) == {"127.0.0.1"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it picks the outgoing interface
        own = probe.getsockname()[0]
    if own != "127.0.0.1":
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((own, port)) != 0, f"dashboard reachable on {own}"


def _listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a socket listening on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    raw = bytes.fromhex(address)
                    if width == 8:
                        found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                    else:  # four little-endian 32-bit words
                        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_ray_job_submit_runs_the_main_job_and_logs_to_mlflow(head, tmp_path):
    out = tmp_path / "job_out"
    # The whole smoke main job, exactly as a user submits it (every stage; align runs the actors).
    runtime_env = {"env_vars": {"RLHF_TTS_CACHE_DIR": str(head["cache"])}}
    submission = f"rlhf-tts-smoke-{secrets.token_hex(4)}"
    # `ray job submit` authenticates with RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN_PATH
    # (or RAY_AUTH_TOKEN); without them the dashboard answers 401.
    denied = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", head["address"]],
        env={k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH",)} | {"RAY_AUTH_MODE": "disabled"},
        capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and ("401" in denied.stdout + denied.stderr
                                       or "Authentication" in denied.stdout + denied.stderr)
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", submission,
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "rlhf_tts.run", "preset=smoke", f"output_dir={out}"],
        env=head["env"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-4000:]
    assert f"Job '{submission}' succeeded" in logs, logs[-4000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", head["address"], submission],
                            env=head["env"], capture_output=True, text=True, timeout=120)
    assert "succeeded" in (status.stdout + status.stderr).lower()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_name for r in runs] == ["run-smoke"], runs
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.params["preset"] == "smoke" and run.data.params["cache_dir"] == str(head["cache"])
    assert (out / "manifest.parquet").is_file() and (out / "config.yaml").is_file()
    # The align stage ran its actors on this cluster: the job's driver joined it (RAY_ADDRESS) instead
    # of starting a Ray of its own.
    assert "Connecting to existing Ray cluster" in logs
    summary = json.loads((out / "align_summary.json").read_text())
    assert summary["accounting_consistent"] and summary["updates"] == int(run.data.params["align.steps"])
    assert (out / "evaluate" / "report.json").is_file()  # the last stage ran too
