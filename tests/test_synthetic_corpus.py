"""The embedded synthetic corpus: layout, determinism, word VAD, disjoint splits."""

import json

import numpy as np
import pyarrow.parquet as pq

from conftest import smoke_config
from rlhf_tts.data.emotions import EMOTIONS, Prosody, prosody_from_vad, vad_from_prosody, word_vads
from rlhf_tts.data.manifest import manifest_digest, read_manifest
from rlhf_tts.data.pipeline import build_dataset


def test_layout_is_esd(smoke_dataset):
    cfg, dataset = smoke_dataset
    root = dataset.corpus_root
    speakers = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(speakers) == cfg.data.synthetic.n_speakers >= 4
    for speaker in speakers:
        lines = (root / speaker / f"{speaker}.txt").read_text().splitlines()
        assert len(lines) == 5 * cfg.data.synthetic.sentences_per_speaker
        for line in lines:
            utt_id, text, emotion = line.split("\t")
            assert (root / speaker / emotion / f"{utt_id}.wav").is_file() and text
        assert (root / speaker / f"{speaker}_annotations.jsonl").is_file()


def test_manifest_columns_and_splits(smoke_dataset):
    _, dataset = smoke_dataset
    rows = read_manifest(dataset.manifest_path).to_pylist()
    assert {r["emotion"] for r in rows} == set(EMOTIONS)
    texts = {split: {r["text"] for r in rows if r["split"] == split} for split in ("train", "val", "test")}
    assert all(texts.values())
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"]) and not (texts["val"] & texts["test"])
    for row in rows:
        assert 0.3 <= row["intensity"] <= 1.0
        assert len(row["word_vad"]) == len(row["words"]) == len(row["word_spans"])
        assert all(0.0 <= v <= 1.0 for vad in row["word_vad"] for v in vad)
        mel = dataset.load_mel(row["speaker"], row["utt_id"])
        assert mel.shape == (80, row["n_frames"]) and np.isfinite(mel).all()
        assert abs(row["n_frames"] * 256 / 22050 - row["duration_s"]) < 0.05


def test_word_vad_is_what_the_prosody_expresses(smoke_dataset):
    _, dataset = smoke_dataset
    speaker_dir = next(p for p in dataset.corpus_root.iterdir() if p.is_dir())
    first = json.loads((speaker_dir / f"{speaker_dir.name}_annotations.jsonl").read_text().splitlines()[0])
    for word in first["words"]:
        recovered = np.clip(vad_from_prosody(Prosody(**word["prosody"])), 0, 1)
        np.testing.assert_allclose(recovered, word["vad"], atol=1e-5)
        assert word["end_s"] > word["start_s"] >= 0


def test_emotions_move_prosody_the_documented_way():
    rng = np.random.default_rng(0)
    mean = {e: np.mean([[*vars(prosody_from_vad(v)).values()] for v in word_vads(e, 1.0, 200, rng, 0.0, 0.05)], axis=0)
            for e in EMOTIONS}
    pitch, rng_, rate, volume = range(4)
    assert mean["Sad"][rate] < mean["Neutral"][rate] < mean["Happy"][rate]
    assert mean["Sad"][volume] < mean["Neutral"][volume] < mean["Angry"][volume]
    assert mean["Surprise"][pitch] > max(mean[e][pitch] for e in ("Neutral", "Sad", "Angry", "Happy"))
    assert mean["Sad"][rng_] < 0 < mean["Happy"][rng_]


def test_same_seed_same_manifest_other_seed_differs(smoke_dataset, tmp_path):
    _, dataset = smoke_dataset
    reference = manifest_digest(read_manifest(dataset.manifest_path))
    # A fresh cache folder and a single worker: nothing may depend on either.
    again = build_dataset(smoke_config(tmp_path / "a", "data.num_workers=1", "data.synthetic.num_workers=1"))
    assert manifest_digest(read_manifest(again.manifest_path)) == reference
    other = build_dataset(smoke_config(tmp_path / "b", "seed=1"))
    assert manifest_digest(read_manifest(other.manifest_path)) != reference


def test_second_build_reuses_the_cache(smoke_dataset):
    cfg, dataset = smoke_dataset
    stamp = dataset.manifest_path.stat().st_mtime_ns
    assert build_dataset(cfg).manifest_path.stat().st_mtime_ns == stamp
    assert pq.read_table(dataset.manifest_path).num_rows == 5 * 4 * 4


def test_every_word_is_spoken_with_strong_per_word_prosody():
    """eSpeak drops the end of a clause that holds too many prosody changes (half of the corpus lost
    its ending before clause breaks): every word's mark must come, in order, and the utterance must
    last about as long as the same words spoken plainly."""
    from rlhf_tts.data.espeak import Espeak
    from rlhf_tts.data.frontend import phonemize
    from rlhf_tts.data.sentences import generate_sentences
    from rlhf_tts.data.synthetic import build_ssml, marks_complete

    engine = Espeak.instance()
    rng = np.random.default_rng(3)
    for text in generate_sentences(12, 5):
        words = list(phonemize(text).words)
        emotion = EMOTIONS[int(rng.integers(len(EMOTIONS)))]
        vads = word_vads(emotion, 1.0, len(words), rng, 0.06, 0.15)
        ssml, _ = build_ssml(words, vads)
        speech = engine.synthesize(ssml, "en-us+m3", ssml=True)
        assert marks_complete(speech.marks, len(words), len(speech.audio)), (text, speech.marks)
        plain = engine.synthesize(" ".join(words), "en-us+m3")
        rate = np.mean([prosody_from_vad(v).rate_pct for v in vads]) / 100.0
        assert len(speech.audio) > 0.75 * len(plain.audio) / rate, text


def test_corpus_word_timings_cover_each_utterance(smoke_dataset):
    _, dataset = smoke_dataset
    for speaker_dir in (p for p in dataset.corpus_root.iterdir() if p.is_dir()):
        for line in (speaker_dir / f"{speaker_dir.name}_annotations.jsonl").read_text().splitlines():
            record = json.loads(line)
            starts = [w["start_s"] for w in record["words"]]
            assert starts == sorted(starts) and len(set(starts)) == len(starts), record["utt_id"]
            assert all(w["end_s"] > w["start_s"] for w in record["words"]), record["utt_id"]
