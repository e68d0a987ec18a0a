"""Wall time and peak memory of the main job's stages, each run as a user runs it.

    python bench/stages.py [--preset tiny] [--stages data pretrain] [--work DIR] [--separability]

For each stage in order, `python -m rlhf_tts.run preset=P stages=[S]` runs in a fresh wrapper
process, so the peak resident memory reported is that of this stage's job and all its workers
(RUSAGE_CHILDREN of the wrapper). Earlier stages' caches are reused, as in a real run; the first
stage starts from an empty cache, and `data` is also timed warm (cache reused). MLflow is on, as in
the default main job. The README's figures come from this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_WRAPPER = (
    "import resource, subprocess, sys, json, time; t = time.monotonic(); "
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(json.dumps({'rc': r.returncode, 'seconds': time.monotonic() - t, "
    "'peak_rss_gib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))"
)


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"command failed ({result['rc']}): {' '.join(cmd)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stages", nargs="+", default=["data", "pretrain"])
    parser.add_argument("--work", help="folder for outputs and caches (default: a new temporary folder)")
    parser.add_argument("--separability", action="store_true", help="also time the prosodic separability check")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rlhf_tts_bench_"))
    base = [sys.executable, "-m", "rlhf_tts.run", f"preset={args.preset}", f"output_dir={work / 'out'}",
            f"cache_dir={work / 'cache'}"]
    results = {}
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
