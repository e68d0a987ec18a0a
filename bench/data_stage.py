"""Wall time and peak memory of the `data` stage, cold (empty cache) and warm (cache reused).

    python bench/data_stage.py [--presets smoke tiny] [--keep DIR]

Each measurement runs `python -m rlhf_tts.run preset=P stages=[data]` as a user would, in a child
process, with a fresh cache folder for the cold run; peak memory is the largest resident set of the
job and all its worker processes (RUSAGE_CHILDREN). MLflow is on, as in the default main job. It
also runs the prosodic separability check on the tiny corpus. Figures in the README come from here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB over the child and its descendants) of one command."""
    start = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["smoke", "tiny"])
    parser.add_argument("--keep", help="work in this folder instead of a temporary one")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="rlhf_tts_bench_"))
    results = {}
    for preset in args.presets:
        base = [sys.executable, "-m", "rlhf_tts.run", f"preset={preset}", "stages=[data]",
                f"output_dir={work / preset / 'out'}", f"cache_dir={work / preset / 'cache'}"]
        cold, cold_mem = timed(base)
        warm, _ = timed(base)
        results[preset] = {"cold_s": round(cold, 1), "warm_s": round(warm, 1), "peak_rss_gib": round(cold_mem, 2)}
        print(f"{preset:>6}: cold {cold:6.1f} s   warm (cached) {warm:5.1f} s   peak RSS {cold_mem:.2f} GiB", flush=True)
    if "tiny" in args.presets:
        tiny = work / "tiny"
        seconds, _ = timed([sys.executable, "-m", "rlhf_tts.data.separability", f"output_dir={tiny / 'out'}",
                            f"cache_dir={tiny / 'cache'}", "tracking.enabled=false"])
        report = json.loads((tiny / "out" / "separability.json").read_text())
        results["separability"] = {"test_accuracy": report["test_accuracy"], "seconds": round(seconds, 1)}
        print(f"prosodic emotion classifier on tiny: test accuracy {report['test_accuracy']:.1%} "
              f"(chance 20 %), {seconds:.1f} s including start-up")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
