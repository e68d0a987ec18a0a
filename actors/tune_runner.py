"""Ray Tune sweeps over the alignment stage (`python -m rlhf_tts.tune`; the CLI is rlhf_tts/tune.py).

The driver builds the shared prerequisites once (data, base model, EASPM, judges: the stages before
`align`), then runs one Tune trial per point of the search space. A trial is the Ray EASPO loop of
`actors.orchestrator`, with its learner, reward and rollout actors inside the trial's own placement
group (a `PlacementGroupFactory` of `[trial process] + orchestrator.bundles(cfg)`), so Tune admits a
trial only when all its actors fit and never lets two trials fight over one GPU. Every
`report_every` learner updates the trial checkpoints the learner, scores the current policy with the
configured metric function (default: the emotion judge's Emo SIM on a validation subset) and calls
`tune.report` with the metrics and the learner checkpoint; ASHA stops weak trials on that metric.

Each trial aligns into its own cache folder whose other entries link to the shared cache, so trials
with equal align configs (grid repeats) never write into one folder; the best trial's aligned
model is copied into the shared cache afterwards, so `rlhf_tts.run --config best_config.yaml` reuses
it. MLflow: one parent run per sweep (prerequisite stages, best config) and one child run per trial,
tagged with the parent's id, reopened when a trial or the sweep resumes. The experiment name and
storage path are fixed by the space file and output_dir, so `--resume` finds them (`Tuner.restore`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import tune

from rlhf_tts.config import ALL_STAGES, IMPLEMENTED_STAGES, RunConfig, to_yaml
from rlhf_tts.tracking import Tracker, tracking_uri
from rlhf_tts.tune_space import Distribution, SearchSpace

#: Stages the trials share: built once by the driver before the first trial starts.
PREREQUISITE_STAGES = ("data", "pretrain", "easpm", "judges")
SHARED_ALIGN = "align"  # the one cache entry each trial keeps to itself
TAG_SWEEP = "rlhf_tts.sweep"
TAG_TRIAL = "rlhf_tts.tune.trial_id"
TAG_PARENT = "mlflow.parentRunId"  # what MLflow's UI nests child runs by
TAG_ENDED = "rlhf_tts.tune.ended"  # why a trial's run ended early
STOPPED_EARLY = "stopped early by the scheduler"


# ------------------------------------------------------------------------------------ space → Tune

def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def encoded_keys(space: SearchSpace) -> set[str]:
    """Keys whose discrete values are not scalars (e.g. t_range): Tune and Optuna see them as JSON strings."""
    return {k for k, d in space.space.items() if d.kind in ("grid", "choice") and not all(map(_scalar, d.values))}


def to_tune(dist: Distribution, encode: bool) -> Any:
    values = [json.dumps(v) for v in dist.values] if encode else list(dist.values)
    if dist.kind == "grid":
        return tune.grid_search(values)
    if dist.kind == "choice":
        return tune.choice(values)
    if dist.kind == "uniform":
        return tune.uniform(*dist.values)
    return tune.loguniform(*dist.values)


def param_space(space: SearchSpace) -> dict[str, Any]:
    encode = encoded_keys(space)
    return {key: to_tune(dist, key in encode) for key, dist in space.space.items()}


def decode(space: SearchSpace, config: dict[str, Any]) -> dict[str, Any]:
    """A trial's Tune config back to config values (JSON-encoded non-scalars decoded)."""
    encode = encoded_keys(space)
    return {k: (json.loads(v) if k in encode else v) for k, v in config.items() if k in space.space}


# ----------------------------------------------------------------------------------- placement

def gpus_in_cluster() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def trial_resources(space: SearchSpace, gpus: bool) -> Callable[[dict], tune.PlacementGroupFactory]:
    """Per-trial placement: bundle 0 is the trial process, then the orchestrator's own bundles
    (learner, reward, one per rollout actor), sized from the trial's resolved config."""
    from actors.orchestrator import bundles

    settings = space.settings

    def resources(config: dict) -> tune.PlacementGroupFactory:
        cfg = space.resolve(decode(space, config))
        head = {"CPU": settings.trial_cpus}
        if gpus and settings.trial_gpus:
            head["GPU"] = settings.trial_gpus
        return tune.PlacementGroupFactory([head, *bundles(cfg, gpus)], strategy=cfg.distributed.placement_strategy)

    return resources


