"""Monotonic alignment search against a brute force and an independent numpy DP, plus its invariants."""

import itertools

import numpy as np
import pytest
import torch

from rlhf_tts.models.gradtts.mas import durations_from_alignment, monotonic_alignment_search


def brute_force(log_p: np.ndarray) -> tuple[float, np.ndarray]:
    """Best score and path (token index per frame) over ALL monotonic surjective alignments."""
    t_text, t_mel = log_p.shape
    best_score, best_path = -np.inf, None
    # A path is fixed by the frames at which the token index goes up by one: T_text - 1 of frames 1..T_mel-1.
    for steps in itertools.combinations(range(1, t_mel), t_text - 1):
        path = np.array([sum(s <= j for s in steps) for j in range(t_mel)])
        score = log_p[path, np.arange(t_mel)].sum()
        if score > best_score:
            best_score, best_path = score, path
    return best_score, best_path


def numpy_dp(log_p: np.ndarray) -> tuple[float, np.ndarray]:
    """Plain double-loop Viterbi over one unpadded (T_text, T_mel) matrix; ties stay on the same token."""
    t_text, t_mel = log_p.shape
    q = np.full((t_text, t_mel), -np.inf)
    q[0, 0] = log_p[0, 0]
    for j in range(1, t_mel):
        for i in range(t_text):
            best_prev = q[i, j - 1]
            if i > 0:
                best_prev = max(best_prev, q[i - 1, j - 1])
            q[i, j] = log_p[i, j] + best_prev
    path = np.zeros(t_mel, dtype=int)
    i = t_text - 1
    for j in range(t_mel - 1, -1, -1):
        path[j] = i
        if j > 0 and i > 0 and (i == j or q[i - 1, j - 1] > q[i, j - 1]):
            i -= 1
    return q[t_text - 1, t_mel - 1], path


def masks(text_len: list[int], mel_len: list[int], t_text: int, t_mel: int) -> tuple[torch.Tensor, torch.Tensor]:
    text_mask = torch.arange(t_text)[None, :] < torch.tensor(text_len)[:, None]
    mel_mask = torch.arange(t_mel)[None, :] < torch.tensor(mel_len)[:, None]
    return text_mask, mel_mask


def path_of(alignment: np.ndarray, t_text: int, t_mel: int) -> np.ndarray:
    """Token index per frame of one item's alignment, checking that each valid frame has exactly one token."""
    block = alignment[:t_text, :t_mel]
    np.testing.assert_array_equal(block.sum(axis=0), np.ones(t_mel))
    return block.argmax(axis=0)


def assert_valid_path(path: np.ndarray, t_text: int) -> None:
    assert path[0] == 0 and path[-1] == t_text - 1
    assert set(np.diff(path).tolist()) <= {0, 1}


def random_batch(rng: np.random.Generator, text_len: list[int], mel_len: list[int], pad_value: float):
    """Normal log-likelihoods inside each item's lengths, `pad_value` everywhere outside them."""
    t_text, t_mel = max(text_len), max(mel_len)
    log_p = np.full((len(text_len), t_text, t_mel), pad_value)
    for k, (tl, ml) in enumerate(zip(text_len, mel_len)):
        log_p[k, :tl, :ml] = rng.standard_normal((tl, ml))
    return log_p, *masks(text_len, mel_len, t_text, t_mel)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_every_small_shape(seed):
    rng = np.random.default_rng(seed)
    for t_text in range(1, 6):
        for t_mel in range(t_text, 9):
            log_p = rng.standard_normal((t_text, t_mel))
            text_mask, mel_mask = masks([t_text], [t_mel], t_text, t_mel)
            alignment = monotonic_alignment_search(torch.from_numpy(log_p)[None], text_mask, mel_mask)[0].numpy()
            path = path_of(alignment, t_text, t_mel)
            assert_valid_path(path, t_text)
            best_score, best_path = brute_force(log_p)
            assert log_p[path, np.arange(t_mel)].sum() == pytest.approx(best_score, abs=1e-9)
            np.testing.assert_array_equal(path, best_path)


def test_matches_brute_force_when_batched_with_padding():
    rng = np.random.default_rng(10)
    text_len, mel_len = [1, 3, 5, 4, 2, 5], [4, 3, 8, 7, 2, 5]
    log_p, text_mask, mel_mask = random_batch(rng, text_len, mel_len, pad_value=1e6)
    alignment = monotonic_alignment_search(torch.from_numpy(log_p), text_mask, mel_mask).numpy()
    for k, (tl, ml) in enumerate(zip(text_len, mel_len)):
        np.testing.assert_array_equal(path_of(alignment[k], tl, ml), brute_force(log_p[k, :tl, :ml])[1])


