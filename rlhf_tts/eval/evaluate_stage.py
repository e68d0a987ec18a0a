"""The `evaluate` stage of the main job, and the system line-up shared with `python -m rlhf_tts.evaluate`.

The stage compares, on `evaluate.split` (test by default): ground-truth resynthesis (always: the
upper bound), the corpus recordings (`evaluate.include_recordings`), the config's base model
(required: the pretrain stage makes it), the aligned model when the align stage has produced one,
any `evaluate.systems`, and the degraded sanity system when `evaluate.degraded`. Judges come from
the cache the `judges` stage fills (trained here if missing). The report lands in
`<output_dir>/evaluate/` and MLflow; the console gets the comparison table.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Literal

from rlhf_tts.config import RunConfig
from rlhf_tts.errors import InputError

ProgressFn = Callable[..., None]
BASE, ALIGNED, DEGRADED = "base model", "aligned model", "degraded"


def aligned_model_dir(cfg: RunConfig) -> Path | None:
    """The aligned model's folder when the align stage has finished one for this config, else None."""
    from rlhf_tts.training.align import aligned_model_location

    location = aligned_model_location(cfg)
    return location.as_base().directory if (location.final / "state.json").is_file() else None


def plan_systems(cfg: RunConfig, pool: list, *, base: Literal["auto", "require", "skip"] = "auto",  # noqa: C901
                 aligned: Literal["auto", "skip"] = "auto", extra: dict[str, str] | None = None,
                 degraded: bool | None = None, notes: list[str] | None = None) -> list:
    """The systems to compare, in report order. `pool` is the split's utterances (the degraded system
    draws its wrong-emotion versions from it); `notes` collects what was left out and why."""
    import torch

    from rlhf_tts.eval.systems import DegradedSystem, ModelSystem, RecordingsSystem, ResynthesisSystem, make_system
    from rlhf_tts.models.vocoder import make_vocoder
    from rlhf_tts.training.pretrain import base_model_location, resolve_device

    ev = cfg.evaluate
    notes = notes if notes is not None else []
    try:
        vocoder = make_vocoder(ev.vocoder, cfg.features, ev.hifigan)
    except ValueError as err:
        raise InputError(str(err)) from None
    device = resolve_device(ev.device)
    vocoder = vocoder.to(device) if isinstance(vocoder, torch.nn.Module) else vocoder
    systems: list = [ResynthesisSystem(cfg.features, vocoder, ev.vocoder_batch)]
    if ev.include_recordings:
        systems.append(RecordingsSystem(cfg.features))
    if base != "skip":
        location = base_model_location(cfg)
        if (location.final / "state.json").is_file():
            systems.append(ModelSystem(BASE, location.directory, cfg, vocoder, device))
        elif base == "require":
            raise InputError(f"no base model at {location.directory}: run the pretrain stage with this config first")
        else:
            notes.append(f"no base model at {location.directory} (run the pretrain stage): left out")
    if aligned != "skip":
        directory = aligned_model_dir(cfg)
        if directory is not None:
            systems.append(ModelSystem(ALIGNED, directory, cfg, vocoder, device))
        else:
            notes.append("no aligned model for this config yet (the align stage makes one): left out")
    names = {s.name for s in systems}
    for name, spec in {**ev.systems, **(extra or {})}.items():
        if name in names or name == DEGRADED:
            raise InputError(f"system name {name!r} is taken; choose another")
        systems.append(make_system(name, spec, cfg, vocoder, device))
        names.add(name)
    if ev.degraded if degraded is None else degraded:
        systems.append(DegradedSystem(cfg.features, vocoder, pool, ev.degraded_wrong_emotion, ev.degraded_snr_db,
                                      ev.seed, ev.vocoder_batch, DEGRADED))
    return systems