# ----------------------------------------------------------------------------------- MLflow runs

@contextlib.contextmanager
def mlflow_run(cfg: RunConfig, run_name: str, tags: dict[str, str], run_id: str | None = None,
               find: dict[str, str] | None = None) -> Iterator[Tracker]:
    """Open (or reopen: `run_id`, or the run whose tags match `find`) an MLflow run; yield a Tracker.

    Like `rlhf_tts.tracking.tracked_run`, plus parent/child tags and reopening, which a resumed
    sweep or trial needs. A new run gets the flattened config as params.
    """
    tracker = Tracker(cfg.tracking.enabled)
    if not cfg.tracking.enabled:
        yield tracker
        return
    import logging

    import mlflow

    from rlhf_tts.tracking import _flatten

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    if run_id is None and find:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in find.items())
        found = mlflow.search_runs(filter_string=query, output_format="list", max_results=1)
        run_id = found[0].info.run_id if found else None
    new = run_id is None
    run = mlflow.start_run(run_id=run_id, run_name=run_name if new else None, tags=tags if new else None)
    status = "FAILED"
    try:
        tracker.run_id = run.info.run_id
        if new:
            params = _flatten(cfg.model_dump(mode="json"))
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield tracker
        status = "FINISHED"
    except SystemExit as stop:
        # What `tune.report` raises when the scheduler stops the trial (ASHA): not a failure.
        if not stop.code:
            mlflow.set_tag(TAG_ENDED, STOPPED_EARLY)
            status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


# ------------------------------------------------------------------------------------ the trial

@dataclass(frozen=True)
class SweepPaths:
    """Where a sweep keeps its state; all fixed by output_dir and the space's name."""

    output_dir: Path
    name: str
    storage: Path

    @property
    def directory(self) -> Path:
        return self.output_dir / "sweeps" / self.name

    @property
    def experiment(self) -> Path:
        return self.storage / self.name

    @property
    def parent_run_file(self) -> Path:
        return self.directory / "mlflow_parent.json"

    @property
    def best_config(self) -> Path:
        return self.directory / "best_config.yaml"

    def trial(self, trial_id: str) -> Path:
        return self.directory / "trials" / trial_id


def sweep_paths(space: SearchSpace, cfg: RunConfig) -> SweepPaths:
    output = Path(cfg.output_dir).resolve()
    storage = Path(space.settings.storage_path).expanduser().resolve() if space.settings.storage_path else output / "tune"
    return SweepPaths(output, space.name, storage)


def link_shared_cache(shared: Path, own: Path) -> None:
    """`own` gets a link to every entry of the shared cache except `align`, which stays its own."""
    own.mkdir(parents=True, exist_ok=True)
    for entry in shared.iterdir():
        link = own / entry.name
        if entry.name != SHARED_ALIGN and not link.exists() and not link.is_symlink():
            link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def load_metric_fn(spec: str) -> Callable[..., dict[str, float]]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _restore_learner_checkpoint(checkpoint: tune.Checkpoint, location_checkpoints: Path) -> int:
    """Put the learner checkpoint carried by a Tune checkpoint where the learner resumes from."""
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / "tune_state.json").read_text())
        step_dir = Path(folder) / "learner" / state["step_dir"]
        target = location_checkpoints / state["step_dir"]
        location_checkpoints.mkdir(parents=True, exist_ok=True)
        if not (target / "state.json").is_file():
            staging = location_checkpoints / f".{state['step_dir']}.restore-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(step_dir, staging)
            staging.rename(target)
        pointer = location_checkpoints / ".latest.tmp"
        pointer.write_text(state["step_dir"])
        pointer.rename(location_checkpoints / "latest")
        return int(state["updates"])


