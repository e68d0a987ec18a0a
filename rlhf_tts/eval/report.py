"""The comparison report: systems × metrics with bootstrap CIs, per-emotion breakdown, files, MLflow.

`evaluate_systems` runs every system on the same held-out utterances, judges them
(`rlhf_tts.eval.scoring`), and returns a `Report`: one `SystemResult` per system with an `Estimate`
(value and 95 % CI) per metric, the same per emotion, the judge's confusion matrix and the seconds
the system took (producing its audio + judging it), and, for every row after the first model row,
its paired difference from that row on the same utterances (`rlhf_tts.eval.paired`).
`Report.write(folder)` leaves

- `report.md` / `report.json`: the tables (JSON reloads with `Report.load`);
- `per_utterance.csv`: every judgement of every system (for paired analyses);
- `plots/confusion.png`, `plots/<emotion>_<utt_id>.png` (mel and F0 contour of every system on one
  utterance per emotion, the reference's F0 drawn under each);
- `examples/<emotion>/<utt_id>__<system>.wav`;

and `Report.log(tracker)` sends the metrics (`eval/<system>/<metric>`, also `_low`/`_high` and
per emotion) and all those files to MLflow. `Report.table()` is the rich table the main job prints.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rlhf_tts.eval.corpus import EvalUtterance
from rlhf_tts.eval.metrics import Estimate, bootstrap_weights, confusion_matrix, estimate, subset
from rlhf_tts.eval.paired import paired_differences
from rlhf_tts.eval.scoring import METRICS, Judges, References, compute_references, score_outputs
from rlhf_tts.eval.system_cache import CachedRow, SystemCache

ProgressFn = Callable[..., None]

#: The columns the console table shows (the markdown report has them all).
CONSOLE_METRICS = ("emo_sim", "emotion_recall", "wer", "f0_corr", "f0_rmse_st", "duration_error", "dnsmos_ovrl",
                   "wvad_ccc")
#: Column headers of the console table (the markdown uses the full labels).
SHORT_LABELS = {"emo_sim": "EmoSIM", "emotion_recall": "Recall", "wer": "WER", "f0_corr": "F0 r",
                "f0_rmse_st": "F0 RMSE st", "energy_corr": "Energy r", "energy_rmse_db": "Energy dB",
                "duration_error": "Dur err", "dnsmos_sig": "SIG", "dnsmos_bak": "BAK", "dnsmos_ovrl": "OVRL",
                "wvad_ccc": "wVAD CCC"}
#: Metrics broken down per emotion in the report.
PER_EMOTION_METRICS = ("emo_sim", "emotion_recall", "wer", "f0_corr", "dnsmos_ovrl", "wvad_ccc")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "system"


def format_estimate(key: str, est: Estimate | None, ci: bool = True, signed: bool = False) -> str:
    """`value [low, high]` in the metric's unit (percent columns ×100); `signed` (differences) shows +/−."""
    if est is None or not np.isfinite(est.value):
        return "–"
    scale, digits = (100.0, 1) if METRICS.get(key, ("", True, False))[2] else (1.0, 3 if key != "f0_rmse_st" else 2)
    if key.startswith("dnsmos") or key == "energy_rmse_db":
        digits = 2
    sign = "+" if signed else ""

    def show(x: float) -> str:
        return f"{round(x * scale, digits) + 0.0:{sign}.{digits}f}"  # + 0.0: no "-0.0"

    text = show(est.value)
    if ci and np.isfinite(est.low):
        text += f" [{show(est.low)}, {show(est.high)}]"
    return text


@dataclass
class SystemResult:
    """One row of the report."""

    name: str
    kind: str
    source: str
    n: int
    seconds: float
    metrics: dict[str, Estimate]
    per_emotion: dict[str, dict[str, Estimate]]
    confusion: list[list[int]]
    missing: dict[str, str] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        est = self.metrics.get(metric)
        return float("nan") if est is None else est.value

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "n": self.n, "seconds": self.seconds,
                "timing": self.timing, "metrics": {k: v.to_json() for k, v in self.metrics.items()},
                "per_emotion": {e: {k: v.to_json() for k, v in m.items()} for e, m in self.per_emotion.items()},
                "confusion": self.confusion, "missing": self.missing}

    @classmethod
    def from_json(cls, data: dict) -> "SystemResult":
        return cls(data["name"], data["kind"], data["source"], data["n"], data["seconds"],
                   {k: Estimate.from_json(v) for k, v in data["metrics"].items()},
                   {e: {k: Estimate.from_json(v) for k, v in m.items()} for e, m in data["per_emotion"].items()},
                   data["confusion"], data.get("missing", {}), data.get("timing", {}))


