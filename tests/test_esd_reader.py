"""The ESD reader and the data stage on an ESD-layout folder with every defect the issue lists."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from conftest import DEFECTS, GOOD, make_defective_esd, speech
from rlhf_tts.data.esd import read_transcript, scan_esd


@pytest.fixture(scope="module")
def defective_esd(tmp_path_factory):
    return make_defective_esd(tmp_path_factory.mktemp("esd"))


def test_every_defect_quarantined_and_every_good_utterance_kept(defective_esd, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_tts.run", "stages=[data]", "data.source=esd", f"data.root={defective_esd}",
         f"output_dir={out}", f"cache_dir={cache}", "tracking.enabled=false"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["utt_id"] for r in manifest} == set(GOOD)
    for row in manifest:
        assert row["emotion"] == GOOD[row["utt_id"]][0] and row["text"] == GOOD[row["utt_id"]][1]
        assert row["sample_rate"] == 16000 and row["intensity"] is None and row["word_vad"] is None
        assert len(row["words"]) == len(row["word_spans"]) and row["n_frames"] > 0
    with open(out / "quarantine.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_utt = {Path(r["path"].split(":")[0]).stem: r["reason"] for r in rows}
    for utt_id, (_, reason) in DEFECTS.items():
        assert utt_id in by_utt, f"{utt_id} ({reason}) was not quarantined"
        assert reason in by_utt[utt_id], (utt_id, by_utt[utt_id])
    assert len(rows) == len(DEFECTS)  # each defect once, nothing good quarantined
    assert f"quarantined: {len(DEFECTS)}" in result.stdout.replace("\n", " ")


def test_nothing_usable_is_a_clear_error(tmp_path):
    root = tmp_path / "esd" / "0011" / "Neutral"
    root.mkdir(parents=True)
    (root / "0011_000001.wav").write_bytes(b"")
    (root.parent / "0011.txt").write_text("0011_000001\tEmpty audio.\tNeutral\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_tts.run", "data.source=esd", f"data.root={tmp_path / 'esd'}",
         f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "tracking.enabled=false"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 3
    assert "no usable utterances" in result.stderr and result.stderr.strip().count("\n") == 0
    assert "empty file" in (out / "quarantine.csv").read_text()


def test_official_split_folders_and_utf16_transcript(tmp_path):
    spk = tmp_path / "0012"
    for split in ("train", "evaluation", "test"):
        (spk / "Happy" / split).mkdir(parents=True)
    ids = {"train": "0012_000701", "evaluation": "0012_000702", "test": "0012_000703"}
    for split, utt_id in ids.items():
        sf.write(spk / "Happy" / split / f"{utt_id}.wav", speech("Hello there."), 16000)
    text = "".join(f"{utt_id}\tHello there.\tHappy\n" for utt_id in ids.values())
    (spk / "0012.txt").write_bytes(text.encode("utf-16"))  # with BOM
    records, quarantined = scan_esd(tmp_path)
    assert not quarantined
    assert {r.utt_id: r.split for r in records} == {ids["train"]: "train", ids["evaluation"]: "val", ids["test"]: "test"}


def test_transcript_variants(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(
        b"a_1\tPlain line.\tHappy\n"
        b"a_2 Whitespace separated line. angry\n"
        b"a_3\tNo emotion column.\n"
        b"a_1\tDuplicate id.\tHappy\n"
        b"\n"
    )
    good, duplicates, bad = read_transcript(path)
    assert good["a_1"].text == "Plain line." and good["a_1"].emotion == "Happy"
    assert good["a_2"].text == "Whitespace separated line." and good["a_2"].emotion == "Angry"
    assert good["a_3"].emotion is None
    assert len(duplicates) == 1 and "duplicate" in duplicates[0].reason and not bad


def test_missing_requested_speaker_and_orphan_line(tmp_path):
    spk = tmp_path / "0013" / "Sad"
    spk.mkdir(parents=True)
    sf.write(spk / "0013_001051.wav", speech("Rain again."), 16000)
    (tmp_path / "0013" / "0013.txt").write_text("0013_001051\tRain again.\tSad\n0013_001052\tNo audio.\tSad\n")
    records, quarantined = scan_esd(tmp_path, speakers=["0013", "0099"])
    assert [r.utt_id for r in records] == ["0013_001051"]
    reasons = sorted(q.reason for q in quarantined)
    assert reasons[0].startswith("requested speaker folder not found") and "no wav file" in reasons[1]


def test_emotion_mismatch_is_quarantined(tmp_path):
    spk = tmp_path / "0014" / "Sad"
    spk.mkdir(parents=True)
    sf.write(spk / "0014_001051.wav", np.zeros(10, np.float32) + 0.1, 16000)
    (tmp_path / "0014" / "0014.txt").write_text("0014_001051\tRain again.\tHappy\n")
    records, quarantined = scan_esd(tmp_path)
    assert not records and "emotion mismatch" in quarantined[0].reason