def run_evaluation(cfg: RunConfig, progress: ProgressFn | None = None, tracker=None, *,  # noqa: ANN001 - Tracker
                   base: Literal["auto", "require", "skip"] = "auto", aligned: Literal["auto", "skip"] = "auto",
                   extra: dict[str, str] | None = None, degraded: bool | None = None,
                   out_dir: str | Path | None = None):  # noqa: ANN201 - (Report, Path, notes)
    """Load judges and utterances, run the line-up, write `<out_dir>` (default `<output_dir>/evaluate`),
    with `evaluate.threads` torch threads (restored after)."""
    from rlhf_tts.eval.judges_stage import torch_threads

    with torch_threads(cfg.evaluate.threads):
        return _run_evaluation(cfg, progress, tracker, base, aligned, extra, degraded, out_dir)


def _run_evaluation(cfg: RunConfig, progress, tracker, base, aligned, extra, degraded, out_dir):  # noqa: ANN001, ANN202
    import torch

    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.corpus import load_split
    from rlhf_tts.eval.judges_stage import load_judges
    from rlhf_tts.eval.report import evaluate_systems

    ev = cfg.evaluate
    dataset, _ = dataset_location(cfg)
    if not dataset.manifest_path.is_file():
        raise InputError(f"no dataset at {dataset.directory}: run the data stage with this config first")
    utterances = load_split(dataset, ev.split, ev.max_utts or None, cfg.features)
    if not utterances:
        raise InputError(f"evaluate.split={ev.split}: the split is empty")
    notes: list[str] = []
    wants_degraded = ev.degraded if degraded is None else degraded
    # The degraded system's wrong-emotion versions come from the whole split, not only the sampled stride.
    pool = load_split(dataset, ev.split, None, cfg.features) if wants_degraded and ev.max_utts else utterances
    # Systems first: a wrong path is an error before any judge is trained or loaded.
    systems = plan_systems(cfg, pool, base=base, aligned=aligned, extra=extra, degraded=degraded, notes=notes)
    started = time.monotonic()
    judges = load_judges(cfg, progress, asr=ev.wer, dnsmos=ev.dnsmos, tracker=tracker)
    judges.dnsmos_max_utts = ev.dnsmos_max_utts
    setup = time.monotonic() - started
    folder = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "evaluate"
    for stale in ("examples", "plots"):
        shutil.rmtree(folder / stale, ignore_errors=True)
    info = {"judges_setup_seconds": round(setup, 2), "vocoder": ev.vocoder, "sampler_steps": ev.sampler_steps,
            "dnsmos_utterances": len(judges.dnsmos_ids(utterances)) if judges.dnsmos is not None else 0,
            "temperature": ev.temperature, "guidance": ev.guidance, "stochastic": ev.stochastic, "durations": ev.durations,
            "output_level": ev.output_level,
            "recognizer": getattr(judges.recognizer, "name", None), "torch_threads": torch.get_num_threads(),
            "notes": notes}
    report = evaluate_systems(systems, utterances, judges, split=ev.split, resamples=ev.bootstrap,
                              confidence=ev.confidence, seed=ev.seed, examples_per_emotion=ev.examples_per_emotion,
                              out_dir=folder, progress=progress, info=info,
                              cache=system_cache(cfg, utterances) if ev.reuse_rows else None)
    if tracker is not None:
        report.log(tracker, folder)
    return report, folder, notes


def system_cache(cfg: RunConfig, utterances: list) -> "SystemCache":  # noqa: F821
    """The per-system row cache for this config's judges, utterances and `evaluate.*` settings."""
    from rlhf_tts.config import stable_hash
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.judges_stage import checks_key
    from rlhf_tts.eval.system_cache import SystemCache
    from rlhf_tts.eval.systems import MODEL_SAMPLER_FIELDS

    dataset, _ = dataset_location(cfg)
    # What does not change a row (threads, workers, which rows run) stays out; the sampler settings key the
    # model rows alone (`ModelSystem.cache_key`). The seed stays: it also seeds every row's bootstrap.
    settings = cfg.evaluate.model_dump(mode="json", exclude={"systems", "degraded", "include_recordings", "threads",
                                                              "max_utts", "reuse_rows", "synthesis_workers",
                                                              *(set(MODEL_SAMPLER_FIELDS) - {"seed"})})
    judges = cfg.judges.model_dump(mode="json", exclude={"threads", "workers"})  # how fast, not what they say
    context = stable_hash(dataset.directory.name, checks_key(cfg), judges, settings,
                          cfg.features.model_dump(mode="json"), [u.utt_id for u in utterances])
    return SystemCache(Path(cfg.cache_dir) / "evaluate" / "systems", context)


