"""Wall time and peak memory of the main job's stages, each run as a user runs it.

    python bench/stages.py [--preset tiny] [--stages data pretrain] [--work DIR] [--separability]
    python bench/stages.py --main-job [--preset tiny] [--work DIR]

For each stage in order, `python -m rlhf_tts.run preset=P stages=[S]` runs as a child process;
earlier stages' caches are reused, as in a real run; the first stage starts from an empty cache,
and `data` is also timed warm (cache reused). `--main-job` instead runs the main job exactly as a
user does (`python -m rlhf_tts.run preset=P`, every stage) on an empty cache, then a second time
with the caches. Peak memory is the largest sum of resident memory over the job's whole process
tree (the job, its data workers, the Ray processes and actors), sampled every 0.2 s. MLflow is on,
as in the default main job. The README's figures come from this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def _tree_rss(process) -> int:  # noqa: ANN001 - psutil.Process
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def measure(cmd: list[str], log: Path | None = None) -> dict:
    """Run `cmd`; wall time and the peak summed RSS of its process tree (Ray workers included)."""
    import psutil

    started = time.monotonic()
    with open(log or "/dev/null", "w") as sink:
        child = psutil.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        peak = 0
        while child.poll() is None:
            peak = max(peak, _tree_rss(child))
            time.sleep(0.2)
    result = {"rc": child.returncode, "seconds": time.monotonic() - started, "peak_rss_gib": peak / 2**30}
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
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rlhf_tts_bench_"))
    base = [sys.executable, "-m", "rlhf_tts.run", f"preset={args.preset}", f"output_dir={work / 'out'}",
            f"cache_dir={work / 'cache'}"]
    results = {}
    if args.main_job:
        for label in ("first run", "second run"):
            results[label] = measure(base, work / f"main_job_{label.split()[0]}.log")
            print(f"{args.preset} main job, {label}: {results[label]['seconds'] / 60:6.1f} min, "
                  f"peak memory {results[label]['peak_rss_gib']:.2f} GiB (log {work / f'main_job_{label.split()[0]}.log'})",
                  flush=True)
        print(json.dumps(results))
        return
    for stage in args.stages:
        results[stage] = measure([*base, f"stages=[{stage}]"])
        print(f"{args.preset} {stage:>9}: {results[stage]['seconds']:7.1f} s, peak RSS {results[stage]['peak_rss_gib']:.2f} GiB",
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