@dataclass
class Report:
    split: str
    n_utterances: int
    emotions: list[str]
    confidence: float
    bootstrap: int
    systems: list[SystemResult]
    info: dict = field(default_factory=dict)  # judges, vocoder, sampler settings, reference seconds …
    baseline: str | None = None  # the row the later rows are compared with, pairwise (`paired`)
    paired: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # system → metric → system − baseline

    def system(self, name: str) -> SystemResult:
        for result in self.systems:
            if result.name == name:
                return result
        raise KeyError(f"no system {name!r} in the report ({', '.join(s.name for s in self.systems)})")

    # ------------------------------------------------------------------ serialisation

    def to_json(self) -> dict:
        return {"split": self.split, "n_utterances": self.n_utterances, "emotions": self.emotions,
                "confidence": self.confidence, "bootstrap": self.bootstrap, "info": self.info,
                "metrics": {k: {"label": v[0], "higher_is_better": v[1], "percent": v[2]} for k, v in METRICS.items()},
                "systems": [s.to_json() for s in self.systems], "baseline": self.baseline,
                "paired": {name: {k: v.to_json() for k, v in m.items()} for name, m in self.paired.items()}}

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        data = json.loads(Path(path).read_text())
        return cls(data["split"], data["n_utterances"], data["emotions"], data["confidence"], data["bootstrap"],
                   [SystemResult.from_json(s) for s in data["systems"]], data.get("info", {}), data.get("baseline"),
                   {name: {k: Estimate.from_json(v) for k, v in m.items()}
                    for name, m in data.get("paired", {}).items()})

    # ------------------------------------------------------------------ tables

    def metric_keys(self, wanted: Sequence[str] | None = None) -> list[str]:
        present = {k for s in self.systems for k in s.metrics}
        return [k for k in (wanted or METRICS) if k in present]

    def table(self, metrics: Sequence[str] | None = CONSOLE_METRICS, ci: bool = True, title: str | None = None):  # noqa: ANN201 - rich Table
        """The comparison as a rich Table: one row per system, value [CI] per metric, seconds."""
        from rich.table import Table

        keys = self.metric_keys(metrics)
        table = Table(title=title or f"{self.split} split, {self.n_utterances} utterances, value "
                      f"[{100 * self.confidence:.0f} % bootstrap CI]; ↑ higher / ↓ lower is better")
        table.add_column("system")
        table.add_column("n", justify="right")
        for key in keys:
            _, higher, percent = METRICS[key]
            table.add_column(f"{SHORT_LABELS.get(key, key)}{' %' if percent else ''} {'↑' if higher else '↓'}",
                             justify="right")
        table.add_column("s", justify="right")
        for s in self.systems:
            table.add_row(s.name, str(s.n), *(format_estimate(k, s.metrics.get(k), ci) for k in keys), f"{s.seconds:.0f}")
        return table

    def paired_table(self, metrics: Sequence[str] | None = CONSOLE_METRICS):  # noqa: ANN201 - rich Table | None
        """Each later row minus the baseline on the same utterances, [paired bootstrap CI]; None without pairs."""
        if not self.paired:
            return None
        from rich.table import Table

        keys = [k for k in (metrics or METRICS) if any(k in m for m in self.paired.values())]
        table = Table(title=f"minus {self.baseline}, same utterances [{100 * self.confidence:.0f} % paired "
                      "bootstrap CI]; an interval clear of 0 is a difference")
        table.add_column("system")
        for key in keys:
            _, higher, percent = METRICS[key]
            table.add_column(f"Δ {SHORT_LABELS.get(key, key)}{' %' if percent else ''} {'↑' if higher else '↓'}",
                             justify="right")
        for name, m in self.paired.items():
            table.add_row(name, *(format_estimate(k, m.get(k), signed=True) for k in keys))
        return table

    def markdown(self) -> str:
        pct = 100 * self.confidence
        keys = self.metric_keys()
        lines = [f"# Evaluation report: {self.split} split, {self.n_utterances} utterances\n",
                 f"Values with {pct:.0f} % percentile-bootstrap confidence intervals over utterances "
                 f"({self.bootstrap} resamples). ↑ higher is better, ↓ lower is better; % columns are percentages. "
                 "Ground-truth resynthesis (the reference mel through the same vocoder) is the upper bound of "
                 "every generated system; the recordings row is the judges' own ceiling.\n"]
        header = ["system", "n"] + [f"{METRICS[k][0]}{' %' if METRICS[k][2] else ''} {'↑' if METRICS[k][1] else '↓'}"
                                    for k in keys] + ["seconds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(keys) + 1)]
        for s in self.systems:
            lines.append("| " + " | ".join([s.name, str(s.n)] + [format_estimate(k, s.metrics.get(k)) for k in keys]
                                           + [f"{s.seconds:.0f}"]) + " |")
        if self.paired:
            paired_keys = [k for k in METRICS if any(k in m for m in self.paired.values())]
            lines += [f"\n## Against the {self.baseline} (paired)\n",
                      f"Each row minus the {self.baseline} on the same utterances, with the {pct:.0f} % interval of "
                      "one bootstrap that resamples utterances for both rows at once: the utterances' shared "
                      "difficulty cancels, so this interval is narrower than the rows' own (an interval clear "
                      "of 0 is a difference at that level; `rlhf_tts/eval/paired.py`).\n",
                      "| system | " + " | ".join(f"Δ {METRICS[k][0]}{' %' if METRICS[k][2] else ''} "
                                               f"{'↑' if METRICS[k][1] else '↓'}" for k in paired_keys) + " |",
                      "|---|" + "---:|" * len(paired_keys)]
            for name, m in self.paired.items():
                lines.append(f"| {name} | " + " | ".join(format_estimate(k, m.get(k), signed=True)
                                                         for k in paired_keys) + " |")
        lines.append("\nSystems: " + "; ".join(f"**{s.name}** ({s.kind}): {s.source}" for s in self.systems) + ".")
        scored = self.info.get("dnsmos_utterances")
        if scored and scored < self.n_utterances:
            lines.append(f"\nDNSMOS scores an even stride of {scored} of the {self.n_utterances} utterances "
                         "(the same ones in every row; `evaluate.dnsmos_max_utts`).")
        for s in self.systems:
            if s.missing:
                reasons: dict[str, int] = {}
                for reason in s.missing.values():
                    reasons[reason] = reasons.get(reason, 0) + 1
                lines.append(f"\n{s.name}: {len(s.missing)} utterances left out ("
                             + ", ".join(f"{n}× {r}" for r, n in reasons.items()) + ").")
        lines.append("\n## Per emotion\n")
        for key in self.metric_keys(PER_EMOTION_METRICS):
            label, higher, percent = METRICS[key]
            lines += [f"**{label}{' %' if percent else ''}** {'↑' if higher else '↓'}\n",
                      "| system | " + " | ".join(self.emotions) + " |", "|---|" + "---:|" * len(self.emotions)]
            for s in self.systems:
                lines.append(f"| {s.name} | " + " | ".join(format_estimate(key, s.per_emotion.get(e, {}).get(key))
                                                            for e in self.emotions) + " |")
            lines.append("")
        lines.append("## Emotion judge confusion (rows: target, columns: judged)\n")
        for s in self.systems:
            lines += [f"**{s.name}**\n", "| | " + " | ".join(self.emotions) + " |", "|---|" + "---:|" * len(self.emotions)]
            lines += [f"| {e} | " + " | ".join(str(c) for c in row) + " |" for e, row in zip(self.emotions, s.confusion)]
            lines.append("")
        lines.append("## Timing\n")
        lines.append("| system | seconds | " + " | ".join(sorted({k for s in self.systems for k in s.timing})) + " |")
        steps = sorted({k for s in self.systems for k in s.timing})
        lines.append("|---|---:|" + "---:|" * len(steps))
        for s in self.systems:
            lines.append(f"| {s.name} | {s.seconds:.1f} | " + " | ".join(f"{s.timing.get(k, 0):.1f}" for k in steps) + " |")
        if self.info:
            lines += ["", "## Settings\n", "```json", json.dumps(self.info, indent=1, default=str), "```"]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ output

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(self.to_json(), indent=1))
        (folder / "report.md").write_text(self.markdown())
        return folder

    def log(self, tracker, folder: str | Path | None = None) -> None:  # noqa: ANN001 - rlhf_tts.tracking.Tracker
        metrics: dict[str, float] = {}
        for s in self.systems:
            base = f"eval/{slug(s.name)}"
            metrics[f"{base}/seconds"] = s.seconds
            for key, est in s.metrics.items():
                if np.isfinite(est.value):
                    metrics[f"{base}/{key}"] = est.value
                if np.isfinite(est.low):
                    metrics[f"{base}/{key}_low"], metrics[f"{base}/{key}_high"] = est.low, est.high
            for key, est in self.paired.get(s.name, {}).items():
                if np.isfinite(est.value):
                    metrics[f"{base}/paired_{key}"] = est.value
                if np.isfinite(est.low):
                    metrics[f"{base}/paired_{key}_low"], metrics[f"{base}/paired_{key}_high"] = est.low, est.high
            for emotion, values in s.per_emotion.items():
                for key, est in values.items():
                    if np.isfinite(est.value):
                        metrics[f"{base}/{emotion.lower()}/{key}"] = est.value
        tracker.log_metrics(metrics)
        if folder is not None:
            folder = Path(folder)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                relative = path.parent.relative_to(folder)
                tracker.log_artifact(path, "evaluate" + ("" if str(relative) == "." else f"/{relative.as_posix()}"))


