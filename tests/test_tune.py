"""Search spaces, `python -m rlhf_tts.tune`, and a real 4-trial sweep on a local Ray instance.

The fast tests check the space files and their translation to Tune objects and placement groups
without starting Ray. The slow test runs k ∈ {2, 4} × two timestep ranges at preset smoke through
the CLI, with the cheap EASPM metric (`rlhf_tts.tune:easpm_emotion_metrics`) instead of the judge,
and checks MLflow (one parent, four children), the best-config YAML, `rlhf_tts.run --config` on it,
and `--resume`.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from rlhf_tts.config import load_config
from rlhf_tts.tune_space import SpaceError, load_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "tune_spaces"


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ space files

def test_shipped_spaces_load_and_hold_the_paper_ablations():
    spaces = {p.stem: load_space(p) for p in sorted(SPACES.glob("*.yaml"))}
    assert {"ablation_k", "ablation_timestep", "k_by_timestep", "kappa", "objective"} <= set(spaces)
    assert spaces["ablation_k"].space["align.k"].values == (2, 4, 8)
    assert spaces["ablation_k"].base_config().align.t_range == (0.0, 0.75)
    assert [list(v) for v in spaces["ablation_timestep"].space["align.t_range"].values] == [
        [0.0, 0.5], [0.0, 0.75], [0.25, 0.75], [0.0, 1.0]]
    assert spaces["k_by_timestep"].grid_size() == 4
    objective = spaces["objective"]
    assert {k: d.kind for k, d in objective.space.items()} == {
        "align.objective": "choice", "align.beta": "loguniform", "align.lr": "loguniform",
        "align.threshold": "uniform", "align.next_state": "choice"}
    assert objective.settings.search == "optuna" and objective.settings.scheduler == "asha"
    # On the tiny preset (pool_matched, windowed candidates, t <= 0.3, lr 1e-4) the paper's ablations
    # still sweep the paper's method, and kappa still decides the range it sweeps
    for name in ("ablation_k", "ablation_timestep", "k_by_timestep", "kappa"):
        align = spaces[name].base_config().align
        assert (align.objective, align.candidate_window, align.candidate_level, align.lr) == (
            "reward_matched", False, "own", 1e-5), name
    assert spaces["objective"].base_config().align.candidate_window is False
    kappa = spaces["kappa"]
    assert kappa.resolve({"align.kappa": 0.5}).align.timestep_range() == (0.0, 0.5)
    pool = spaces["pool"].base_config().align
    assert (pool.objective, pool.candidate_window, spaces["pool"].grid_size()) == ("pool_matched", True, 9)
    level = spaces["candidate_level"]
    assert level.grid_size() == 9 and level.space["align.candidate_level"].values == ("own", "shared", "band")
    assert level.resolve({"align.candidate_level": "band", "align.seed": 2}).align.candidate_level == "band"
    drift = spaces["level_drift"]
    assert drift.grid_size() == 18 and drift.space["align.plain_steps"].values == ("stochastic", "ode")
    trial = drift.resolve({"align.level_anchor": 10.0, "align.plain_steps": "ode", "align.seed": 1}).align
    assert (trial.level_anchor, trial.plain_steps, trial.candidate_level, trial.seed) == (10.0, "ode", "band", 1)
    # level_control judges every trial at the prior's level (the Tune metric reads cfg.evaluate)
    control = spaces["level_control"]
    assert control.grid_size() == 12
    trial = control.resolve({"align.level_anchor": 30.0, "align.seed": 2})
    assert (trial.evaluate.output_level, trial.align.level_anchor, trial.align.seed) == ("prior", 30.0, 2)


@pytest.mark.parametrize("text,fragment", [
    ("space: {align.k: {grid: [1, 2]}}", "space.align.k: value 1: align.k: Input should be greater than or equal to 2"),
    ("space: {align.kk: {grid: [2]}}", "space.align.kk: unknown key 'kk'"),
    ("space: {model.decoder_dim: {grid: [8, 16]}}", "space.model.decoder_dim: only align.*, distributed.* keys"),
    ("space: {nonsense: {grid: [1]}}", "space.nonsense: unknown key"),
    ("space: {align: {grid: [1]}}", "space.align: is a section"),
    ("space: {align.k: {normal: [2, 4]}}", "space.align.k: unknown distribution 'normal'"),
    ("space: {align.k: {grid: [2], choice: [4]}}", "space.align.k: must be one of"),
    ("space: {align.lr: {uniform: [0.1, 0.01]}}", "space.align.lr: uniform: low 0.1 must be below high 0.01"),
    ("space: {align.lr: {loguniform: [0.0, 0.01]}}", "space.align.lr: loguniform: low must be positive"),
    ("space: {align.kappa: {uniform: [0.5, 1.5]}}", "space.align.kappa: value 1.5: align.kappa"),
    ("space: {align.t_range: {grid: [[0.5, 0.5]]}}", "space.align.t_range: value [0.5, 0.5]: align.t_range"),
    ("space: {align.k: {grid: [2, 2]}}", "space.align.k: grid: repeated values"),
    ("space: {align.k: {grid: [2, 4]}}\ntune: {search: optuna}", "space.align.k: grid needs --search grid"),
    ("space: {align.k: {grid: [2, 4]}}\ntune: {shceduler: asha}", "tune.shceduler: unknown key"),
    ("space: {align.k: {grid: [2, 4]}}\ntune: {metric_fn: nocolon}",
     "tune.metric_fn: 'nocolon' must be module:function"),
    ("space: {align.k: {grid: [2, 4]}}\nbase: {align: {kk: 1}}", "base: align.kk: unknown key"),
    ("space: {align.k: {grid: [2, 4]}}\nspaces: {}", "spaces: unknown key"),
    ("space: {}", "space: needs at least one key"),
    ("space: [", "not valid YAML"),
])
def test_a_bad_space_is_a_one_line_error_naming_the_key(tmp_path, text, fragment):
    path = write_space(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert message.startswith(f"tune space {path}: ")


def test_the_default_metric_needs_the_judges_stage(tmp_path):
    path = write_space(tmp_path, "space: {align.k: {grid: [2, 4]}}\nbase: {stages: [data, pretrain, easpm]}\n")
    with pytest.raises(SpaceError, match=r"stages: the default metric \(rlhf_tts.tune:judge_emo_sim\) needs"):
        load_space(path)
    cheap = load_space(path, settings_overrides={"metric_fn": "rlhf_tts.tune:easpm_emotion_metrics"})
    assert cheap.base_config().stages == ["data", "pretrain", "easpm"]


def test_every_combination_of_grids_is_checked(tmp_path):
    """Each value is fine alone; one combination is not (sampler_steps=1 leaves no step in [0, 0.3])."""
    path = write_space(tmp_path, "base: {align: {t_range: [0.0, 1.0]}}\n"  # the tiny preset's [0, 0.3] fails alone
                                 "space:\n  align.sampler_steps: {grid: [1, 20]}\n"
                                 "  align.t_range: {grid: [[0.0, 0.3], [0.0, 1.0]]}\n")
    with pytest.raises(SpaceError, match=r"space: combination .*no sampler step"):
        load_space(path)


def test_cli_rejects_a_bad_space_with_exit_2_before_importing_ray(tmp_path):
    bad = write_space(tmp_path, "space: {align.k: {grid: [1, 2]}}")
    result = subprocess.run([sys.executable, "-m", "rlhf_tts.tune", "--space", str(bad), "preset=smoke"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"config error: tune space {bad}: space.align.k: value 1")
    assert result.stderr.strip().count("\n") == 0
    bad_override = subprocess.run([sys.executable, "-m", "rlhf_tts.tune", "--space", str(SPACES / "kappa.yaml"),
                                   "align.stepz=3"], capture_output=True, text=True, timeout=120)
    assert bad_override.returncode == 2 and "align.stepz: unknown key" in bad_override.stderr
    code = ("import sys; from rlhf_tts.tune import parse; "
            f"space, _ = parse(['--space', {str(SPACES / 'k_by_timestep.yaml')!r}, 'preset=smoke']); "
            "assert 'ray' not in sys.modules, 'validation imported ray'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


def test_flags_and_overrides_reach_the_sweep(tmp_path):
    from rlhf_tts.tune import parse

    space, args = parse(["--space", str(SPACES / "k_by_timestep.yaml"), "--scheduler", "none", "--num-samples", "3",
                         "--metric", "easpm_score", "--metric-fn", "rlhf_tts.tune:easpm_emotion_metrics",
                         "--metric-utterances", "2", "--report-every", "1", "--resume",
                         "preset=smoke", "align.steps=2", f"output_dir={tmp_path}"])
    s = space.settings
    assert (s.scheduler, s.num_samples, s.metric) == ("none", 3, "easpm_score")
    assert (s.metric_utterances, s.report_every) == (2, 1)
    assert s.metric_fn == "rlhf_tts.tune:easpm_emotion_metrics" and args.resume
    trial = space.resolve({"align.k": 4, "align.t_range": [0.0, 1.0]})
    assert (trial.preset, trial.align.steps, trial.align.k, trial.align.t_range) == ("smoke", 2, 4, (0.0, 1.0))
    assert trial.model.decoder_dim == 8  # the smoke preset's model, not tiny's


# ------------------------------------------------------------------------- space → Tune objects

def test_space_becomes_tune_objects_and_trial_configs_decode_back():
    from ray import tune

    from actors.tune_runner import _tune_config, decode, param_space

    grid = load_space(SPACES / "k_by_timestep.yaml", ["preset=smoke", "align.steps=5"], {"report_every": 2})
    params = param_space(grid)
    assert params["align.k"] == tune.grid_search([2, 4])
    assert params["align.t_range"] == tune.grid_search(["[0.0, 0.75]", "[0.0, 1.0]"])  # lists travel as JSON
    assert decode(grid, {"align.k": 4, "align.t_range": "[0.0, 1.0]", "other": 1}) == {
        "align.k": 4, "align.t_range": [0.0, 1.0]}
    config = _tune_config(grid, grid.base_config())
    assert config.metric == "emo_sim" and config.mode == "max" and config.scheduler._max_t == 3  # ceil(5 / 2)

    searched = load_space(SPACES / "objective.yaml")
    params = param_space(searched)
    assert params["align.objective"].categories == ["reward_matched", "spo_dpo"]
    assert (params["align.beta"].lower, params["align.beta"].upper) == (1.0, 50.0)
    assert type(params["align.lr"].get_sampler()).__name__ == "_LogUniform"
    assert type(params["align.threshold"].get_sampler()).__name__ == "_Uniform"
    config = _tune_config(searched, searched.base_config())
    assert type(config.search_alg).__name__ == "OptunaSearch" and config.num_samples == 16


def test_trial_placement_group_is_sized_from_the_trial_config(tmp_path):
    from actors.tune_runner import trial_resources

    path = write_space(tmp_path, "space: {distributed.num_rollout_actors: {grid: [1, 3]}}\n"
                                 "tune: {trial_cpus: 0.5}\n")
    space = load_space(path, ["distributed.placement_strategy=SPREAD",
                              "distributed.rollout_resources={rollout_node: 1}",
                              "distributed.learner_num_gpus=1", "distributed.rollout_num_gpus=0.25",
                              "distributed.rollout_num_cpus=1.5", "distributed.reward_num_cpus=1",
                              "distributed.learner_num_cpus=1"])
    factory = trial_resources(space, gpus=True)({"distributed.num_rollout_actors": 3})
    assert factory.strategy == "SPREAD"
    trial, learner, reward, *rollouts = factory.bundles
    assert trial == {"CPU": 0.5} and learner == {"CPU": 1.0, "GPU": 1.0} and reward == {"CPU": 1.0}
    assert rollouts == [{"CPU": 1.5, "GPU": 0.25, "rollout_node": 1.0}] * 3
    without_gpus = trial_resources(space, gpus=False)({"distributed.num_rollout_actors": 1})
    assert all("GPU" not in b for b in without_gpus.bundles) and len(without_gpus.bundles) == 4


# --------------------------------------------------------------------------------- the sweep

def shared_smoke_cache(tmp_path_factory) -> Path:
    """One smoke cache for the sweep and cluster tests of a session: the first builds it, the rest reuse it."""
    return tmp_path_factory.getbasetemp() / "cluster_smoke_cache"


@pytest.mark.slow
def test_four_trial_sweep_mlflow_runs_best_config_and_resume(tmp_path, tmp_path_factory, monkeypatch, capsys):
    import mlflow

    from actors.tune_runner import TAG_ENDED, TAG_PARENT
    from rlhf_tts.run import main as run_main
    from rlhf_tts.training.align import aligned_model_location
    from rlhf_tts.tune import main as tune_main

    ray_temp = tempfile.mkdtemp(prefix="rtn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("RAY_TMPDIR", ray_temp)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    out, cache = tmp_path / "sweep", shared_smoke_cache(tmp_path_factory)
    argv = ["--space", str(SPACES / "k_by_timestep.yaml"), "--metric-fn", "rlhf_tts.tune:easpm_emotion_metrics",
            "--metric", "easpm_score", "--metric-utterances", "2", "--report-every", "1",
            "preset=smoke", "stages=[data,pretrain,easpm]",  # this metric needs no judge: skip that stage
            "align.steps=2", "align.threshold=0.0", "align.lr=1e-3", f"output_dir={out}", f"cache_dir={cache}"]
    try:
        assert tune_main(argv) == 0

        sweep = out / "sweeps" / "k_by_timestep"
        trials = json.loads((sweep / "trials.json").read_text())
        assert len(trials) == 4 and all(t["error"] is None and math.isfinite(t["metric"]) for t in trials), trials
        assert sorted((t["params"]["align.k"], tuple(t["params"]["align.t_range"])) for t in trials) == [
            (2, (0.0, 0.75)), (2, (0.0, 1.0)), (4, (0.0, 0.75)), (4, (0.0, 1.0))]
        assert len({t["metric"] for t in trials}) > 1  # each trial aligned with its own k and range
        best = max(trials, key=lambda t: t["metric"])

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments)
        (parent,) = [r for r in runs if r.info.run_name == "sweep-k_by_timestep"]
        children = [r for r in runs if r.data.tags.get(TAG_PARENT) == parent.info.run_id]
        assert len(children) == 4 and len(runs) == 5
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["best/easpm_score"] == pytest.approx(best["metric"])
        assert {(r.data.params["align.k"], r.data.params["align.t_range"]) for r in children} == {
            ("2", "[0.0, 0.75]"), ("2", "[0.0, 1.0]"), ("4", "[0.0, 0.75]"), ("4", "[0.0, 1.0]")}
        for run in children:  # a trial ASHA stopped is KILLED and says so; none is left RUNNING or FAILED
            assert run.info.status in ("FINISHED", "KILLED"), run.info
            assert run.info.status == "FINISHED" or run.data.tags[TAG_ENDED] == "stopped early by the scheduler"
            assert "tune/easpm_score" in run.data.metrics
        assert any(r.info.status == "FINISHED" for r in children)

        best_file = sweep / "best_config.yaml"
        best_cfg = load_config(best_file)
        assert best_cfg.align.k == best["params"]["align.k"]
        assert list(best_cfg.align.timestep_range()) == best["params"]["align.t_range"]
        assert (best_cfg.preset, best_cfg.align.steps, best_cfg.align.lr) == ("smoke", 2, 1e-3)
        assert best_cfg.stages == ["data", "pretrain", "easpm", "align"]
        assert "python -m rlhf_tts.run --config" in best_file.read_text()
        printed = capsys.readouterr().out
        assert f"best config written to {best_file}" in printed
        best_child = next(r for r in children if json.loads(r.data.tags["rlhf_tts.tune.params"]) == best["params"])
        if best_child.info.status == "FINISHED":  # its aligned model is where `run --config` will look for it
            assert (aligned_model_location(best_cfg).final / "state.json").is_file()

        assert run_main(["--config", str(best_file)]) == 0
        runs = client.search_runs(experiments)
        (job,) = [r for r in runs if r.info.run_name == "run-smoke"]
        assert job.info.status == "FINISHED" and job.data.params["align.k"] == str(best["params"]["align.k"])
        assert (out / "align_summary.json").is_file()  # the run's align stage (the published model, or trained)

        # --resume restores the finished experiment (Tuner.restore): same parent run, no new trials.
        capsys.readouterr()
        assert tune_main([*argv, "--resume"]) == 0
        assert f"resuming Tune experiment {out / 'tune' / 'k_by_timestep'}" in capsys.readouterr().out
        runs = client.search_runs(experiments)
        assert [r.info.run_id for r in runs if r.info.run_name.startswith("sweep-")] == [parent.info.run_id]
        assert len([r for r in runs if r.data.tags.get(TAG_PARENT) == parent.info.run_id]) == 4
        assert yaml.safe_load(best_file.read_text())["align"]["k"] == best["params"]["align.k"]
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


@pytest.mark.slow
def test_the_default_metric_is_the_judges_emo_sim(tmp_path, tmp_path_factory):
    """`rlhf_tts.tune:judge_emo_sim`, the sweeps' default metric, scores a policy with the emotion judge
    (a one-epoch judge without vocoder augmentation here: the metric is under test, not the judge)."""
    from rlhf_tts.run import main as run_main
    from rlhf_tts.training.align import load_policy
    from rlhf_tts.tune import judge_emo_sim
    from rlhf_tts.tune_space import DEFAULT_METRIC_FN

    overrides = ["preset=smoke", f"output_dir={tmp_path}", f"cache_dir={shared_smoke_cache(tmp_path_factory)}",
                 "tracking.enabled=false", "judges.emotion_epochs=1", "judges.emotion_augment=0"]
    assert run_main([*overrides, "stages=[data,pretrain]"]) == 0  # cache hits after the other tests
    cfg = load_config(None, overrides)
    policy, vocab, _ = load_policy(cfg)
    metrics = judge_emo_sim(cfg, policy, vocab, 2)  # trains the judge on first use, like a sweep's trials
    assert DEFAULT_METRIC_FN == "rlhf_tts.tune:judge_emo_sim"
    assert set(metrics) >= {"emo_sim", "emotion_recall"} and metrics["n_utterances"] == 2
    assert -1.0 <= metrics["emo_sim"] <= 1.0 and 0.0 <= metrics["emotion_recall"] <= 1.0