@pytest.mark.parametrize("pad_value", [1e6, float("nan"), float("inf")])
@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_dp_on_padded_batches(seed, pad_value):
    rng = np.random.default_rng(100 + seed)
    b = 7
    text_len = rng.integers(1, 21, size=b).tolist()
    mel_len = [int(rng.integers(tl, 61)) for tl in text_len]
    text_len[0], mel_len[0] = 20, 60  # one item fills the batch, the others are padded
    log_p, text_mask, mel_mask = random_batch(rng, text_len, mel_len, pad_value)
    alignment = monotonic_alignment_search(torch.from_numpy(log_p), text_mask, mel_mask).numpy()
    assert np.isfinite(alignment).all()
    for k, (tl, ml) in enumerate(zip(text_len, mel_len)):
        ref_score, ref_path = numpy_dp(log_p[k, :tl, :ml])
        path = path_of(alignment[k], tl, ml)
        assert_valid_path(path, tl)
        assert log_p[k, path, np.arange(ml)].sum() == pytest.approx(ref_score, abs=1e-9)
        np.testing.assert_array_equal(path, ref_path)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_alignment_and_duration_invariants(mask_dtype):
    rng = np.random.default_rng(7)
    text_len, mel_len = [12, 5, 1, 9, 12], [40, 5, 17, 31, 12]
    log_p, text_mask, mel_mask = random_batch(rng, text_len, mel_len, pad_value=3.0)
    log_p = torch.from_numpy(log_p).float()
    alignment = monotonic_alignment_search(log_p, text_mask.to(mask_dtype), mel_mask.to(mask_dtype))
    assert alignment.dtype == torch.float32 and alignment.shape == log_p.shape
    assert set(alignment.unique().tolist()) <= {0.0, 1.0}
    outside = ~(text_mask[:, :, None] & mel_mask[:, None, :])
    assert alignment[outside].sum() == 0
    durations = durations_from_alignment(alignment)
    assert durations.dtype == torch.long and durations.shape == text_mask.shape
    for k, (tl, ml) in enumerate(zip(text_len, mel_len)):
        np.testing.assert_array_equal(alignment[k, :tl, :ml].sum(0).numpy(), np.ones(ml))  # one token per frame
        assert (durations[k, :tl] >= 1).all() and (durations[k, tl:] == 0).all()
        assert durations[k].sum().item() == ml
        # Rows are contiguous runs, in token order: token i covers frames [start_i, start_i + d_i).
        starts = np.concatenate([[0], np.cumsum(durations[k, :tl].numpy())[:-1]])
        for i in range(tl):
            row = np.zeros(log_p.shape[2])
            row[starts[i]:starts[i] + durations[k, i].item()] = 1
            np.testing.assert_array_equal(alignment[k, i].numpy(), row)


def test_ties_stay_on_the_same_token():
    """With constant log-likelihoods every path ties; the documented rule gives the last token the slack."""
    alignment = monotonic_alignment_search(torch.zeros(1, 4, 10), *masks([4], [10], 4, 10))
    assert durations_from_alignment(alignment)[0].tolist() == [1, 1, 1, 7]


def test_equal_lengths_force_the_diagonal():
    rng = np.random.default_rng(3)
    log_p = torch.from_numpy(rng.standard_normal((1, 6, 6)) * 100)
    alignment = monotonic_alignment_search(log_p, *masks([6], [6], 6, 6))
    assert torch.equal(alignment[0], torch.eye(6, dtype=log_p.dtype))


def test_more_tokens_than_frames_raises_naming_the_item():
    log_p = torch.zeros(3, 5, 6)
    with pytest.raises(ValueError, match="batch index 1"):
        monotonic_alignment_search(log_p, *masks([2, 5, 3], [6, 4, 6], 5, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: CPU/CUDA agreement cannot be checked")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    text_len = rng.integers(1, 41, size=8).tolist()
    mel_len = [int(rng.integers(tl, 161)) for tl in text_len]
    log_p, text_mask, mel_mask = random_batch(rng, text_len, mel_len, pad_value=1e6)
    for dtype in (torch.float32, torch.float64):
        x = torch.from_numpy(log_p).to(dtype)
        cpu = monotonic_alignment_search(x, text_mask, mel_mask)
        gpu = monotonic_alignment_search(x.cuda(), text_mask.cuda(), mel_mask.cuda())
        assert gpu.device.type == "cuda" and gpu.dtype == dtype
        assert torch.equal(gpu.cpu(), cpu)
