"""The main job's one overlap: the judges stage in a child process beside pretrain and easpm.

The judges (emotion judge, domain recogniser, their checks) depend on the corpus only, not on any
model, so on a first run they can be built while the base model and EASPM train. A child process
(`python -m rlhf_tts.run stages=[judges] judges.threads=1 ...`) does it with one torch thread, and
the main job's own stages take the other cores (`foreground_threads`): two one-thread branches side
by side, never more threads than cores (oversubscribed torch threads spin against each other).
Off by default (`parallel_stages=false`): on the 2-core machine the real stages (data-loader
workers, numpy feature extraction and vocoding) crowd the two cores, so it saved under 3 of 63
minutes (README), and pretraining at one thread trains another base model than at two (CPU training
is bit-reproducible per thread count only), which would make the cached model depend on whether the
judges were cached. It is for machines with cores to spare.

The child logs into the main job's MLflow run (`--mlflow-run-id`) and writes its output to
`<output_dir>/judges.log`; the main job waits for it where the judges stage sits in its stage list
and fails there, with the log's tail, if the child failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlhf_tts.config import RunConfig
from rlhf_tts.workers import usable_cores

#: Stages the background judges can run beside (they need the corpus, and nothing the judges build).
OVERLAPPABLE = ("pretrain", "easpm")


def wants_background_judges(cfg: RunConfig, stage: str, done: list[str]) -> bool:
    """Start the judges in the background now? Only right before an overlappable stage, when the judges
    come later in this run and would build something (a cached judges stage costs seconds), and on
    two cores or more (on one, side by side is one after the other with extra memory)."""
    if not cfg.parallel_stages or usable_cores() < 2 or stage not in OVERLAPPABLE:
        return False
    if "judges" not in cfg.stages or "judges" in done or cfg.stages.index("judges") < cfg.stages.index(stage):
        return False
    from rlhf_tts.eval.judges_stage import judges_cached

    return not judges_cached(cfg)


class BackgroundJudges:
    """The judges stage running in a child process; `wait()` joins it."""

    def __init__(self, cfg: RunConfig, config_file: Path, resume: bool, mlflow_run_id: str | None) -> None:
        self.log_path = Path(cfg.output_dir) / "judges.log"
        command = [sys.executable, "-m", "rlhf_tts.run", "--config", str(config_file), "stages=[judges]",
                   "judges.threads=1", "judges.workers=1", "parallel_stages=false", "--no-config-copy"]
        if resume:
            command.append("--resume")
        if mlflow_run_id:
            command += ["--mlflow-run-id", mlflow_run_id]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int:
        code = self.process.wait()
        self.log.close()
        return code

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """Terminate the child (the main job failed or was interrupted)."""
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def foreground_threads(all_threads: int, background: BackgroundJudges | None) -> int:
    """Torch threads for the main job's next stage: one core left to a running background child."""
    if background is not None and background.running():
        return max(1, all_threads - 1)
    return all_threads
