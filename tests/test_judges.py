"""The evaluation judges: metrics, recogniser, adaptation, prosody, DNSMOS, emotion judge; planted faults.

Fast tests use small synthetic inputs or a few eSpeak sentences; the judges trained on the smoke
corpus are in tests/test_evaluate.py (marked slow).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = ["The cat sat on the mat.", "Please send the hat to the library.", "My cousins wait in the hall every day.",
             "David returned that knife near the bridge.", "Will Kate return her umbrella in the morning?"]


def espeak(text: str, voice: str = "en-us") -> tuple[np.ndarray, int]:
    from rlhf_tts.data.espeak import Espeak

    out = Espeak.instance().synthesize(text, voice)
    return out.audio.astype(np.float32) / 32768.0, out.sample_rate


def add_noise(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    power = float(np.mean(audio.astype(np.float64) ** 2))
    noisy = audio + rng.standard_normal(len(audio)).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
    return (noisy / max(1.0, float(np.abs(noisy).max()))).astype(np.float32)


# ----------------------------------------------------------------------------- the never-a-reward rule


#: Figure helpers, no judge inside (checked below): training code may draw with them.
NOT_JUDGES = {"rlhf_tts.eval.plots"}


def eval_imports(path: Path) -> list[str]:
    """Judge modules (rlhf_tts.eval, figures aside) a file imports, statically or through an import string."""
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value.split(":")[0]]
        found += [n for n in names if (n == "rlhf_tts.eval" or n.startswith("rlhf_tts.eval."))
                  and n not in NOT_JUDGES and not any(n.startswith(m + ".") for m in NOT_JUDGES)]
    return found


def test_no_training_code_imports_the_judges(tmp_path):
    offenders = {}
    for folder in ("rlhf_tts/algos", "rlhf_tts/rewards", "actors"):
        for path in (ROOT / folder).rglob("*.py"):
            if eval_imports(path):
                offenders[str(path.relative_to(ROOT))] = eval_imports(path)
    assert not offenders, offenders
    assert not eval_imports(ROOT / "rlhf_tts" / "eval" / "plots.py")  # the exception drags no judge in
    # the check itself sees every form of import
    bad = tmp_path / "bad.py"
    bad.write_text("from rlhf_tts.eval.judges.emotion import EmotionJudge\nimport rlhf_tts.eval.asr\n"
                   "from rlhf_tts import eval\nimportlib.import_module('rlhf_tts.eval.scoring')\n")
    assert {"rlhf_tts.eval.judges.emotion", "rlhf_tts.eval.asr", "rlhf_tts.eval", "rlhf_tts.eval.scoring"} <= set(eval_imports(bad))
    fine = tmp_path / "fine.py"
    fine.write_text("from rlhf_tts.eval.plots import mel_figure\nimport rlhf_tts.models\n")
    assert eval_imports(fine) == []


# ----------------------------------------------------------------------------- metrics


def test_metrics_macro_recall_ratio_and_bootstrap():
    from rlhf_tts.eval.metrics import (bootstrap_weights, estimate, macro_recall, macro_recall_metric,
                                       mean_metric, ratio_metric)

    targets = np.array([0, 0, 0, 0, 1, 2])
    predictions = np.array([0, 0, 0, 1, 1, 0])
    assert macro_recall(targets, predictions, 3) == pytest.approx((3 / 4 + 1 + 0) / 3)  # macro, not micro (4/6)
    wer = ratio_metric("wer", [1, 0, 3], [10, 10, 2])
    assert float(wer.over()) == pytest.approx(4 / 22)  # total edits over total words, not a mean of rates
    mean = mean_metric("m", [1.0, np.nan, 3.0])
    assert float(mean.over()) == pytest.approx(2.0)  # NaN left out, not counted as zero
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.2, 20), rng.normal(0.5, 0.2, 2000)
    est_small = estimate(mean_metric("x", small), bootstrap_weights(20, 500, 1))
    est_large = estimate(mean_metric("x", large), bootstrap_weights(2000, 500, 1))
    assert est_small.low < est_small.value < est_small.high
    assert est_large.high - est_large.low < (est_small.high - est_small.low) / 4  # ~sqrt(100) narrower
    recall = estimate(macro_recall_metric("r", targets, predictions, 3), bootstrap_weights(6, 300, 2))
    assert 0.0 <= recall.low <= recall.value <= recall.high <= 1.0


def test_pooled_ccc_is_one_for_perfect_predictions_and_drops_when_shuffled():
    from rlhf_tts.eval.metrics import ccc, pooled_ccc_metric

    rng = np.random.default_rng(0)
    targets = [rng.uniform(0, 1, (n, 3)) for n in (5, 7, 6, 9)]
    assert float(pooled_ccc_metric("c", targets, targets).over()) == pytest.approx(1.0, abs=1e-6)
    shuffled = [t[rng.permutation(len(t))] for t in targets]
    assert float(pooled_ccc_metric("c", shuffled, targets).over()) < 0.5
    biased = [t + 0.3 for t in targets]  # CCC, unlike correlation, punishes an offset
    assert float(pooled_ccc_metric("c", biased, targets).over()) < 0.8
    assert ccc(np.arange(5.0), np.arange(5.0)) == pytest.approx(1.0)


def test_shuffled_emotion_labels_lower_emo_sim_and_recall_of_judged_embeddings():
    """Metric level: embeddings that cluster by emotion, scored against right vs shuffled references."""
    from rlhf_tts.eval.metrics import cosine_rows, macro_recall

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    labels = np.repeat(np.arange(5), 8)
    generated = centres[labels] + 0.3 * rng.normal(size=(40, 16))
    references = centres[labels] + 0.3 * rng.normal(size=(40, 16))
    predicted = np.argmax(generated @ centres.T, axis=1)
    shuffled = rng.permutation(40)
    assert cosine_rows(generated, references).mean() > cosine_rows(generated, references[shuffled]).mean() + 0.3
    assert macro_recall(labels, predicted, 5) > macro_recall(labels[shuffled], predicted, 5) + 0.3


# ----------------------------------------------------------------------------- recogniser


def test_spoken_words_normalisation_reads_numbers_like_espeak():
    from rlhf_tts.eval.asr import spoken_words, word_errors

    assert spoken_words("Robert lived at 181 Bridge Street!") == "robert lived at one hundred eighty one bridge street".split()
    assert spoken_words("In 1985, it's 2010.") == "in nineteen hundred eighty five it's two thousand ten".split()
    errors = word_errors("The cat, it's 7.", "the cat its seven")
    assert (errors.substitutions, errors.deletions, errors.insertions, errors.reference_words) == (1, 0, 0, 4)
    assert word_errors("one two", "").deletions == 2


def test_domain_lm_is_a_normalised_backoff_model():
    from rlhf_tts.eval.asr import ArpaModel, build_arpa

    sentences = [s.lower().split() for s in ("the cat sat", "the cat ran", "a dog sat", "the dog ran fast")]
    vocabulary = {"the", "cat", "sat", "ran", "a", "dog", "fast", "unseen"}
    model = ArpaModel.parse(build_arpa(sentences, vocabulary, order=3))
    for history in ([], ["the"], ["<s>", "the"], ["the", "cat"], ["dog", "ran"]):
        total = sum(10 ** model.log10_prob(w, history) for w in vocabulary | {"</s>"})
        assert total == pytest.approx(1.0, abs=1e-4), history
    assert model.log10_prob("unseen", ["the"]) > -10  # a vocabulary word never seen keeps some mass
    assert model.log10_prob("cat", ["<s>", "the"]) > model.log10_prob("fast", ["<s>", "the"])


@pytest.fixture(scope="module")
def recogniser(tmp_path_factory):
    from rlhf_tts.eval.asr import PocketSphinxRecognizer, write_domain_lm

    lm = write_domain_lm(tmp_path_factory.mktemp("lm") / "lm", SENTENCES, SENTENCES, 3)
    clips = [espeak(s) for s in SENTENCES]
    return PocketSphinxRecognizer(lm), [c for c, _ in clips], clips[0][1], lm


def test_noise_and_time_reversal_raise_wer(recogniser):
    from rlhf_tts.eval.asr import corpus_wer, word_errors

    rec, clips, rate, _ = recogniser

    def wer(audios: list[np.ndarray]) -> float:
        return corpus_wer([word_errors(r, h) for r, h in zip(SENTENCES, rec.transcribe(audios, rate))])

    clean = wer(clips)
    assert clean <= 0.15
    assert wer([add_noise(c, 0.0, i) for i, c in enumerate(clips)]) > clean + 0.3
    assert wer([c[::-1].copy() for c in clips]) > clean + 0.3


# ----------------------------------------------------------------------------- acoustic adaptation


def test_sphinx_features_and_map_update():
    from rlhf_tts.eval.asr_adapt import AcousticModel, Statistics, decoder_features, map_means, sphinx_cepstra

    audio, rate = espeak("The cat sat on the mat.")
    from rlhf_tts.eval.asr import to_rate

    cep = sphinx_cepstra(to_rate(audio, rate, 16000))
    assert cep.shape[1] == 13 and abs(len(cep) - len(audio) / rate * 100) <= 3  # 100 frames per second
    ramp = np.outer(np.arange(20.0), np.ones(13)).astype(np.float32)
    features = decoder_features(ramp)
    assert np.allclose(features[:, :13].mean(0), 0)  # batch CMN
    assert np.allclose(features[5:15, 13:26], 4.0) and np.allclose(features[5:15, 26:], 0.0)  # c[t+2]-c[t-2]; dd of a line
    from pocketsphinx import get_model_path

    model = AcousticModel.load(Path(get_model_path()) / "en-us" / "en-us")
    assert len(model.phones) == model.means.shape[0] == 42 and "SIL" in model.phones
    sums = np.exp(model.log_weights).sum(1)  # per stream and senone: quantised mixture weights sum to ~1
    assert 0.85 < sums.min() and sums.max() < 1.05
    stats = Statistics.zeros(model)
    assert np.array_equal(map_means(model, stats, 10.0), model.means)  # no data: the prior
    stats.occupancy[3, 0, 5] = 1e6
    stats.first[3, 0, 5] = 1e6 * np.full(13, 2.5)
    updated = map_means(model, stats, 10.0)
    assert np.allclose(updated[3, 0, 5], 2.5, atol=1e-3) and np.array_equal(updated[4], model.means[4])


def test_rewritten_acoustic_model_loads_and_adaptation_runs(recogniser, tmp_path):
    from pocketsphinx import get_model_path

    from rlhf_tts.eval.asr import PocketSphinxRecognizer, normalize_transcript, prepare_for_asr
    from rlhf_tts.eval.asr_adapt import adapt, read_gauden, write_adapted

    rec, clips, rate, lm = recogniser
    stock = Path(get_model_path()) / "en-us" / "en-us"
    copy = write_adapted(stock, tmp_path / "copy", read_gauden(stock / "means"))
    assert np.array_equal(read_gauden(copy / "means"), read_gauden(stock / "means"))
    # our s3 writer is read back by pocketsphinx itself: same model, same transcripts
    assert PocketSphinxRecognizer(lm, acoustic_model=copy).transcribe(clips[:2], rate) == rec.transcribe(clips[:2], rate)
    pairs = [(prepare_for_asr(c, rate, -55.0), normalize_transcript(s)) for c, s in zip(clips, SENTENCES)]
    summary = adapt(stock, tmp_path / "adapted", lm.dictionary, pairs, tau=10.0, iterations=1)
    assert summary["iterations"][0]["aligned"] >= 4 and summary["iterations"][0]["frames"] > 300
    adapted = read_gauden(tmp_path / "adapted" / "means")
    assert not np.array_equal(adapted, read_gauden(stock / "means"))
    assert PocketSphinxRecognizer(lm, acoustic_model=tmp_path / "adapted").transcribe(clips[:1], rate)[0]
    # aligned in two worker processes (several chunks), accumulated in clip order: the same model, bit for bit
    in_workers = adapt(stock, tmp_path / "adapted2", lm.dictionary, pairs, tau=10.0, iterations=1, workers=2)
    assert in_workers == summary
    assert np.array_equal(read_gauden(tmp_path / "adapted2" / "means"), adapted)
    shutil.rmtree(tmp_path / "adapted")


# ----------------------------------------------------------------------------- prosody and quality


def test_prosody_similarity_is_perfect_for_a_clip_with_itself_and_falls_under_a_pitch_shift():
    import librosa

    from rlhf_tts.config import FeatureConfig
    from rlhf_tts.eval.asr import to_rate
    from rlhf_tts.eval.prosody import contours, prosody_similarity

    features = FeatureConfig()
    audio, rate = espeak("Please send the hat to the library.")
    audio = to_rate(audio, rate, features.sample_rate)
    reference = contours(audio, features)
    assert reference.voiced.mean() > 0.3 and 70 < np.median(reference.f0_hz[reference.voiced]) < 250
    same = prosody_similarity(reference, reference)
    assert same["f0_corr"] == pytest.approx(1.0) and same["energy_corr"] == pytest.approx(1.0)
    assert same["f0_rmse_st"] == 0.0 and same["energy_rmse_db"] == 0.0 and same["duration_error"] == 0.0
    shifted = librosa.effects.pitch_shift(audio, sr=features.sample_rate, n_steps=3.0)
    moved = prosody_similarity(reference, contours(shifted, features))
    assert 2.0 < moved["f0_rmse_st"] < 4.0  # the RMSE reads the shift in semitones
    assert moved["f0_corr"] < same["f0_corr"]
    slower = librosa.effects.time_stretch(audio, rate=0.7)
    assert prosody_similarity(reference, contours(slower, features))["duration_error"] > 0.25


def test_dnsmos_is_lower_for_noisy_audio():
    from rlhf_tts.eval.dnsmos import DNSMOS

    dnsmos = DNSMOS(threads=1)
    clips = [espeak(s)[0] for s in SENTENCES[:2]]
    rate = espeak(SENTENCES[0])[1]
    clean = dnsmos.score(clips, rate)
    noisy = dnsmos.score([add_noise(c, 5.0, i) for i, c in enumerate(clips)], rate)
    for c, n in zip(clean, noisy):
        assert n["ovrl"] < c["ovrl"] - 0.3 and n["bak"] < c["bak"] - 0.5
        assert 1.0 <= n["ovrl"] <= 5.0 and 1.0 <= c["ovrl"] <= 5.0


# ----------------------------------------------------------------------------- emotion judge network


def test_emotion_judge_inference_ignores_padding_and_batch_composition():
    from rlhf_tts.config import FeatureConfig
    from rlhf_tts.data.emotions import EMOTIONS
    from rlhf_tts.eval.judges.emotion import EmotionJudge, EmotionJudgeNet

    torch.manual_seed(0)
    net = EmotionJudgeNet(80, 16, 12, len(EMOTIONS))
    rng = np.random.default_rng(0)
    mels = [rng.normal(-5, 2, (80, n)).astype(np.float32) for n in (40, 95, 61, 120, 33)]
    spans = [[(0, 10), (10, 40)], None, [(5, 30), (30, 61)], [(0, 60), (60, 119)], [(0, 33)]]
    one = EmotionJudge(net, FeatureConfig(), tuple(EMOTIONS), batch_size=1).judge_mels(mels, spans)
    many = EmotionJudge(net, FeatureConfig(), tuple(EMOTIONS), batch_size=5).judge_mels(mels, spans)
    assert np.allclose(one.embeddings, many.embeddings, atol=1e-4)
    assert np.allclose(one.posteriors, many.posteriors, atol=1e-5)
    assert np.allclose(one.posteriors.sum(1), 1.0)
    assert many.word_vad[1] is None and many.word_vad[3].shape == (2, 3)
    assert np.allclose(one.word_vad[3], many.word_vad[3], atol=1e-4)
    assert ((many.word_vad[0] >= 0) & (many.word_vad[0] <= 1)).all()
