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
    """A thin handle on the active MLflow run (or on nothing, when tracking is off)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)


@contextlib.contextmanager
def tracked_run(cfg: RunConfig, run_name: str) -> Iterator[Tracker]:
    """Open an MLflow run with the flattened config as params; yields a Tracker."""
    tracker = Tracker(cfg.tracking.enabled)
    if not cfg.tracking.enabled:
        yield tracker
        return
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new SQLite store
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=run_name) as run:
        tracker.run_id = run.info.run_id
        params = _flatten(cfg.model_dump(mode="json"))
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield tracker