def run_trial(config: dict, space: SearchSpace, shared_cache: str, output_dir: str, uri: str,
              parent_run_id: str | None) -> None:
    """One Tune trial: the Ray EASPO loop, reporting every `report_every` updates and once at the end.

    The last report comes after the aligned model is published and the trial's MLflow run is
    closed, so a scheduler that stops the trial on it (ASHA at `max_t`) loses nothing.
    """
    from actors.orchestrator import run_ray_alignment
    from rlhf_tts.checkpoint import latest_checkpoint
    from rlhf_tts.training.align import aligned_model_location, load_policy

    context = tune.get_context()
    trial_id = context.get_trial_id()
    paths = SweepPaths(Path(output_dir), space.name, Path(output_dir))
    own = paths.trial(trial_id)
    link_shared_cache(Path(shared_cache), own / "cache")
    params = decode(space, config)
    cfg = space.resolve({**params, "output_dir": str(own / "out"), "cache_dir": str(own / "cache"),
                         "tracking.tracking_uri": uri})
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    settings = space.settings
    metric_fn = load_metric_fn(settings.metric_fn)
    location = aligned_model_location(cfg)
    resume = False
    last_reported = [0]  # learner updates at the last report
    previous = tune.get_checkpoint()
    if previous is not None:  # Tune restarted this trial (failure or --resume): continue the learner
        last_reported[0] = _restore_learner_checkpoint(previous, location.checkpoints)
        resume = True
    import torch

    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    policy, vocab, _ = load_policy(cfg, device)
    started = time.monotonic()
    tags = {TAG_SWEEP: space.name, TAG_TRIAL: trial_id, "rlhf_tts.tune.params": json.dumps(params)[:5000]}
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    find = {TAG_TRIAL: trial_id, **({TAG_PARENT: parent_run_id} if parent_run_id else {})}

    def measure(updates: int, tracker: Tracker) -> dict[str, float]:
        metrics = {k: float(v) for k, v in metric_fn(cfg, policy, vocab, settings.metric_utterances).items()}
        if settings.metric not in metrics:
            raise KeyError(f"metric {settings.metric!r} not among {sorted(metrics)} from {settings.metric_fn}")
        metrics.update(updates=float(updates), align_seconds=time.monotonic() - started)
        tracker.log_metrics({f"tune/{k}": v for k, v in metrics.items()}, step=updates)
        return metrics

    with mlflow_run(cfg, f"trial-{trial_id}", tags, find=find) as tracker:
        def on_update(updates: int, actors) -> None:  # noqa: ANN001 - orchestrator.Actors
            if updates >= cfg.align.steps or updates - last_reported[0] < settings.report_every:
                return  # the final report waits for the published model
            checkpoint = Path(ray.get(actors.learner.checkpoint.remote()))
            policy.decoder.load_state_dict(ray.get(actors.learner.decoder_weights.remote()))
            metrics = measure(updates, tracker)
            last_reported[0] = updates
            _report(metrics, checkpoint, updates)

        placement = ray.util.get_current_placement_group()
        _, summary = run_ray_alignment(cfg, resume=resume, tracker=tracker, on_update=on_update,
                                       placement=(placement, 1) if placement is not None else None)
        updates = int(summary.get("updates", cfg.align.steps))
        final_policy, _, _ = location.as_base().load(device)
        policy.decoder.load_state_dict(final_policy.decoder.state_dict())
        final = measure(updates, tracker)
        summary_file = Path(cfg.output_dir) / "align_summary.json"
        summary_file.write_text(json.dumps(summary, indent=1, default=str))
        tracker.log_artifact(summary_file, "align")
    _report(final, latest_checkpoint(location.checkpoints), updates)