# ----------------------------------------------------------------------------- running systems


def choose_examples(utterances: Sequence[EvalUtterance], per_emotion: int) -> list[str]:
    """The first `per_emotion` utterances of each emotion (split order), preferring intact word marks."""
    chosen: list[str] = []
    for emotion in dict.fromkeys(u.emotion for u in utterances):
        pool = [u for u in utterances if u.emotion == emotion]
        pool.sort(key=lambda u: u.word_frame_spans is None)  # stable: split order within each group
        chosen += [u.utt_id for u in pool[:per_emotion]]
    return chosen


def system_result(system, scores, emotions: list[str], seconds: float, timing: dict[str, float],  # noqa: ANN001
                  missing: dict[str, str], resamples: int, confidence: float, seed: int) -> SystemResult:
    metrics = scores.metrics(len(emotions))
    weights = bootstrap_weights(len(scores.utt_ids), resamples, seed)
    overall = {k: estimate(m, weights, confidence) for k, m in metrics.items()}
    per_emotion: dict[str, dict[str, Estimate]] = {}
    labels = np.array(scores.emotions)
    for k, emotion in enumerate(emotions):
        index = np.flatnonzero(labels == emotion)
        if not len(index):
            continue
        w = bootstrap_weights(len(index), resamples, seed + 1 + k)
        per_emotion[emotion] = {key: estimate(subset(metrics[key], index), w, confidence)
                                for key in PER_EMOTION_METRICS if key in metrics}
    confusion = confusion_matrix(scores.targets, scores.predictions, len(emotions)).tolist()
    return SystemResult(system.name, system.kind, system.source, len(scores.utt_ids), round(seconds, 2), overall,
                        per_emotion, confusion, missing, {k: round(v, 2) for k, v in timing.items()})