def print_wide(console, renderable, width: int = 200) -> None:  # noqa: ANN001
    """Print a wide table unfolded even when the console is narrow (a log file, CI: 80 columns)."""
    import io

    from rich.console import Console

    if console.width >= width:
        console.print(renderable)
        return
    buffer = Console(file=io.StringIO(), width=width, color_system=None)
    buffer.print(renderable)
    console.print(buffer.file.getvalue(), soft_wrap=True, markup=False, highlight=False, end="")


def print_report(console, report, folder: Path, notes: list[str]) -> None:  # noqa: ANN001
    print_wide(console, report.table())
    paired = report.paired_table()
    if paired is not None:
        print_wide(console, paired)
    for note in notes:
        console.print(f"note: {note}")
    reused = report.info.get("reused_rows") or []
    if reused:
        console.print(f"rows reused from the evaluation cache: {', '.join(reused)}")
    console.print("seconds per system (produce + judge): "
                  + ", ".join(f"{s.name} {s.seconds:.1f}" for s in report.systems)
                  + f"; references {report.info.get('reference_seconds', 0):.1f}")
    console.print(f"report: {folder / 'report.md'} (JSON, per-utterance CSV, plots and audio examples beside it)")


EVALUATION_CACHE_VERSION = 1


def evaluation_cache_dir(cfg: RunConfig) -> Path | None:
    """Where the stage's report for this exact line-up is cached, or None when it cannot be keyed.

    Every system of the main job's line-up is a pure function of cached, hash-named inputs (corpus,
    base model, aligned model, judges) and `evaluate.*` (fixed seed), so a second run can reuse the
    report. User systems (`evaluate.systems`: folders that may change) are never cached."""
    from rlhf_tts.config import stable_hash
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.judges_stage import checks_key
    from rlhf_tts.training.pretrain import base_model_location

    if cfg.evaluate.systems:
        return None
    aligned = aligned_model_dir(cfg)
    aligned_id = None
    if aligned is not None:  # its final state names the update it stopped at: a resumed run changes it
        aligned_id = (str(aligned), (aligned / "final" / "state.json").read_text() if (aligned / "final" / "state.json").is_file() else None)
    dataset, _ = dataset_location(cfg)
    key = stable_hash(dataset.directory.name, base_model_location(cfg).directory.name, aligned_id, checks_key(cfg),
                      cfg.judges.model_dump(), cfg.evaluate.model_dump(), cfg.features.model_dump(), EVALUATION_CACHE_VERSION)
    return Path(cfg.cache_dir) / "evaluate" / key


def run_evaluate_stage(cfg: RunConfig, console, tracker, resume: bool = False) -> dict:  # noqa: ANN001
    from rlhf_tts.eval.report import Report
    from rlhf_tts.run import StageProgress, progress_bar

    start = time.monotonic()
    cached = evaluation_cache_dir(cfg)
    folder = Path(cfg.output_dir) / "evaluate"
    if cached is not None and (cached / "report.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(cached, folder)
        report = Report.load(folder / "report.json")
        notes = list(report.info.get("notes", []))
        report.log(tracker, folder)
        console.print(f"evaluation cache: {cached} (same corpus, models, judges and evaluate.*)")
    else:
        with progress_bar(console) as progress:
            report, folder, notes = run_evaluation(cfg, StageProgress(progress), tracker, base="require")
        if cached is not None:  # published whole or not at all
            tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(folder, tmp)
            shutil.rmtree(cached, ignore_errors=True)
            tmp.rename(cached)
    print_report(console, report, folder, notes)
    return {"report": str(folder / "report.json"), "seconds": round(time.monotonic() - start, 1),
            "systems": {s.name: {k: v.value for k, v in s.metrics.items()} for s in report.systems}}