def _report(metrics: dict[str, float], learner_checkpoint: Path | None, updates: int) -> None:
    """`tune.report`, with the learner checkpoint (copied: Tune moves what it is given) when there is one."""
    if learner_checkpoint is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="tune-ckpt-") as folder:
        shutil.copytree(learner_checkpoint, Path(folder) / "learner" / learner_checkpoint.name)
        (Path(folder) / "tune_state.json").write_text(
            json.dumps({"updates": updates, "step_dir": learner_checkpoint.name}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


# ------------------------------------------------------------------------------------ the driver

def best_config_stages(base: RunConfig) -> list[str]:
    """The stages of the best config: the sweep's own `stages` with `align` added (so that running it
    produces the winning aligned model, or reuses the copy the sweep published)."""
    return [s for s in ALL_STAGES if s in IMPLEMENTED_STAGES and (s in base.stages or s == "align")]


def _build_prerequisites(cfg: RunConfig, tracker: Tracker, resume: bool) -> None:
    """Run the stages before `align` that `stages` lists (default: all; a sweep whose metric needs
    no judge can leave `judges` out)."""
    from rich.console import Console

    from rlhf_tts.run import STAGE_RUNNERS

    console = Console()
    for stage in (s for s in PREREQUISITE_STAGES if s in IMPLEMENTED_STAGES and s in cfg.stages):
        console.rule(f"sweep prerequisite: stage {stage}")
        STAGE_RUNNERS[stage](cfg, console, tracker, resume=resume)


def _publish_best(best_cache: Path, shared_cache: Path, best_cfg: RunConfig) -> Path | None:
    """Copy the best trial's aligned model into the shared cache (where `run --config` looks)."""
    from rlhf_tts.training.align import aligned_model_location

    source = aligned_model_location(best_cfg.model_copy(update={"cache_dir": str(best_cache)}))
    target = aligned_model_location(best_cfg.model_copy(update={"cache_dir": str(shared_cache)}))
    if not (source.final / "state.json").is_file() or (target.final / "state.json").is_file():
        return None
    staging = target.directory.parent / f".{target.directory.name}.copy-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source.directory, staging, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.rmtree(target.directory, ignore_errors=True)  # a partial folder without final/
    staging.rename(target.directory)
    return target.directory


@dataclass
class SweepResult:
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    best_config_path: Path
    parent_run_id: str | None
    trials: list[dict[str, Any]]
    experiment_path: Path


def run_sweep(space: SearchSpace, resume: bool = False, echo: Callable[[str], None] = print) -> SweepResult:
    """Build prerequisites, run (or resume) the Tune experiment, write and print the best config."""
    settings = space.settings
    base = space.base_config()
    paths = sweep_paths(space, base)
    paths.directory.mkdir(parents=True, exist_ok=True)
    shared_cache = Path(base.cache_dir).expanduser().resolve()
    shared_cache.mkdir(parents=True, exist_ok=True)
    (paths.directory / "space.json").write_text(json.dumps(
        {"file": str(space.path), "name": space.name, "overrides": space.overrides,
         "settings": settings.model_dump(mode="json")}, indent=1))
    parent_id = None
    if resume and paths.parent_run_file.is_file():
        parent_id = json.loads(paths.parent_run_file.read_text())["run_id"]
    uri = tracking_uri(base)
    base = base.model_copy(update={"tracking": base.tracking.model_copy(update={"tracking_uri": uri})})

    with mlflow_run(base, f"sweep-{space.name}", {TAG_SWEEP: space.name, "rlhf_tts.sweep.role": "parent"},
                    run_id=parent_id) as parent:
        if parent.run_id:
            paths.parent_run_file.write_text(json.dumps({"run_id": parent.run_id, "tracking_uri": uri}))
        _build_prerequisites(base, parent, resume)
        started_ray = _connect(space, base)
        endings: dict[str, str] = {}  # trial id -> why it ended early, for runs its process left open
        try:
            trainable = tune.with_resources(
                tune.with_parameters(run_trial, space=space, shared_cache=str(shared_cache),
                                     output_dir=str(paths.output_dir), uri=uri, parent_run_id=parent.run_id),
                trial_resources(space, gpus_in_cluster()))
            if resume and tune.Tuner.can_restore(str(paths.experiment)):
                echo(f"resuming Tune experiment {paths.experiment}")
                tuner = tune.Tuner.restore(str(paths.experiment), trainable, resume_unfinished=True,
                                           resume_errored=True)
            else:
                tuner = tune.Tuner(trainable, param_space=param_space(space),
                                   tune_config=_tune_config(space, base),
                                   run_config=tune.RunConfig(name=space.name, storage_path=str(paths.storage),
                                                             failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                                             checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
            results = tuner.fit()
            trials = []
            for result in results:
                row = {"trial_id": (result.metrics or {}).get("trial_id"),
                       "params": decode(space, result.config or {}),
                       "metric": (result.metrics or {}).get(settings.metric),
                       "iterations": (result.metrics or {}).get("training_iteration"),
                       "error": None if result.error is None else str(result.error).splitlines()[0][:300]}
                trials.append(row)
                if row["error"]:
                    endings[str(row["trial_id"])] = f"failed: {row['error']}"
                elif (row["iterations"] or 0) < iterations(space, int(row["params"].get("align.steps",
                                                                                        base.align.steps))):
                    endings[str(row["trial_id"])] = STOPPED_EARLY
            ok = [t for t in trials if t["metric"] is not None and t["error"] is None and math.isfinite(t["metric"])]
            if not ok:
                raise RuntimeError(f"no trial reported {settings.metric!r}: "
                                   + "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials))
            best = results.get_best_result(settings.metric, settings.mode, scope="last")
        finally:
            if started_ray:
                ray.shutdown()
            if parent.run_id:
                _close_unfinished_trial_runs(parent.run_id, endings)
        best_params = decode(space, best.config)
        best_trial = best.metrics["trial_id"]
        best_cfg = space.resolve({**best_params, "stages": best_config_stages(base), "tracking.tracking_uri": uri})
        paths.best_config.write_text(
            f"# best of sweep {space.name} ({settings.metric} {settings.mode}: {best.metrics[settings.metric]:.6g},"
            f" trial {best_trial})\n# run it: python -m rlhf_tts.run --config {paths.best_config}\n"
            + to_yaml(best_cfg))
        published = _publish_best(paths.trial(best_trial) / "cache", shared_cache, best_cfg)
        (paths.directory / "trials.json").write_text(json.dumps(trials, indent=1, default=str))
        parent.log_metrics({f"best/{settings.metric}": float(best.metrics[settings.metric])})
        parent.set_tags({"rlhf_tts.sweep.best_trial": best_trial,
                         "rlhf_tts.sweep.best_params": json.dumps(best_params)[:5000]})
        parent.log_artifact(paths.best_config, "sweep")
        parent.log_artifact(paths.directory / "trials.json", "sweep")
    echo(f"best trial {best_trial}: {json.dumps(best_params)} → "
         f"{settings.metric} = {best.metrics[settings.metric]:.6g}")
    if published:
        echo(f"best aligned model copied to {published}")
    echo(f"best config written to {paths.best_config}")
    echo(to_yaml(best_cfg))
    return SweepResult(best_params, {k: v for k, v in best.metrics.items() if isinstance(v, (int, float))},
                       paths.best_config, parent.run_id, trials, paths.experiment)


def _close_unfinished_trial_runs(parent_run_id: str, endings: dict[str, str]) -> int:
    """A trial process that Tune killed before it could close its MLflow run (ASHA stops a trial by
    raising in `tune.report` and then ends the process, so closing races with the kill) leaves the
    run RUNNING forever: mark such child runs KILLED, with why. Returns how many there were."""
    import mlflow

    query = f"tags.`{TAG_PARENT}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    runs = mlflow.search_runs(filter_string=query, output_format="list")
    client = mlflow.MlflowClient()
    for run in runs:
        why = endings.get(run.data.tags.get(TAG_TRIAL, ""), "its process ended without closing the run")
        client.set_tag(run.info.run_id, TAG_ENDED, why)
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(runs)


def _connect(space: SearchSpace, cfg: RunConfig) -> bool:
    """Join RAY_ADDRESS or start a local instance big enough for one trial (True: we started it)."""
    from actors.orchestrator import _bundle_cpus, connect

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return connect(cfg)
    needed = space.settings.trial_cpus + sum(_bundle_cpus(cfg))
    num_cpus = cfg.distributed.local_num_cpus or max(os.cpu_count() or 1, math.ceil(needed))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def iterations(space: SearchSpace, steps: int) -> int:
    """Reports of a trial of `steps` learner updates that runs to the end: every `report_every`
    updates, and the last one."""
    return max(1, math.ceil(steps / space.settings.report_every))


def _tune_config(space: SearchSpace, base: RunConfig) -> tune.TuneConfig:
    settings = space.settings
    steps = base.align.steps
    if "align.steps" in space.space:  # swept: ASHA's horizon is the longest trial's
        steps = max(int(v) for v in space.space["align.steps"].values)
    max_t = iterations(space, steps)
    scheduler = None
    if settings.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                  grace_period=min(settings.grace_period, max_t),
                                  reduction_factor=settings.reduction_factor)
    search_alg = None
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=settings.seed)
    return tune.TuneConfig(metric=settings.metric, mode=settings.mode, scheduler=scheduler, search_alg=search_alg,
                           num_samples=settings.num_samples,
                           max_concurrent_trials=settings.max_concurrent_trials)