def compare_with_baseline(results: Sequence[SystemResult], rows: Sequence[dict], emotions: Sequence[str],
                          resamples: int, confidence: float, seed: int
                          ) -> tuple[str | None, dict[str, dict[str, Estimate]]]:
    """(baseline, {system: paired differences}): the first model row is the baseline (the base model in
    the main job and in `rlhf_tts.evaluate`), and every row after it is compared with it."""
    names = [r.name for r in results]
    first = next((i for i, r in enumerate(results) if r.kind == "model"), None)
    if first is None or first == len(results) - 1:
        return None, {}
    by_system: dict[str, list[dict]] = {name: [] for name in names}
    for row in rows:
        by_system.setdefault(row["system"], []).append(row)
    baseline = names[first]
    return baseline, {name: paired_differences(by_system[name], by_system[baseline], emotions, resamples, confidence,
                                               seed + 500 + number)
                      for number, name in enumerate(names) if number > first}


def evaluate_systems(systems: Sequence, utterances: Sequence[EvalUtterance], judges: Judges, *, split: str,  # noqa: C901
                     resamples: int = 1000, confidence: float = 0.95, seed: int = 0, examples_per_emotion: int = 1,
                     out_dir: str | Path | None = None, progress: ProgressFn | None = None,
                     info: dict | None = None, cache: SystemCache | None = None) -> Report:
    """Run and judge every system on `utterances`; write the report files to `out_dir` when given.

    With a `cache`, a system whose row is cached is neither run nor judged (its row, per-utterance
    judgements and examples are read back), and every newly judged cacheable row is stored."""
    import soundfile as sf

    if not utterances:
        from rlhf_tts.errors import InputError

        raise InputError(f"the {split} split has no utterances to evaluate")
    emotions = list(judges.emotion.emotions)  # type: ignore[attr-defined]
    features = judges.emotion.features  # type: ignore[attr-defined]
    started = time.monotonic()
    refs: References | None = None  # computed when the first system has to be judged
    reference_seconds = 0.0
    examples = choose_examples(utterances, examples_per_emotion)
    kept: dict[str, dict[str, tuple]] = {}  # utt_id → system → (audio, mel, f0)
    results = []
    all_rows: list[dict] = []
    reused: list[str] = []
    for number, system in enumerate(systems):
        key = cache.key(system, number) if cache is not None else None
        cached = cache.load(key) if cache is not None else None
        if cached is not None:
            results.append(SystemResult.from_json(cached.result))
            all_rows += cached.rows
            for utt_id, example in cached.examples.items():
                kept.setdefault(utt_id, {})[system.name] = example
            reused.append(system.name)
            continue
        if refs is None:
            t_ref = time.monotonic()
            refs = compute_references(utterances, judges, progress)
            reference_seconds = time.monotonic() - t_ref
        t0, c0 = time.monotonic(), time.process_time()
        run = system.run(utterances, progress)
        t1, c1, m1 = time.monotonic(), time.process_time(), time.thread_time()
        if not run.outputs:
            from rlhf_tts.errors import InputError

            raise InputError(f"system {system.name!r} produced no audio for the {split} split")
        scores = score_outputs(run.outputs, refs, judges, progress, f"{system.name}: judge")
        t2, c2, m2 = time.monotonic(), time.process_time(), time.thread_time()
        # CPU seconds do not depend on what else the machine runs. Judging runs two threads (this one and
        # DNSMOS's), so with two cores to itself a system takes about
        # cpu_produce + max(cpu_judge_main, cpu_judge - cpu_judge_main), and at most cpu_produce + cpu_judge.
        timing = {"produce": t1 - t0, "judge": t2 - t1, "cpu_produce": c1 - c0, "cpu_judge": c2 - c1,
                  "cpu_judge_main": m2 - m1}
        result = system_result(system, scores, emotions, t2 - t0, timing, run.missing, resamples, confidence,
                               seed + 1000 * number)
        results.append(result)
        rows = [{"system": system.name, **row, "predicted": emotions[row["predicted"]]} for row in scores.rows()]
        all_rows += rows
        mine: dict[str, tuple] = {}
        for utt_id in examples:
            if utt_id in run.outputs:
                out = run.outputs[utt_id]
                mine[utt_id] = (out.audio, out.mel, scores.f0.get(utt_id))
                kept.setdefault(utt_id, {})[system.name] = mine[utt_id]
        if cache is not None:
            cache.save(key, CachedRow(result.to_json(), rows, mine))
    baseline, paired = compare_with_baseline(results, all_rows, emotions, resamples, confidence, seed)
    report = Report(split, len(utterances), emotions, confidence, resamples, results,
                    {**(info or {}), "reference_seconds": round(reference_seconds, 2),
                     "total_seconds": round(time.monotonic() - started, 2), "reused_rows": reused},
                    baseline, paired)
    if out_dir is not None:
        folder = Path(out_dir)
        report.write(folder)
        if all_rows:
            columns = list(dict.fromkeys(k for row in all_rows for k in row))
            with open(folder / "per_utterance.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(all_rows)
        by_id = {u.utt_id: u for u in utterances}
        for utt_id, outputs in kept.items():
            utt = by_id[utt_id]
            target = folder / "examples" / utt.emotion
            target.mkdir(parents=True, exist_ok=True)
            for name, (audio, _, _) in outputs.items():
                sf.write(target / f"{utt_id}__{slug(name)}.wav", audio, features.sample_rate, subtype="PCM_16")
        from rlhf_tts.eval.plots import confusion_figure, systems_figure

        (folder / "plots").mkdir(exist_ok=True)
        confusion_figure([(s.name, np.array(s.confusion)) for s in results], emotions, folder / "plots" / "confusion.png")
        for utt_id, outputs in kept.items():
            utt = by_id[utt_id]
            if refs is not None:
                reference_f0 = refs.contours[refs.index()[utt_id]].f0_hz
            else:  # every row came from the cache: contour just the plotted recordings
                from rlhf_tts.eval.prosody import contours
                from rlhf_tts.eval.systems import load_recording

                reference_f0 = contours(load_recording(utt, features.sample_rate), features, log_mel=utt.mel).f0_hz
            systems_figure(utt, outputs, reference_f0, features, folder / "plots" / f"{utt.emotion}_{utt_id}.png")
    return report
