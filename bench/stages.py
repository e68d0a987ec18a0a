"""Wall time and peak memory of the main job's stages, each run as a user runs it.

    python bench/stages.py [--preset tiny] [--stages data pretrain] [--work DIR] [--separability]
    python bench/stages.py --main-job [--preset tiny] [--work DIR]
    python bench/stages.py --stages align evaluate --work DIR [key=value ...]   # reuse DIR's earlier caches

For each stage in order, `python -m rlhf_tts.run preset=P stages=[S]` runs as a child process;
earlier stages' caches are reused, as in a real run; the first stage starts from an empty cache,
and `data` is also timed warm (cache reused). `--main-job` instead runs the main job exactly as a
user does (`python -m rlhf_tts.run preset=P`, every stage) on an empty cache, then a second time
with the caches. Peak memory: the largest sum over the job's whole process tree (the job, its data
workers, the Ray processes and actors) of each process's RSS, sampled every 0.5 s, and of its PSS
(proportional set size: a page shared by n processes, such as torch's libraries mapped into every
Ray worker, counts 1/n in each; the memory the job takes from the machine), sampled every 10 s
because reading it stalls the process read. `--main-job` also prints each stage's wall time and
peaks, read from the stage headers in the job's log. MLflow is on, as in the default main job. The
README's figures come from this script.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def _pss_bytes(pid: int) -> int | None:
    """PSS of `pid` from /proc/PID/smaps_rollup, or None where the kernel has none."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _tree_memory(process, with_pss: bool) -> tuple[int, int | None]:  # noqa: ANN001 - psutil.Process
    """(sum of RSS, sum of PSS or None) over the process tree. RSS counts a shared page (torch's
    libraries, Ray's object store) once in every process that maps it; PSS splits it among them, so
    the PSS sum is the memory the job takes from the machine. PSS is costly to read: the kernel walks
    the process's page tables under its memory-map lock, which stalls a torch process's allocations
    (read every 0.2-1 s it slowed pretraining by a quarter), so it is read only when asked."""
    import psutil

    rss = pss = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            resident = p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            continue
        rss += resident
        if with_pss:
            proportional = _pss_bytes(p.pid)
            pss += resident if proportional is None else proportional
    return rss, pss if with_pss else None


PSS_EVERY = 20  # PSS every 20th sample (10 s), RSS every 0.5 s
_STAGE_HEADER = re.compile(r"─ stage (\w+) ─")


def _new_stages(log: Path | None, offset: int) -> tuple[int, list[str]]:
    """The `stage NAME` headers `python -m rlhf_tts.run` wrote to `log` since `offset`, in order (a
    cached stage can start and end between two samples: each is listed, so none goes missing)."""
    if log is None or not log.is_file():
        return offset, []
    with open(log, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    data = data[: data.rfind(b"\n") + 1]  # whole lines only: a header half written is read next time
    return offset + len(data), _STAGE_HEADER.findall(data.decode("utf-8", "replace"))


def measure(cmd: list[str], log: Path | None = None) -> dict:
    """Run `cmd`; wall time and the peak summed RSS and PSS of its process tree (Ray workers included),
    overall and per stage of the main job (the stage whose header the log shows last), and the wall
    time of each stage."""
    import psutil

    started = time.monotonic()
    stage, offset = "start-up", 0
    peaks: dict[str, list[float]] = {}
    stage_started: dict[str, float] = {stage: 0.0}
    with open(log or "/dev/null", "w") as sink:
        child = psutil.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        peak_rss = peak_pss = samples = 0
        while child.poll() is None:
            offset, headers = _new_stages(log, offset)
            for stage in headers:  # all but the last of several started and ended within one sample
                stage_started[stage] = time.monotonic() - started
            samples += 1
            rss, pss = _tree_memory(child, with_pss=samples % PSS_EVERY == 0)
            peak_rss = max(peak_rss, rss)
            before = peaks.get(stage, [0.0, 0.0])
            peaks[stage] = [before[0], max(before[1], rss / 2**30)]
            if pss is not None:
                peak_pss = max(peak_pss, pss)
                peaks[stage][0] = max(before[0], pss / 2**30)
            time.sleep(0.5)
    elapsed = time.monotonic() - started
    starts = sorted(stage_started.items(), key=lambda item: item[1])
    seconds = {name: (starts[i + 1][1] if i + 1 < len(starts) else elapsed) - at for i, (name, at) in enumerate(starts)}
    result = {"rc": child.returncode, "seconds": elapsed, "peak_pss_gib": peak_pss / 2**30,
              "peak_rss_gib": peak_rss / 2**30,
              "stages": {name: {"seconds": round(seconds[name], 1),
                                "peak_pss_gib": round(peaks.get(name, [0.0, 0.0])[0], 2),
                                "peak_rss_gib": round(peaks.get(name, [0.0, 0.0])[1], 2)} for name, _ in starts}}
    if result["rc"] != 0:
        raise SystemExit(f"command failed ({result['rc']}): {' '.join(cmd)}" + (f" (log {log})" if log else ""))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stages", nargs="+", default=["data", "pretrain"])
    parser.add_argument("--work", help="folder for outputs and caches (default: a new temporary folder)")
    parser.add_argument("--separability", action="store_true", help="also time the prosodic separability check")
    parser.add_argument("--main-job", action="store_true",
                        help="time the whole main job (every stage) cold, then again with its caches")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rlhf_tts_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "rlhf_tts.run", f"preset={args.preset}", f"output_dir={work / 'out'}",
            f"cache_dir={work / 'cache'}", *args.overrides]
    results = {}
    if args.main_job:
        for label in ("first run", "second run"):
            results[label] = measure(base, work / f"main_job_{label.split()[0]}.log")
            print(f"{args.preset} main job, {label}: {results[label]['seconds'] / 60:6.1f} min, "
                  f"peak memory {results[label]['peak_pss_gib']:.2f} GiB (sum of PSS; sum of RSS "
                  f"{results[label]['peak_rss_gib']:.2f} GiB) (log {work / f'main_job_{label.split()[0]}.log'})",
                  flush=True)
            for name, figures in results[label]["stages"].items():
                print(f"  {name:>9}: {figures['seconds']:7.1f} s, peak memory {figures['peak_pss_gib']:.2f} GiB "
                      f"(RSS {figures['peak_rss_gib']:.2f})", flush=True)
        print(json.dumps(results))
        return
    for stage in args.stages:
        results[stage] = measure([*base, f"stages=[{stage}]"])
        print(f"{args.preset} {stage:>9}: {results[stage]['seconds']:7.1f} s, peak memory "
              f"{results[stage]['peak_pss_gib']:.2f} GiB (sum of PSS; sum of RSS {results[stage]['peak_rss_gib']:.2f} GiB)",
              flush=True)
        if stage == "data":
            warm = measure([*base, "stages=[data]"])
            results["data_warm"] = warm
            print(f"{args.preset} data warm: {warm['seconds']:7.1f} s (cache reused)", flush=True)
    if args.separability:
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "rlhf_tts.data.separability", f"preset={args.preset}",
                        f"output_dir={work / 'out'}", f"cache_dir={work / 'cache'}", "tracking.enabled=false"],
                       check=True, stdout=subprocess.DEVNULL)
        report = json.loads((work / "out" / "separability.json").read_text())
        results["separability"] = {"test_accuracy": report["test_accuracy"], "seconds": time.monotonic() - start}
        print(f"prosodic emotion classifier: test accuracy {report['test_accuracy']:.1%} (chance 20 %), "
              f"{results['separability']['seconds']:.1f} s including start-up")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
