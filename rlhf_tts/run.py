"""The main job: `python -m rlhf_tts.run [--config FILE.yaml] [--resume] [key=value ...]`.

Runs the configured stages in order: data → pretrain → easpm → judges → align → evaluate, each
cached by its config. The config is validated before anything heavy starts; a bad key or value is a
one-line error and exit code 2 (3: no usable data; 4: the judges built in the background failed).
With `parallel_stages=true` a first run builds the judges in a child process beside pretrain and
easpm (`rlhf_tts.background_stage`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlhf_tts.config import ALL_STAGES, IMPLEMENTED_STAGES, ConfigError, RunConfig, load_config, to_yaml

EXIT_CONFIG_ERROR = 2
EXIT_DATA_ERROR = 3
EXIT_STAGE_ERROR = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_tts.run",
        description="Run the rlhf_tts pipeline. Overrides are key=value, e.g. preset=smoke stages=[data] "
        "data.source=esd data.root=DIR output_dir=DIR cache_dir=DIR.",
    )
    parser.add_argument("--config", help="YAML file with config keys (merged over the preset)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted stage from its latest checkpoint instead of starting it again")
    parser.add_argument("--mlflow-run-id", help="log into this existing MLflow run instead of starting one (how the "
                        "main job's background judges stage logs into the main job's run)")
    parser.add_argument("--no-config-copy", action="store_true",
                        help="do not write <output_dir>/config.yaml (a background stage leaves its parent's copy)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console, transient=False,
    )


class StageProgress:
    """Adapts the stages' `(label, done, total)` callbacks to one rich bar per label.

    Rich draws nothing on a console that is not a terminal (a redirected log, `ray job submit`'s job
    log) until the bar stops, so a long stage would look stalled there: on such a console a plain
    line per label is printed every `plain_every_s` seconds and when the label completes."""

    def __init__(self, progress: Progress, plain_every_s: float = 60.0) -> None:
        self.progress = progress
        self.tasks: dict[str, tuple[TaskID, float, int]] = {}
        self.plain = not progress.console.is_terminal
        self.plain_every_s = plain_every_s
        self.last_plain: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int, info: str = "") -> None:
        now = time.monotonic()
        if label not in self.tasks:
            # A resumed stage starts part-way: the rate counts only this run's work.
            self.tasks[label] = (self.progress.add_task(label, total=total, rate="", info=""), now, done)
            self.last_plain[label] = now
        task, start, first = self.tasks[label]
        elapsed = max(now - start, 1e-6)
        rate = (done - first) / elapsed
        self.progress.update(task, completed=done, total=total, rate=f"{rate:.2f}/s", info=info)
        finished = done >= total
        if self.plain and (finished or now - self.last_plain[label] >= self.plain_every_s) \
                and self.last_plain[label] != float("inf"):
            self.last_plain[label] = float("inf") if finished else now
            eta = f", ETA {(total - done) / rate:.0f} s" if 0 < done < total and rate > 0 else ""
            self.progress.console.print(f"{label}: {done}/{total} ({rate:.2f}/s, {elapsed:.0f} s{eta})"
                                        + (f" {info}" if info else ""), markup=False, highlight=False)


def run_data_stage(cfg: RunConfig, console: Console, tracker, resume: bool = False) -> dict:  # noqa: ANN001
    from rlhf_tts.data.pipeline import NoUsableDataError, build_dataset, manifest_rows, publish
    from rlhf_tts.data.quarantine import Quarantine
    from rlhf_tts.data.summary import summarize, summary_table, write_summary

    start = time.monotonic()
    with progress_bar(console) as progress:
        try:
            dataset = build_dataset(cfg, StageProgress(progress))
        except NoUsableDataError as err:
            err.quarantine.write_csv(Path(cfg.output_dir) / "quarantine.csv")
            raise
    publish(dataset, cfg.output_dir)
    rows = manifest_rows(dataset)
    summary = summarize(rows, Quarantine.read_csv(dataset.quarantine_path))
    summary["dataset_dir"] = str(dataset.directory)
    summary["corpus_root"] = str(dataset.corpus_root)
    summary["seconds"] = round(time.monotonic() - start, 2)
    write_summary(summary, cfg.output_dir)
    console.print(summary_table(summary))
    console.print(
        f"splits: {summary['per_split']}; quarantined: {summary['quarantined']} "
        f"{summary['quarantine_reasons'] or ''} → {Path(cfg.output_dir) / 'quarantine.csv'}"
    )
    console.print(f"manifest: {Path(cfg.output_dir) / 'manifest.parquet'} (dataset cache {dataset.directory})")
    tracker.log_metrics({"data/utterances": summary["utterances"], "data/hours": summary["hours"],
                         "data/quarantined": summary["quarantined"], "data/seconds": summary["seconds"]})
    for name in ("data_summary.md", "quarantine.csv"):
        tracker.log_artifact(Path(cfg.output_dir) / name, "data")
    return summary


def run_pretrain_stage(cfg: RunConfig, console: Console, tracker, resume: bool = False) -> dict:  # noqa: ANN001
    """Pretrain, check that the alignment locked in, and with `pretrain.lock_in_retries` train again
    under a derived seed when it did not; later stages find the chosen attempt by `base_model_location`."""
    from rlhf_tts.data.pipeline import build_dataset
    from rlhf_tts.training.lock_in import check_alignment
    from rlhf_tts.training.pretrain import base_model_location, resolve_device, run_pretraining

    dataset = build_dataset(cfg)  # cached by the data stage: a lookup, not a rebuild
    start = time.monotonic()
    attempts = 1 + cfg.pretrain.lock_in_retries
    checks = {}  # model folder → its lock-in check
    for attempt in range(attempts):
        with progress_bar(console) as progress:
            base = run_pretraining(cfg, dataset.directory, resume=resume, progress=StageProgress(progress),
                                   tracker=tracker, attempt=attempt)
        check = check_alignment(base, dataset.directory, cfg.pretrain.lock_in_max_duration_loss,
                                resolve_device(cfg.pretrain.device))
        checks[base.directory] = check
        label = f"base model (attempt {attempt + 1} of {attempts})" if attempts > 1 else "base model"
        console.print(f"{label}: {base.final} ({time.monotonic() - start:.0f} s); {check.message()}")
        if check.locked_in:
            break
        if attempt + 1 < attempts:
            console.print(f"the alignment did not lock in: training attempt {attempt + 2} of {attempts} under a "
                          "derived seed (`pretrain.lock_in_retries`)")
    chosen = base_model_location(cfg)  # the first attempt that locked in, else the closest
    check = checks[chosen.directory]
    if not check.locked_in:
        console.print(
            "[bold red]warning:[/] the base model's alignment did not lock in: its durations are noise and its "
            "speech hard to understand (on the tiny preset such models' test WER was 60-78 % against 40-48 %), and "
            "every later stage would measure that model. Whether it locks in depends on the seed and on the "
            "machine; another `seed=N`, more `pretrain.lock_in_retries` or more `pretrain.steps` trains another "
            "one (README, *The base model*)."
            + (f" Using {chosen.directory.name}, the closest of {len(checks)} attempts." if len(checks) > 1 else ""))
    tracker.log_metrics({"pretrain/heldout_duration_loss": check.duration_loss,
                         "pretrain/heldout_prior_loss": check.prior_loss, "pretrain/locked_in": float(check.locked_in),
                         "pretrain/attempts": float(len(checks))})
    return {"base_model": str(chosen.final), "alignment_locked_in": check.locked_in,
            "heldout_duration_loss": check.duration_loss, "attempts": len(checks)}


def _lazy(module: str, name: str):  # noqa: ANN202
    """A stage runner imported on first use, so `--help` and config errors stay fast."""
    def runner(cfg: RunConfig, console: Console, tracker, resume: bool = False) -> dict:  # noqa: ANN001
        import importlib
        return getattr(importlib.import_module(module), name)(cfg, console, tracker, resume=resume)
    return runner


STAGE_RUNNERS = {
    "data": run_data_stage,
    "pretrain": run_pretrain_stage,
    # Each later stage lives with its code; the signature is (cfg, console, tracker, resume=) -> dict.
    "easpm": _lazy("rlhf_tts.training.easpm", "run_easpm_stage"),
    "judges": _lazy("rlhf_tts.eval.judges_stage", "run_judges_stage"),
    "align": _lazy("actors.align_stage", "run_align_stage"),
    "evaluate": _lazy("rlhf_tts.eval.evaluate_stage", "run_evaluate_stage"),
}


def release_memory() -> None:
    """Give a finished stage's memory back to the system before the next stage starts: the main job
    runs every stage in one process, and glibc keeps freed heap pages (the judges' training mels,
    say) resident unless asked to trim, so they would add to the next stage's peak (Ray's actors)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_config_copy:
        (out / "config.yaml").write_text(to_yaml(cfg))
    console.rule(f"rlhf_tts.run · preset {cfg.preset}")
    console.print(to_yaml(cfg), highlight=False)
    pending = [s for s in ALL_STAGES if s not in IMPLEMENTED_STAGES]
    console.print(f"stages: {', '.join(cfg.stages)}" + (f"  (not yet in this version: {', '.join(pending)})" if pending else ""))

    from rlhf_tts.data.pipeline import NoUsableDataError
    from rlhf_tts.tracking import tracked_run

    import torch

    from rlhf_tts.background_stage import BackgroundJudges, foreground_threads, wants_background_judges

    all_threads = torch.get_num_threads()
    background: BackgroundJudges | None = None
    done: list[str] = []
    with tracked_run(cfg, run_name=f"run-{cfg.preset}", attach_run_id=args.mlflow_run_id) as tracker:
        try:
            for stage in cfg.stages:
                if background is None and wants_background_judges(cfg, stage, done):
                    background = BackgroundJudges(cfg, out / "config.yaml", args.resume, tracker.run_id)
                    console.print(f"stage judges: building in the background beside {stage} "
                                  f"(one torch thread; log: {background.log_path})")
                console.rule(f"stage {stage}")
                if stage == "judges" and background is not None:
                    if not _join_background_judges(background, console):
                        return EXIT_STAGE_ERROR
                else:
                    torch.set_num_threads(foreground_threads(all_threads, background))
                    try:
                        STAGE_RUNNERS[stage](cfg, console, tracker, resume=args.resume)
                    except NoUsableDataError as err:
                        print(f"data error: {err} (see {out / 'quarantine.csv'})", file=sys.stderr)
                        return EXIT_DATA_ERROR
                    finally:
                        torch.set_num_threads(all_threads)
                done.append(stage)
                release_memory()
        finally:
            if background is not None:
                background.stop()  # a no-op once joined; else the job is failing: do not leave it running
    console.print(f"[green]done[/green]: outputs in {out.resolve()}")
    return 0


def _join_background_judges(background, console: Console) -> bool:  # noqa: ANN001 - BackgroundJudges
    """Wait for the background judges; print their report (or, if they failed, the log's tail)."""
    if background.running():
        console.print(f"waiting for the judges built in the background (log: {background.log_path})")
    code = background.wait()
    if code != 0:
        print(f"judges stage failed in the background (exit {code}); last lines of {background.log_path}:\n"
              f"{background.tail()}", file=sys.stderr)
        return False
    report = Path(background.log_path).with_name("judges_report.md")
    console.print(report.read_text() if report.is_file() else "(no judges report)", highlight=False)
    console.print(f"judges built in the background (log: {background.log_path})")
    return True


if __name__ == "__main__":
    sys.exit(main())
