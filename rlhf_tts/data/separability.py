"""How separable are the corpus's emotions from prosody alone?

`python -m rlhf_tts.data.separability [--config FILE] [key=value ...]` builds (or reuses) the
dataset for the config, extracts utterance-level prosodic features (F0 mean and spread, energy
mean and spread, speaking rate), trains a multinomial logistic regression on the train split and
reports accuracy on the test split. A useful emotional corpus sits in between: well above chance
(emotion is audible) and well below 100 % (classes overlap, as they do in real speech).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import librosa
import numpy as np

from rlhf_tts.config import ConfigError, load_config
from rlhf_tts.data.audio import load_audio
from rlhf_tts.data.emotions import EMOTIONS
from rlhf_tts.data.frontend import PUNCTUATION, SPACE

FEATURE_NAMES = ("f0_mean_log", "f0_std_log", "energy_mean_db", "energy_std_db", "phones_per_s")
_NON_PHONE_MARKS = set(PUNCTUATION) | {SPACE, "ˈ", "ˌ", "ː"}


def prosodic_features(samples: np.ndarray, sample_rate: int, n_phones: int) -> np.ndarray:
    """Utterance-level prosody: F0 (YIN, on frames loud enough to be voiced), RMS energy, rate."""
    frame, hop = 1024, 256
    rms = librosa.feature.rms(y=samples, frame_length=frame, hop_length=hop)[0]
    energy_db = 20 * np.log10(np.maximum(rms, 1e-5))
    f0 = librosa.yin(samples, fmin=60, fmax=500, sr=sample_rate, frame_length=frame, hop_length=hop)
    n = min(len(f0), len(energy_db))
    f0, energy_db = f0[:n], energy_db[:n]
    loud = energy_db > energy_db.max() - 30
    voiced = loud & (f0 > 65) & (f0 < 480)
    log_f0 = np.log(f0[voiced]) if voiced.sum() >= 3 else np.log(np.full(3, 100.0))
    speech_db = energy_db[loud]
    return np.array([
        log_f0.mean(), log_f0.std(), speech_db.mean(), speech_db.std(),
        n_phones / (len(samples) / sample_rate),
    ])


def evaluate_separability(rows: list[dict], corpus_root: Path, sample_rate: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats, labels, splits = [], [], []
    for row in rows:
        audio = load_audio(corpus_root / row["wav_path"], sample_rate)
        n_phones = sum(1 for p in row["phonemes"] if p not in _NON_PHONE_MARKS)
        feats.append(prosodic_features(audio.samples, sample_rate, n_phones))
        labels.append(EMOTIONS.index(row["emotion"]))
        splits.append(row["split"])
    x, y, split = np.array(feats), np.array(labels), np.array(splits)
    speakers = np.array([row["speaker"] for row in rows])
    for speaker in np.unique(speakers):
        # Speaker normalisation (label-free, standard in emotion recognition): a low male and a high
        # female voice differ in F0 by more than any emotion moves it.
        own = speakers == speaker
        x[own] = (x[own] - x[own].mean(axis=0)) / np.maximum(x[own].std(axis=0), 1e-6)
    train, test = split == "train", split == "test"
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x[train], y[train])
    predicted = model.predict(x[test])
    matrix = confusion_matrix(y[test], predicted, labels=list(range(len(EMOTIONS))))
    recall = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "features": list(FEATURE_NAMES),
        "n_train": int(train.sum()),
        "n_test": int(test.sum()),
        "test_accuracy": float((predicted == y[test]).mean()),
        "train_accuracy": float(model.score(x[train], y[train])),
        "chance": 1.0 / len(EMOTIONS),
        "per_emotion_recall": {e: float(r) for e, r in zip(EMOTIONS, recall)},
        "confusion_matrix": {"labels": list(EMOTIONS), "rows_true_cols_predicted": matrix.tolist()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_tts.data.separability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from rlhf_tts.data.pipeline import build_dataset, manifest_rows

    start = time.monotonic()
    dataset = build_dataset(cfg)
    result = evaluate_separability(manifest_rows(dataset), dataset.corpus_root, cfg.features.sample_rate)
    result["seconds"] = round(time.monotonic() - start, 1)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "separability.json").write_text(json.dumps(result, indent=2))
    print(f"prosodic emotion classifier: test accuracy {result['test_accuracy']:.1%} "
          f"(train {result['train_accuracy']:.1%}, chance {result['chance']:.0%}; "
          f"{result['n_train']} train / {result['n_test']} test utterances, {result['seconds']} s)")
    print("per-emotion recall: " + ", ".join(f"{e} {r:.0%}" for e, r in result["per_emotion_recall"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
