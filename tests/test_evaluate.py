"""The comparison report: its data structures (fast), and judges + report on the smoke corpus (slow).

The slow tests share one module fixture: the session's smoke corpus and base model, with judges
trained on it (an emotion judge trained a little longer than the smoke preset's, so that its
verdicts mean something on the 20 utterances it is checked on).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import smoke_config

JUDGE_OVERRIDES = ("judges.emotion_epochs=30", "judges.emotion_channels=32", "judges.emotion_embedding_dim=32",
                   "judges.asr_adapt_utterances=16", "judges.asr_adapt_iterations=1", "judges.threads=1",
                   "evaluate.threads=1")


class Recorder:
    """Collects what would go to MLflow."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(f"{artifact_path}/{Path(path).name}")


# ----------------------------------------------------------------------------- report structures (fast)


def _scores(n: int, seed: int, quality: float):
    """Synthetic per-utterance judgements: `quality` in [0, 1] moves every metric toward perfect."""
    from rlhf_tts.eval.scoring import UtteranceScores

    rng = np.random.default_rng(seed)
    emotions = [["Neutral", "Angry", "Happy", "Sad", "Surprise"][i % 5] for i in range(n)]
    targets = np.arange(n) % 5
    correct = rng.random(n) < quality
    predictions = np.where(correct, targets, (targets + 1) % 5)
    errors = np.stack([rng.binomial(8, 1 - quality, n), np.zeros(n), np.zeros(n), np.full(n, 8)], axis=1)
    vad = [rng.uniform(0, 1, (6, 3)) for _ in range(n)]
    predicted_vad = [t * quality + (1 - quality) * rng.uniform(0, 1, t.shape) for t in vad]
    return UtteranceScores(
        [f"u{i}" for i in range(n)], emotions, targets, np.clip(quality + 0.05 * rng.normal(size=n), -1, 1),
        predictions, np.eye(5)[predictions], predicted_vad, vad, errors, ["x"] * n,
        {"f0_corr": quality + 0.01 * rng.normal(size=n), "f0_rmse_st": (1 - quality) * 3 + rng.random(n),
         "energy_corr": np.full(n, quality), "energy_rmse_db": np.full(n, 1 - quality),
         "duration_error": np.full(n, 0.1)},
        {"sig": np.full(n, 3.0), "bak": np.full(n, 3.5), "ovrl": 2 + quality + 0.1 * rng.normal(size=n)})


def test_report_rows_estimates_markdown_json_and_table(tmp_path):
    from rlhf_tts.eval.report import Report, system_result

    class Sys:
        def __init__(self, name: str) -> None:
            self.name, self.kind, self.source = name, "test", "synthetic"

    emotions = ["Neutral", "Angry", "Happy", "Sad", "Surprise"]
    good = system_result(Sys("good"), _scores(60, 0, 0.9), emotions, 12.0, {"produce": 2.0, "judge": 10.0}, {}, 300, 0.95, 0)
    bad = system_result(Sys("bad"), _scores(60, 1, 0.3), emotions, 9.0, {"produce": 1.0, "judge": 8.0},
                        {"u99": "no such file"}, 300, 0.95, 1)
    report = Report("test", 60, emotions, 0.95, 300, [good, bad], {"vocoder": "griffin_lim"})
    for key in ("emo_sim", "emotion_recall", "f0_corr", "dnsmos_ovrl", "wvad_ccc"):
        assert report.system("good").value(key) > report.system("bad").value(key), key
        est = report.system("good").metrics[key]
        assert est.low <= est.value <= est.high and est.n == 60
    assert report.system("good").value("wer") < report.system("bad").value("wer")
    assert set(good.per_emotion) == set(emotions) and good.per_emotion["Sad"]["emotion_recall"].n == 12
    assert sum(map(sum, good.confusion)) == 60
    report.write(tmp_path)
    again = Report.load(tmp_path / "report.json")
    assert again.system("bad").metrics["wer"] == bad.metrics["wer"] and again.system("bad").missing == {"u99": "no such file"}
    markdown = (tmp_path / "report.md").read_text()
    assert "| good | 60 |" in markdown and "## Per emotion" in markdown and "1× no such file" in markdown
    console = Console(file=io.StringIO(), width=80)
    from rlhf_tts.eval.evaluate_stage import print_wide

    print_wide(console, report.table())
    text = console.file.getvalue()
    assert "good" in text and "EmoSIM" in text and max(len(line) for line in text.splitlines()) > 80  # not folded
    recorder = Recorder()
    report.log(recorder, tmp_path)
    assert recorder.metrics["eval/good/emo_sim"] == good.metrics["emo_sim"].value
    assert "eval/bad/wer_low" in recorder.metrics and "eval/good/sad/emotion_recall" in recorder.metrics
    assert "evaluate/report.md" in recorder.artifacts


