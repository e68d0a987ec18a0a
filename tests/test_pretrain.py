"""Pretraining: atomic checkpoints, exact resumption, the stage end to end, and synthesis."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import smoke_config
from rlhf_tts.checkpoint import latest_checkpoint, load_checkpoint
from rlhf_tts.config import load_config
from rlhf_tts.data.manifest import read_manifest
from rlhf_tts.training.data import load_utterances
from rlhf_tts.training.pretrain import learning_rate, run_pretraining


class Recorder:
    """Collects what the stage would log to MLflow."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(f"{artifact_path}/{path.name}")


def _losses(recorder: Recorder, steps) -> list[float]:
    return [recorder.metrics[s]["pretrain/total"] for s in steps]


def test_resume_gives_exactly_the_uninterrupted_losses(smoke_dataset, tmp_path):
    _, dataset = smoke_dataset
    overrides = ["pretrain.steps=8", "pretrain.checkpoint_every=4", "pretrain.log_every=1", "pretrain.sample_every=100",
                 "pretrain.flat_start_steps=6"]  # the resumed run crosses from the flat start to MAS
    straight = Recorder()
    cfg_a = smoke_config(tmp_path / "a", *overrides)
    base_a = run_pretraining(cfg_a, dataset.directory, tracker=straight)

    cfg_b = smoke_config(tmp_path / "b", *overrides)
    interrupted = Recorder()
    run_pretraining(cfg_b, dataset.directory, tracker=interrupted, stop_after=5)  # dies after step 5
    checkpoints = base_a.directory.parent / base_a.directory.name  # same key, other cache dir
    resumed_dir = tmp_path / "b" / "cache" / "pretrain" / checkpoints.name
    assert load_checkpoint(latest_checkpoint(resumed_dir / "checkpoints")).step == 4
    assert not (resumed_dir / "final").exists()
    resumed = Recorder()
    base_b = run_pretraining(cfg_b, dataset.directory, resume=True, tracker=resumed)
    assert _losses(resumed, range(5, 9)) == _losses(straight, range(5, 9))  # bit-identical
    # the learning-rate schedule is a function of the step: the resumed run is on the same schedule
    assert [resumed.metrics[s]["pretrain/lr"] for s in range(5, 9)] == [learning_rate(cfg_a, s - 1) for s in range(5, 9)]
    assert _losses(interrupted, range(1, 6)) == _losses(straight, range(1, 6))
    duration = [straight.metrics[s]["pretrain/duration"] for s in range(1, 9)]
    assert duration[:6] == [0.0] * 6 and min(duration[6:]) > 0  # durations are learnt from MAS's paths only
    weights_a = load_file(str(base_a.final / "tensors.safetensors"))
    weights_b = load_file(str(base_b.final / "tensors.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert any(a.startswith("pretrain/samples/") and a.endswith(".wav") for a in straight.artifacts)


def test_learning_rate_warms_up_then_follows_the_cosine():
    cfg = load_config(None, ["pretrain.steps=1000", "pretrain.warmup_steps=100", "pretrain.lr=1e-3",
                             "pretrain.lr_final_fraction=0.1"])
    lr = [learning_rate(cfg, s) for s in range(1000)]
    assert lr[0] == pytest.approx(1e-5) and lr[49] == pytest.approx(5e-4) and lr[99] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lr[:99], lr[1:100]))  # linear warm-up
    assert all(a >= b for a, b in zip(lr[100:], lr[101:]))  # then never rises
    assert lr[550] == pytest.approx((1e-3 + 1e-4) / 2)  # cosine half-way between peak and floor
    assert lr[-1] == pytest.approx(1e-4, rel=1e-3)
    constant = load_config(None, ["pretrain.lr_schedule=constant", "pretrain.warmup_steps=0", "pretrain.lr=2e-4"])
    assert {learning_rate(constant, s) for s in (0, 7, 1999)} == {2e-4}


def test_without_resume_an_interrupted_run_starts_again(smoke_dataset, tmp_path):
    _, dataset = smoke_dataset
    cfg = smoke_config(tmp_path, "pretrain.steps=6", "pretrain.checkpoint_every=2", "pretrain.log_every=1")
    run_pretraining(cfg, dataset.directory, stop_after=4)
    fresh = Recorder()
    run_pretraining(cfg, dataset.directory, tracker=fresh)
    assert sorted(fresh.metrics) == [1, 2, 3, 4, 5, 6]


