"""The one place that talks to MLflow.

MLflow 3 stores runs in SQLite by default; `MLFLOW_TRACKING_URI` wins when set (a team server),
then `tracking.tracking_uri`, then `sqlite:///<output_dir>/mlflow.db` beside the run's outputs.
With `tracking.enabled=false` every call is a no-op, for quick local checks.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from rlhf_tts.config import RunConfig


def tracking_uri(cfg: RunConfig) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """A thin handle on an MLflow run (or on nothing, when tracking is off).

    With `client` given it writes to `run_id` through that client instead of the active run: how a
    stage working in a child process (the main job's background judges) logs into its parent's run
    without starting (and, on exit, ending) it.
    """

    def __init__(self, enabled: bool, run_id: str | None = None, client: Any = None) -> None:
        self.enabled = enabled
        self.run_id = run_id
        self.client = client

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        if self.client is not None:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])
            return
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.client is not None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            return
        import mlflow

        mlflow.set_tags(tags)


@contextlib.contextmanager
def tracked_run(cfg: RunConfig, run_name: str, attach_run_id: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run with the flattened config as params; yields a Tracker. With
    `attach_run_id`, log into that existing run instead (params are already there; it is not ended)."""
    tracker = Tracker(cfg.tracking.enabled)
    if not cfg.tracking.enabled:
        yield tracker
        return
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new SQLite store
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if attach_run_id:
        yield Tracker(True, attach_run_id, mlflow.MlflowClient(tracking_uri=tracking_uri(cfg)))
        return
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=run_name) as run:
        tracker.run_id = run.info.run_id
        params = _flatten(cfg.model_dump(mode="json"))
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield tracker