def test_evaluate_cli_rejects_bad_input_with_one_line(tmp_path, capsys):
    from rlhf_tts.evaluate import main

    assert main(["--system", "nameonly", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: --system") and "\n" not in err
    assert main(["evaluate.vocoder=hifigan", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == "config error: evaluate.hifigan: evaluate.vocoder=hifigan needs evaluate.hifigan=PATH"
    assert main(["evaluate.bootstrap=3", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("config error: evaluate.bootstrap")


# ----------------------------------------------------------------------------- on the smoke corpus (slow)


@pytest.fixture(scope="module")
def judged(smoke_dataset, tmp_path_factory):
    """Smoke corpus + base model (session cache) and judges trained on it, in this module's cache."""
    from rlhf_tts.eval.judges_stage import run_judges_stage
    from rlhf_tts.training.pretrain import run_pretraining

    session_cfg, dataset = smoke_dataset
    run_pretraining(session_cfg, dataset.directory)  # a lookup when another test made it
    tmp = tmp_path_factory.mktemp("judged")
    cache = tmp / "cache"
    cache.mkdir()
    for name in ("corpus", "data", "pretrain"):
        (cache / name).symlink_to(Path(session_cfg.cache_dir) / name)
    cfg = smoke_config(tmp, *JUDGE_OVERRIDES)
    console = Console(file=io.StringIO(), width=120)
    recorder = Recorder()
    summary = run_judges_stage(cfg, console, recorder)
    return cfg, summary, recorder, console.file.getvalue()


@pytest.mark.slow
def test_judges_stage_trains_caches_and_checks(judged):
    from rlhf_tts.eval.asr import domain_asr_location
    from rlhf_tts.eval.judges.emotion import emotion_judge_location
    from rlhf_tts.eval.judges_stage import run_judges_stage

    cfg, summary, recorder, printed = judged
    checks = summary["checks"]
    assert checks["split"] == "test" and checks["n_utterances"] > 0
    assert 0 <= checks["emotion_recall"] <= 1 and 0 <= checks["emotion_recall_griffin_lim"] <= 1
    assert checks["wer"] is not None and summary["recognizer"]["adaptation"]["clips"] == 16
    assert "Recall drop through the vocoder" in printed and "WER (pocketsphinx)" in printed
    assert (Path(cfg.output_dir) / "judges_report.md").is_file()
    assert "judges/check/emotion_recall_griffin_lim" in recorder.metrics
    judge = emotion_judge_location(cfg)
    assert (judge.directory.parent.parent.parent / "judges").exists() and judge.exists()
    stamp = (judge.final / "state.json").stat().st_mtime_ns
    again = run_judges_stage(cfg, Console(file=io.StringIO()), Recorder())  # everything cached: nothing retrains
    assert again["checks"] == checks and (judge.final / "state.json").stat().st_mtime_ns == stamp
    other = smoke_config(Path(cfg.output_dir).parent, *JUDGE_OVERRIDES, "judges.emotion_epochs=16")
    assert emotion_judge_location(other).directory != judge.directory  # the cache is keyed by the config
    assert domain_asr_location(other).directory == domain_asr_location(cfg).directory  # the recogniser is not


class SwappedRecordings:
    """Each utterance's recording replaced by the same speaker saying the same sentence in another
    emotion: the emotion labels shuffled, everything else (voice, text, audio path) unchanged."""

    kind, source = "test", "recordings with shuffled emotions"

    def __init__(self, cfg, pool) -> None:  # noqa: ANN001
        from rlhf_tts.eval.systems import DegradedSystem

        self.name, self.cfg = "shuffled emotions", cfg
        self.swapper = DegradedSystem(cfg.features, None, pool, wrong_emotion=True, snr_db=None)

    def run(self, utterances, progress=None):  # noqa: ANN001, ANN201
        from rlhf_tts.eval.systems import SystemOutput, SystemRun, load_recording

        swapped = {u.utt_id: self.swapper.swap(u) for u in utterances}
        assert all(s.emotion != u.emotion and s.text == u.text for u, s in zip(utterances, swapped.values()))
        return SystemRun({k: SystemOutput(k, load_recording(s, self.cfg.features.sample_rate), s.mel, s.word_frame_spans)
                          for k, s in swapped.items()})


@pytest.mark.slow
def test_shuffled_emotion_labels_lower_emo_sim_and_recall(judged):
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.corpus import load_split
    from rlhf_tts.eval.judges_stage import load_judges
    from rlhf_tts.eval.report import evaluate_systems
    from rlhf_tts.eval.systems import RecordingsSystem

    cfg = judged[0]
    judges = load_judges(cfg, asr=False, dnsmos=False, build=False)
    dataset, _ = dataset_location(cfg)
    pool = load_split(dataset, "train", None, cfg.features)
    utterances = pool[::3]  # the judge has learnt these: a clear signal to destroy
    report = evaluate_systems([RecordingsSystem(cfg.features), SwappedRecordings(cfg, pool)], utterances, judges,
                              split="train", resamples=200)
    right, wrong = report.system("recordings"), report.system("shuffled emotions")
    assert right.value("emotion_recall") > 0.6 and right.value("emo_sim") > 0.99
    assert wrong.value("emo_sim") < right.value("emo_sim") - 0.2
    assert wrong.value("emotion_recall") < right.value("emotion_recall") - 0.3
    assert wrong.metrics["emo_sim"].high < right.metrics["emo_sim"].low  # the CIs separate them


@pytest.mark.slow
def test_evaluate_cli_reports_systems_with_cis_and_ranks_the_degraded_one_last(judged, capsys):
    from rlhf_tts.evaluate import main

    cfg = judged[0]
    out = Path(cfg.output_dir) / "cli"
    wavs = out / "wavs"
    wavs.mkdir(parents=True)
    args = [f"output_dir={cfg.output_dir}", f"cache_dir={cfg.cache_dir}", "preset=smoke", "tracking.enabled=false",
            *JUDGE_OVERRIDES, "evaluate.split=train", "evaluate.max_utts=10", "evaluate.include_recordings=false"]
    assert main(["--degraded", "--no-aligned", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in report["systems"]]
    assert names == ["ground-truth resynthesis", "base model", "degraded"]
    rows = {s["name"]: s for s in report["systems"]}
    value = lambda name, key: rows[name]["metrics"][key]["value"]  # noqa: E731
    for key in ("emo_sim", "emotion_recall", "dnsmos_ovrl"):
        assert value("degraded", key) < value("ground-truth resynthesis", key), key
    assert value("degraded", "wer") > value("ground-truth resynthesis", "wer")
    for row in report["systems"]:
        assert row["n"] == 10 and row["seconds"] > 0
        for est in row["metrics"].values():
            if est["value"] is not None and est["low"] is not None:
                assert est["low"] - 1e-9 <= est["value"] <= est["high"] + 1e-9
    assert "seconds per system" in printed and "base model" in printed
    # rows after the base model are also compared with it on the same utterances (paired bootstrap)
    assert report["baseline"] == "base model" and list(report["paired"]) == ["degraded"]
    paired = report["paired"]["degraded"]["emo_sim"]
    assert paired["value"] == pytest.approx(value("degraded", "emo_sim") - value("base model", "emo_sim"))
    assert paired["low"] <= paired["value"] <= paired["high"] and "minus base model" in printed
    assert (out / "report.md").is_file() and (out / "per_utterance.csv").is_file()
    n_emotions = len(rows["base model"]["per_emotion"])  # one example utterance per emotion present
    assert (out / "plots" / "confusion.png").is_file() and len(list((out / "plots").glob("*_*.png"))) == n_emotions
    assert len(list((out / "examples").rglob("*__base_model.wav"))) == n_emotions
    # a folder of wavs is a system too: give it the base model's examples only, the rest is listed as missing
    for path in (out / "examples").rglob("*__base_model.wav"):
        (wavs / (path.name.split("__")[0] + ".wav")).write_bytes(path.read_bytes())
    assert main(["--no-base", "--no-aligned", "--system", f"folder={wavs}", "--out", str(out / "again"), *args,
                 "evaluate.dnsmos=false", "evaluate.wer=false"]) == 0
    folder = json.loads((out / "again" / "report.json").read_text())["systems"][1]
    assert folder["name"] == "folder" and folder["n"] + len(folder["missing"]) == 10
    assert main(["--system", f"nope={out / 'missing'}", *args]) == 2
    assert "is neither a model folder" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_stage_of_the_main_job_prints_the_comparison(judged, capsys):
    from rlhf_tts.run import main

    cfg = judged[0]
    out = Path(cfg.output_dir) / "job"
    assert main([f"output_dir={out}", f"cache_dir={cfg.cache_dir}", "preset=smoke", "tracking.enabled=false",
                 "stages=[evaluate]", *JUDGE_OVERRIDES, "evaluate.max_utts=6", "evaluate.dnsmos=false",
                 "evaluate.include_recordings=false"]) == 0
    printed = capsys.readouterr().out
    assert "ground-truth resynthesis" in printed and "base model" in printed and "no aligned model" in printed
    report = json.loads((out / "evaluate" / "report.json").read_text())
    assert [s["name"] for s in report["systems"]] == ["ground-truth resynthesis", "base model"]
    # Same corpus, models, judges and evaluate.*: the second run reuses the report; another setting recomputes.
    args = [f"output_dir={out}", f"cache_dir={cfg.cache_dir}", "preset=smoke", "tracking.enabled=false",
            "stages=[evaluate]", *JUDGE_OVERRIDES, "evaluate.dnsmos=false", "evaluate.include_recordings=false"]
    (out / "evaluate" / "report.md").unlink()
    assert main([*args, "evaluate.max_utts=6"]) == 0
    printed = capsys.readouterr().out
    assert "evaluation cache" in printed and "no aligned model" in printed and "base model" in printed
    assert json.loads((out / "evaluate" / "report.json").read_text()) == report and (out / "evaluate" / "report.md").is_file()
    assert main([*args, "evaluate.max_utts=4"]) == 0
    assert "evaluation cache" not in capsys.readouterr().out
    assert json.loads((out / "evaluate" / "report.json").read_text())["n_utterances"] == 4


@pytest.mark.slow
def test_tune_metric_scores_a_policy_with_the_judge(judged):
    from rlhf_tts.eval.tune_metric import policy_emotion_metrics
    from rlhf_tts.training.pretrain import base_model_location

    cfg = judged[0]
    policy, vocab, _ = base_model_location(cfg).load()
    policy.train()
    metrics = policy_emotion_metrics(cfg, policy, vocab, 5)
    assert set(metrics) >= {"emo_sim", "emotion_recall"} and metrics["n_utterances"] == 5
    assert -1 <= metrics["emo_sim"] <= 1 and 0 <= metrics["emotion_recall"] <= 1
    assert policy.training  # left as it was found
    assert policy_emotion_metrics(cfg, policy, vocab, 5) == metrics  # fixed seed: trials compare


# ----------------------------------------------------------------------------- per-system row cache


def test_system_cache_round_trips_a_row_and_keys_on_context_place_and_system(tmp_path):
    from rlhf_tts.eval.system_cache import CachedRow, SystemCache

    class Cacheable:
        name = "base model"

        def __init__(self, key):
            self.key = key

        def cache_key(self):
            return self.key

    class Folder:  # no cache_key: never cached
        name = "wavs"

    cache = SystemCache(tmp_path, "context-a")
    audio, mel, f0 = np.arange(5, dtype=np.float32), np.ones((2, 3), np.float32), np.array([0.0, 110.0])
    row = CachedRow({"name": "base model", "n": 2}, [{"utt_id": "u0", "emo_sim": np.float32(0.5)}],
                    {"u0": (audio, mel, f0), "u1": (audio, None, None)})
    key = cache.key(Cacheable("weights-1"), 2)
    assert cache.load(key) is None
    cache.save(key, row)
    back = cache.load(key)
    assert back.result == row.result and back.rows == [{"utt_id": "u0", "emo_sim": 0.5}]
    assert np.array_equal(back.examples["u0"][0], audio) and np.array_equal(back.examples["u0"][1], mel)
    assert back.examples["u1"][1] is None and back.examples["u1"][2] is None
    # anything the row depends on gives another key: the context, the place in the line-up, the system
    assert cache.key(Cacheable("weights-2"), 2) != key
    assert cache.key(Cacheable("weights-1"), 3) != key
    assert SystemCache(tmp_path, "context-b").key(Cacheable("weights-1"), 2) != key
    assert cache.key(Folder(), 0) is None and cache.key(Cacheable(None), 0) is None
    (tmp_path / key / "row.json").write_text("{truncated")
    assert cache.load(key) is None  # unreadable: produced again, never an error


def test_a_model_systems_cache_key_changes_when_its_weights_are_saved_again(tmp_path):
    import os
    import time

    from rlhf_tts.eval.system_cache import file_identity

    weights = tmp_path / "tensors.safetensors"
    weights.write_bytes(b"a" * 10)
    first = file_identity(weights)
    time.sleep(0.01)
    weights.write_bytes(b"b" * 10)
    os.utime(weights, ns=(first[2] + 1_000_000, first[2] + 1_000_000))
    assert file_identity(weights) != first and file_identity(tmp_path / "missing") is None


def test_model_synthesis_uses_the_configured_sampler():
    """`evaluate.stochastic` picks the sampler: the probability-flow ODE (default) or the stochastic
    steps of the policy EASPO trains, each deterministic under `evaluate.seed`."""
    import torch

    from rlhf_tts.config import load_config
    from rlhf_tts.data.frontend import UNK, SymbolTable
    from rlhf_tts.eval.corpus import EvalUtterance
    from rlhf_tts.eval.systems import synthesize_utterances, utterance_generator, utterance_text_batch
    from rlhf_tts.training.data import Vocabulary
    from test_gradtts import tiny_model

    model = tiny_model()
    vocab = Vocabulary(SymbolTable((UNK, *(f"p{i}" for i in range(1, 40))), 1), ("s0", "s1", "s2"))
    utterances = [EvalUtterance(f"u{i}", "s1", emotion, "x", np.zeros((80, 30), np.float32), Path("x.wav"), None, None,
                                {"phonemes": [f"p{3 + i}", "p7", "p9", "p4", "p8"], "word_spans": [[0, 2], [2, 5]]})
                  for i, emotion in enumerate(("Sad", "Angry"))]
    features = load_config(None, []).features

    def mels(*overrides):
        ev = load_config(None, ["evaluate.sampler_steps=4", *overrides]).evaluate
        return synthesize_utterances(model, vocab, utterances, ev, features, workers=1)[0]

    sde, sde_again, ode = mels("evaluate.stochastic=true"), mels("evaluate.stochastic=true"), mels()
    assert not load_config(None, []).evaluate.stochastic
    assert all(np.array_equal(sde[u], sde_again[u]) for u in sde)
    assert all(not np.allclose(sde[u], ode[u]) for u in sde)
    # the ODE path is exactly the model's deterministic sampler, utterance by utterance, each with its own noise
    for u in utterances:
        text = utterance_text_batch([u], [vocab.symbols.ids(u.row["phonemes"])], vocab)
        prior = model.encode(text)
        generator = utterance_generator(load_config(None, []).evaluate.seed, u.utt_id)
        expected = model.sample(prior, 4, load_config(None, []).evaluate.temperature, False, 1.0,
                                [generator])[0, :, : int(prior.lengths[0])]
        assert ode[u.utt_id].shape == tuple(expected.shape)
        assert float(np.abs(ode[u.utt_id] - expected.numpy()).max()) <= 1e-4 * float(np.abs(expected.numpy()).max())
    # evaluate.output_level=prior reaches the synthesis: each band's level is the utterance's mu's
    leveled = mels("evaluate.output_level=prior")
    for u in utterances:
        prior = model.encode(utterance_text_batch([u], [vocab.symbols.ids(u.row["phonemes"])], vocab))
        mu_level = prior.mu[0, :, : int(prior.lengths[0])].mean(-1).detach().numpy()
        assert np.allclose(leveled[u.utt_id].mean(-1), mu_level, atol=1e-4)
        assert not np.allclose(ode[u.utt_id].mean(-1), mu_level, atol=1e-2)


@pytest.mark.parametrize("stochastic", [False, True])
def test_an_utterances_sample_does_not_depend_on_batching_workers_or_the_rest_of_the_split(stochastic):
    """Per-utterance noise: one utterance alone, in a padded batch with others, or synthesised in two
    one-thread worker processes, comes out the same (up to float rounding across thread counts)."""
    from rlhf_tts.config import load_config
    from rlhf_tts.data.frontend import UNK, SymbolTable
    from rlhf_tts.eval.corpus import EvalUtterance
    from rlhf_tts.eval.systems import synthesize_utterances
    from rlhf_tts.training.data import Vocabulary
    from test_gradtts import tiny_model

    model = tiny_model()
    vocab = Vocabulary(SymbolTable((UNK, *(f"p{i}" for i in range(1, 40))), 1), ("s0", "s1", "s2"))
    utterances = [EvalUtterance(f"u{i}", "s1", emotion, "x", np.zeros((80, 30), np.float32), Path("x.wav"), None, None,
                                {"phonemes": [f"p{3 + j}" for j in range(3 + 2 * i)], "word_spans": [[0, 2], [2, 3]]})
                  for i, emotion in enumerate(("Sad", "Angry", "Happy", "Neutral"))]
    features = load_config(None, []).features

    def mels(subset, workers, *overrides):
        ev = load_config(None, ["evaluate.sampler_steps=3", f"evaluate.stochastic={stochastic}", *overrides]).evaluate
        return synthesize_utterances(model, vocab, subset, ev, features, workers=workers)[0]

    alone = {u.utt_id: mels([u], 1)[u.utt_id] for u in utterances}
    batched = mels(utterances, 1, "evaluate.synthesis_batch=4")
    in_workers = mels(utterances, 2)
    assert len({a.shape for a in alone.values()}) > 1  # the batch really was padded
    for name, got in (("batched", batched), ("two workers", in_workers)):
        assert sorted(got) == sorted(alone), name
        for utt_id, mel in alone.items():
            assert got[utt_id].shape == mel.shape, name
            assert float(np.abs(got[utt_id] - mel).max()) <= 1e-4 * (1 + float(np.abs(mel).max())), (name, utt_id)
    other_seed = mels(utterances[:1], 1, "evaluate.seed=7")
    assert not np.allclose(other_seed["u0"], alone["u0"])


@pytest.mark.slow
def test_a_cached_row_is_neither_produced_nor_judged_again_and_reads_back_the_same(judged, tmp_path):
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.corpus import load_split
    from rlhf_tts.eval.judges_stage import load_judges
    from rlhf_tts.eval.report import evaluate_systems
    from rlhf_tts.eval.system_cache import SystemCache
    from rlhf_tts.eval.systems import RecordingsSystem

    class CountingRecordings(RecordingsSystem):
        runs = 0

        def run(self, utterances, progress=None):  # noqa: ANN001, ANN201
            CountingRecordings.runs += 1
            return super().run(utterances, progress)

    cfg = judged[0]
    judges = load_judges(cfg, asr=False, dnsmos=False, build=False)
    dataset, _ = dataset_location(cfg)
    utterances = load_split(dataset, "train", None, cfg.features)[::4]
    cache = SystemCache(tmp_path / "rows", "ctx")
    first = evaluate_systems([CountingRecordings(cfg.features)], utterances, judges, split="train", resamples=50,
                             out_dir=tmp_path / "one", cache=cache)
    second = evaluate_systems([CountingRecordings(cfg.features)], utterances, judges, split="train", resamples=50,
                              out_dir=tmp_path / "two", cache=cache)
    assert CountingRecordings.runs == 1 and second.info["reused_rows"] == ["recordings"]
    assert second.systems[0].to_json() == first.systems[0].to_json()
    assert (tmp_path / "two" / "per_utterance.csv").read_text() == (tmp_path / "one" / "per_utterance.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "two" / "plots").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "plots").iterdir())
    assert len(list((tmp_path / "two" / "examples").rglob("*.wav"))) == len(list((tmp_path / "one" / "examples").rglob("*.wav")))
    evaluate_systems([CountingRecordings(cfg.features)], utterances, judges, split="train", resamples=50,
                     cache=SystemCache(tmp_path / "rows", "other judges"))
    assert CountingRecordings.runs == 2
    # a model row is keyed by the sampler settings (which the shared context leaves out), a worker count is not
    from rlhf_tts.eval.systems import ModelSystem
    from rlhf_tts.models.vocoder import GriffinLimVocoder
    from rlhf_tts.training.pretrain import base_model_location

    def model_key(**evaluate: object) -> str:
        run_cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update=evaluate)})
        return ModelSystem("base model", base_model_location(cfg).directory, run_cfg,
                           GriffinLimVocoder(cfg.features)).cache_key()

    assert model_key() == model_key(synthesis_workers=3)
    assert model_key() != model_key(temperature=1.5) and model_key() != model_key(sampler_steps=7)
    assert model_key() != model_key(output_level="prior")


def test_shared_tasks_split_between_the_background_thread_and_the_caller_keep_their_order():
    """DNSMOS's queue: the background thread starts at the front; once the caller is done with its own
    work it takes the unstarted calls from the back; results come back in submission order."""
    import threading
    import time

    from rlhf_tts.eval.scoring import SharedTasks

    ran_on: dict[int, int] = {}

    def call(i: int) -> int:
        ran_on[i] = threading.get_ident()
        time.sleep(0.02)
        return i * i

    tasks = SharedTasks()
    for i in range(40):
        tasks.submit(call, i)
    time.sleep(0.1)  # the caller's own work: the background thread gets through a few calls meanwhile
    assert tasks.results() == [i * i for i in range(40)]
    me = threading.get_ident()
    mine = sorted(i for i, ident in ran_on.items() if ident == me)
    theirs = sorted(i for i, ident in ran_on.items() if ident != me)
    assert len(ran_on) == 40 and mine and theirs
    assert max(theirs) < min(mine)  # the thread kept the front, the caller took the back
    assert not tasks.pool._threads or not any(t.is_alive() for t in tasks.pool._threads)


def test_row_cache_context_ignores_speed_settings_and_leaves_sampler_settings_to_model_rows(tmp_path):
    from rlhf_tts.config import load_config
    from rlhf_tts.eval.evaluate_stage import system_cache

    def context(*overrides: str) -> str:
        return system_cache(load_config(None, [f"cache_dir={tmp_path}", *overrides]), []).context

    base = context()
    for same in ("evaluate.synthesis_workers=3", "judges.workers=2", "judges.threads=1", "evaluate.threads=1",
                 "evaluate.temperature=1.5", "evaluate.sampler_steps=20", "evaluate.synthesis_batch=4"):
        assert context(same) == base, same
    for different in ("evaluate.seed=1", "evaluate.bootstrap=500", "evaluate.dnsmos_max_utts=10",
                      "judges.asr_lm_weight=8"):
        assert context(different) != base, different