def test_checkpoint_survives_a_crash_mid_write(smoke_dataset, tmp_path):
    _, dataset = smoke_dataset
    cfg = smoke_config(tmp_path, "pretrain.steps=4", "pretrain.checkpoint_every=2")
    base = run_pretraining(cfg, dataset.directory, stop_after=2)
    folder = base.directory / "checkpoints"
    good = latest_checkpoint(folder)
    # A crash while writing the next checkpoint leaves only a temporary folder behind.
    (folder / ".step-00000004.tmp-999").mkdir()
    (folder / ".step-00000004.tmp-999" / "tensors.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(folder) == good and load_checkpoint(good).step == 2


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    out = subprocess.run([sys.executable, "-m", "rlhf_tts.run", "preset=smoke", "stages=[data,pretrain]",
                          f"output_dir={tmp / 'out'}", f"cache_dir={tmp / 'cache'}", "tracking.enabled=false"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return tmp


def _synth(tmp, *args):
    return subprocess.run([sys.executable, "-m", "rlhf_tts.synthesize", *args, "preset=smoke",
                           f"cache_dir={tmp / 'cache'}", f"output_dir={tmp / 'out'}"],
                          capture_output=True, text=True, timeout=300)


def test_synthesize_every_emotion_and_speaker(trained_smoke, tmp_path):
    lines = [f"Hello there, my friend.\t{e}\t{s}" for e in ("Neutral", "Angry", "Happy", "Sad", "Surprise") for s in range(4)]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    result = _synth(trained_smoke, "--batch", str(tmp_path / "lines.txt"), "--out-dir", str(tmp_path / "wavs"), "--steps", "4")
    assert result.returncode == 0, result.stderr
    wavs = sorted((tmp_path / "wavs").glob("*.wav"))
    assert len(wavs) == 20
    for wav in wavs:
        audio, rate = sf.read(wav)
        assert rate == 22050 and len(audio) > 0.3 * rate and abs(audio).max() > 0


def test_synthesize_defaults_to_what_the_report_measured(trained_smoke, tmp_path):
    """No --steps/--temperature/--output-level: the config's evaluate.* (smoke: 4 steps, 1.2, decoder)."""
    def speak(name, *extra):
        result = _synth(trained_smoke, "--text", "Hello there.", "--out", str(tmp_path / name), *extra)
        assert result.returncode == 0, result.stderr
        return sf.read(tmp_path / name)[0]

    default = speak("default.wav")
    np.testing.assert_array_equal(default, speak("explicit.wav", "--steps", "4", "--temperature", "1.2"))
    assert not np.array_equal(default, speak("hotter.wav", "--temperature", "1.5"))
    assert not np.array_equal(default, speak("longer.wav", "--steps", "6"))
    # the output level: the config's evaluate.output_level unless --output-level says otherwise
    leveled = speak("prior.wav", "--output-level", "prior")
    assert not np.array_equal(default, leveled)
    np.testing.assert_array_equal(leveled, speak("prior_cfg.wav", "evaluate.output_level=prior"))


@pytest.mark.parametrize(("args", "message"), [
    (["--text", "Hello.", "--emotion", "Bored", "--out", "x.wav"], "unknown emotion"),
    (["--text", "Hello.", "--speaker", "99", "--out", "x.wav"], "unknown speaker"),
    (["--text", "   ", "--out", "x.wav"], "empty text"),
    (["--text", "Hello 🎉 there", "--out", "x.wav"], "cannot read"),
    (["--text", "Hello."], "--out"),
])
def test_synthesize_bad_input_is_one_line_exit_2(trained_smoke, tmp_path, args, message):
    result = _synth(trained_smoke, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "x.wav").exists()


def test_synthesize_without_a_model_says_how_to_get_one(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rlhf_tts.synthesize", "--text", "Hi.", "--out", str(tmp_path / "x.wav"),
                             "preset=smoke", f"cache_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no trained model" in result.stderr


def test_lock_in_check_is_computed_once_per_model_and_weights_every_utterance_once(trained_smoke, monkeypatch):
    from rlhf_tts.training import lock_in
    from rlhf_tts.training.data import collate
    from rlhf_tts.training.pretrain import BaseModel

    model_dir = next((trained_smoke / "cache" / "pretrain").iterdir())
    dataset_dir = next((trained_smoke / "cache" / "data").iterdir())
    model, vocab, _ = BaseModel(model_dir).load()
    assert (model_dir / lock_in.CHECK_FILE).is_file()  # the stage wrote it
    (model_dir / lock_in.CHECK_FILE).unlink()
    check = lock_in.check_alignment(BaseModel(model_dir), dataset_dir, threshold=0.4)
    assert check.split == "val" and check.utterances > 0 and check.duration_loss > 0 and check.prior_loss > 0
    assert (model_dir / lock_in.CHECK_FILE).is_file()

    def no_recompute(*args, **kwargs):
        raise AssertionError("the stored check should have been read")

    monkeypatch.setattr(lock_in, "held_out_losses", no_recompute)
    monkeypatch.setattr(BaseModel, "load", no_recompute)  # nor the model loaded
    judged = [lock_in.check_alignment(BaseModel(model_dir), dataset_dir, threshold=t)
              for t in (check.duration_loss * 0.9, check.duration_loss)]
    assert [c.locked_in for c in judged] == [False, True]  # another threshold re-judges the stored losses
    assert "did NOT lock in" in judged[0].message() and judged[1].duration_loss == check.duration_loss
    monkeypatch.undo()
    # The stored losses are the training formula's, on the held-out utterances.
    rows = [r for r in read_manifest(dataset_dir / "manifest.parquet").to_pylist() if r["split"] == "val"]
    utterances = load_utterances(rows, dataset_dir / "mels", vocab)
    whole = collate(utterances)
    with torch.no_grad():
        expected = model.compute_loss(whole.text, whole.mel, whole.mel_lengths, 8, decoder_items=0)
    duration, prior = lock_in.held_out_losses(model, utterances, batch_size=len(utterances))
    assert duration == pytest.approx(float(expected["duration"])) and prior == pytest.approx(float(expected["prior"]))
    assert lock_in.held_out_losses(model, utterances)[0] == pytest.approx(check.duration_loss, abs=1e-4)


def test_a_failed_lock_in_is_retried_under_a_derived_seed_and_later_stages_use_the_chosen_attempt(smoke_dataset, tmp_path):
    from rlhf_tts.training import lock_in
    from rlhf_tts.training.pretrain import base_model_attempts, base_model_location, choose_base_model, pretrain_key

    _, dataset = smoke_dataset
    cfg = smoke_config(tmp_path, "pretrain.steps=3", "pretrain.lock_in_retries=2", "pretrain.sample_every=100")
    assert pretrain_key(cfg, dataset.directory) == pretrain_key(  # retries and the check's line train nothing
        smoke_config(tmp_path, "pretrain.steps=3", "pretrain.sample_every=100", "pretrain.lock_in_max_duration_loss=9"),
        dataset.directory)
    first, second = (run_pretraining(cfg, dataset.directory, attempt=a) for a in (0, 1))
    assert first.directory != second.directory  # its own key and folder …
    a, b = (load_file(str(m.final / "tensors.safetensors")) for m in (first, second))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # … and another model (another initialisation and noise)
    attempts = base_model_attempts(cfg, dataset.directory)
    assert [m.directory for m in attempts[:2]] == [first.directory, second.directory] and len(attempts) == 3

    def store(model, duration):
        (model.directory / lock_in.CHECK_FILE).write_text(
            json.dumps({"duration_loss": duration, "prior_loss": 2.0, "utterances": 5, "split": "val"}))

    assert choose_base_model(attempts, 0.4) == first  # nothing checked yet: the first is the one to build
    store(first, 0.3)
    assert choose_base_model(attempts, 0.4) == first  # locked in: no retry
    store(first, 0.6)
    assert choose_base_model(attempts, 0.4) == second  # not locked in: the next attempt (to build, here built)
    store(second, 0.25)
    assert base_model_location(cfg) == second  # what easpm, align and evaluate load
    store(second, 0.5)
    assert choose_base_model(attempts, 0.4) == attempts[2]  # the third attempt is next
    attempts[2].directory.mkdir(parents=True)
    store(attempts[2], 0.9)
    assert choose_base_model(attempts, 0.4) == second  # none locked in: the closest


def test_mcd_and_cepstra():
    import numpy as np
    from scipy.fft import dct

    from rlhf_tts.eval.base_quality import level_offsets, mcd_db, mel_cepstra, spearman

    g = torch.Generator().manual_seed(0)
    mel = torch.randn(80, 50, generator=g, dtype=torch.float64) - 4
    expected = dct(mel.numpy(), type=2, axis=0)[1:25] / (2 * 80)  # scipy's unnormalised DCT-II is 2 Σ ...
    np.testing.assert_allclose(mel_cepstra(mel).numpy(), expected, atol=1e-10)
    assert mcd_db(mel, mel) == 0.0
    small = mcd_db(mel, mel + 0.1 * torch.randn(80, 50, generator=g, dtype=torch.float64))
    large = mcd_db(mel, mel + 0.5 * torch.randn(80, 50, generator=g, dtype=torch.float64))
    assert 0 < small < large
    assert mcd_db(mel, mel + 3.0) == pytest.approx(0.0, abs=1e-9)  # a gain change lives in c0, which is excluded
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0) and spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    louder_top = mel.clone()
    louder_top[40:] += 1.5
    assert level_offsets(mel, louder_top) == pytest.approx((0.0, 1.5))
    assert level_offsets(mel, mel - 0.5) == pytest.approx((-0.5, -0.5))


def test_base_quality_report_runs_on_a_trained_model(trained_smoke):
    import json

    result = subprocess.run([sys.executable, "-m", "rlhf_tts.eval.base_quality", "--steps", "4", "--split", "train", "--rate-splits", "train,val,test",
                             "--temperature", "1.3", "preset=smoke", f"cache_dir={trained_smoke / 'cache'}",
                             f"output_dir={trained_smoke / 'eval'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((trained_smoke / "eval" / "base_quality.json").read_text())
    assert report["n_utterances"] > 0 and report["mcd_db"] > 0 and report["mcd_mu_db"] > 0
    assert report["temperature"] == 1.3 and all(abs(report[k]) < 20 for k in ("level_offset_low", "level_offset_high"))
    assert set(report["speaking_rate_phones_per_s"]) == {"Neutral", "Angry", "Happy", "Sad", "Surprise"}
    assert all(r["corpus"] > 0 and r["model"] > 0 for r in report["speaking_rate_phones_per_s"].values())
    assert "Rate order" in (trained_smoke / "eval" / "base_quality.md").read_text()
