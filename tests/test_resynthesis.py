"""The shared Griffin-Lim round-trip cache that the emotion judge and EASPM train on."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import smoke_config


def test_a_split_is_resynthesised_once_and_then_read_back(smoke_dataset, tmp_path, monkeypatch):
    import rlhf_tts.data.resynthesis as resynthesis
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.corpus import load_split

    shared, _ = smoke_dataset
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("corpus", "data"):
        (cache / name).symlink_to(shared.cache_dir + "/" + name)
    cfg = smoke_config(tmp_path)
    dataset, _ = dataset_location(cfg)
    utterances = load_split(dataset, "test", features=cfg.features)
    expected = resynthesis.griffin_lim_mels([u.mel for u in utterances], cfg.features)

    first = resynthesis.resynthesised_split(cfg, "test")
    assert sorted(first) == sorted(u.utt_id for u in utterances)
    for u, mel in zip(utterances, expected):
        assert first[u.utt_id].shape == u.mel.shape
        np.testing.assert_array_equal(first[u.utt_id], mel)  # the round trip, in load_split's batches
        assert not np.allclose(first[u.utt_id], u.mel, atol=0.05)  # and not the recording itself
    path = resynthesis.resynthesis_directory(cfg, dataset.directory) / "test.safetensors"
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))

    def fail(*args, **kwargs):
        raise AssertionError("resynthesised again instead of read from the cache")

    monkeypatch.setattr(resynthesis, "griffin_lim_mels", fail)
    again = resynthesis.resynthesised_split(cfg, "test")
    assert all(np.array_equal(again[k], first[k]) for k in first)
    with pytest.raises(AssertionError, match="resynthesised again"):  # another split is not there yet
        resynthesis.resynthesised_split(cfg, "val")
