"""Grad-TTS maths and the stepwise API (METHOD.md §1)."""

import math

import pytest
import torch

from rlhf_tts.config import load_config
from rlhf_tts.models.gradtts import diffusion
from rlhf_tts.models.gradtts.model import GradTTS, TextBatch, alignment_from_durations, flat_alignment

SMOKE = load_config(None, ["preset=smoke"]).model


def tiny_model(seed: int = 0) -> GradTTS:
    torch.manual_seed(seed)
    return GradTTS(SMOKE, n_vocab=40, n_speakers=3, n_emotions=5).eval()


def text_batch(batch: int = 2, length: int = 7) -> TextBatch:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([length, length - 2][:batch] + [length] * max(0, batch - 2))
    ids = torch.randint(3, 40, (batch, length), generator=g) * (torch.arange(length) < lengths.unsqueeze(1))
    return TextBatch(ids, lengths, torch.tensor([1, 3][:batch] + [0] * max(0, batch - 2)),
                     torch.tensor([0, 2][:batch] + [1] * max(0, batch - 2)), [[(0, 3), (4, 6)]] * batch)


def loss_inputs() -> tuple[GradTTS, TextBatch, torch.Tensor, torch.Tensor]:
    """A smoke model and a two-utterance batch (text, mel, mel lengths) for `compute_loss` tests."""
    model = GradTTS(SMOKE, n_vocab=40, n_speakers=3, n_emotions=5).eval()
    mel = torch.randn(2, 80, 24, generator=torch.Generator().manual_seed(0)) - 4
    return model, text_batch(2), mel, torch.tensor([24, 20])


def test_gaussian_log_ratio_equals_normal_log_prob_difference():
    g = torch.Generator().manual_seed(0)
    x, mean_a, mean_b = (torch.randn(3, 80, 20, generator=g, dtype=torch.float64) for _ in range(3))
    variance = torch.tensor([0.3, 0.05, 0.01], dtype=torch.float64)
    mask = torch.ones(3, 1, 20, dtype=torch.float64)
    mask[1, :, 15:] = 0
    std = variance.sqrt().reshape(-1, 1, 1)
    la = torch.distributions.Normal(mean_a, std).log_prob(x)
    lb = torch.distributions.Normal(mean_b, std).log_prob(x)
    m = mask.expand_as(x)
    expected_sum = ((la - lb) * m).sum(dim=(1, 2))
    expected_mean = expected_sum / m.sum(dim=(1, 2))
    got_sum = diffusion.gaussian_log_ratio(x, mean_a, mean_b, variance, mask, "sum")
    got_mean = diffusion.gaussian_log_ratio(x, mean_a, mean_b, variance, mask, "mean")
    assert torch.max(torch.abs(got_sum - expected_sum) / expected_sum.abs()) <= 1e-6
    assert torch.max(torch.abs(got_mean - expected_mean) / expected_mean.abs()) <= 1e-6
    with pytest.raises(ValueError):
        diffusion.gaussian_log_ratio(x, mean_a, mean_b, variance, mask, "max")


def test_forward_marginal_matches_simulated_sde():
    """Simulate dX = ½β(μ - X)dt + √β dW from X_0 and compare with the closed form at t."""
    g = torch.Generator().manual_seed(0)
    n, t_end, steps = 200_000, 0.6, 600
    x0, mu = 1.5, -0.5
    x = torch.full((n,), x0, dtype=torch.float64)
    dt = t_end / steps
    for i in range(steps):
        b = diffusion.beta((i + 0.5) * dt, 0.05, 20.0)
        x = x + 0.5 * b * (mu - x) * dt + math.sqrt(b * dt) * torch.randn(n, generator=g, dtype=torch.float64)
    mean, variance = diffusion.forward_marginal(torch.tensor([x0], dtype=torch.float64), torch.tensor([mu], dtype=torch.float64), t_end, 0.05, 20.0)
    assert abs(float(x.mean()) - float(mean)) < 0.01
    assert abs(float(x.var()) - float(variance)) < 0.01


def test_stochastic_step_statistics_and_one_network_call_for_k_candidates():
    model = tiny_model()
    prior = model.encode(text_batch(1))
    x_t = model.initial_state(prior, generator=torch.Generator().manual_seed(2))
    calls = []
    hook = model.decoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        candidates, mean, variance = model.candidates(x_t, 0.5, 0.05, prior, k=4000, generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert len(calls) == 1  # one score-network call serves all k candidates
    with torch.no_grad():
        reference_mean, reference_variance = model.reverse_step_mean(x_t, 0.5, 0.05, prior)
    torch.testing.assert_close(mean, reference_mean)
    inside = prior.mask.bool().expand_as(mean)[0]
    samples = candidates[:, 0][:, inside]
    sigma = float(reference_variance.sqrt())
    assert torch.max(torch.abs(samples.mean(0) - mean[0][inside])) < 5 * sigma / math.sqrt(4000)
    assert abs(float(samples.var(0).mean()) / float(reference_variance) - 1) < 0.02
    assert float(candidates[:, :, :, int(prior.lengths[0]):].abs().max()) == 0.0  # masked frames stay zero


def test_reverse_step_mean_formula():
    g = torch.Generator().manual_seed(0)
    x, mu, s = (torch.randn(2, 4, 6, generator=g) for _ in range(3))
    t, h = 0.4, 0.05
    b = 0.05 + (20 - 0.05) * t
    mean, var = diffusion.reverse_step_mean(x, mu, s, t, h, 0.05, 20.0)
    torch.testing.assert_close(mean, x - b * h * (0.5 * (mu - x) - s))
    assert float(var) == pytest.approx(b * h)
    x0_hat = diffusion.x0_estimate(x, mu, s, t, 0.05, 20.0)
    big_b = 0.05 * t + 0.5 * (20 - 0.05) * t * t
    rho, lam = math.exp(-big_b / 2), 1 - math.exp(-big_b)
    torch.testing.assert_close(x0_hat, (x + lam * s - (1 - rho) * mu) / rho)


def test_sampling_is_deterministic_under_a_seed_and_masked():
    model = tiny_model()
    prior = model.encode(text_batch(2))
    for stochastic in (False, True):
        a = model.sample(prior, 5, stochastic=stochastic, generator=torch.Generator().manual_seed(7))
        b = model.sample(prior, 5, stochastic=stochastic, generator=torch.Generator().manual_seed(7))
        c = model.sample(prior, 5, stochastic=stochastic, generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)
        assert float((a * (1 - prior.mask)).abs().max()) == 0.0


def test_an_items_score_does_not_depend_on_the_padding_of_its_batch():
    """Padded frames must not reach valid ones (GroupNorm statistics, attention keys): the network is
    trained on unpadded crops and used on padded batches. Before masking, the tiny base model's
    loss at t >= 0.6 was 30x higher on padded batches and its samples diverged (MCD 23 dB)."""
    model = tiny_model()
    for attention in (m for m in model.decoder.modules() if hasattr(m, "g")):
        attention.g.data.fill_(0.5)  # ReZero starts at 0: open the attention so its masking is tested
    text = text_batch(2)
    durations = torch.tensor([[3, 3, 3, 3, 3, 3, 6], [1, 2, 1, 2, 2, 0, 0]])  # 24 and 8 frames
    both = model.encode(text, durations=durations)
    alone = model.encode(TextBatch(text.ids[1:, :5], text.lengths[1:], text.emotion[1:], text.speaker[1:]),
                         durations=durations[1:, :5])
    assert both.mu.shape[-1] == 24 and alone.mu.shape[-1] == 8
    x = model.initial_state(both, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (0.1, 0.9):
            padded = model.score(x, t, both)[1, :, :8]
            single = model.score(x[1:, :, :8], t, alone)[0]
            torch.testing.assert_close(padded, single, rtol=1e-4, atol=1e-5)
            garbage = x.clone()
            garbage[1, :, 8:] = 1e3  # whatever sits in the padding changes nothing
            torch.testing.assert_close(model.score(garbage, t, both)[1, :, :8], padded, rtol=1e-4, atol=1e-5)


def test_prior_output_level_gives_each_band_mus_mean_and_keeps_the_decoders_contour():
    """`output_level="prior"`: per utterance and mel band, the mean over real frames is mu's; every frame
    of a band moves by one offset (the contour within the band is the sampler's); padding stays zero."""
    model = tiny_model()
    prior = model.encode(text_batch(2))
    assert int(prior.lengths[0]) != int(prior.lengths[1])  # one padded item
    decoder = model.sample(prior, 4, generator=torch.Generator().manual_seed(3))
    leveled = model.sample(prior, 4, generator=torch.Generator().manual_seed(3), output_level="prior")
    for row in range(2):
        n = int(prior.lengths[row])
        torch.testing.assert_close(leveled[row, :, :n].mean(-1), prior.mu[row, :, :n].mean(-1), atol=1e-5, rtol=0)
        shift = leveled[row, :, :n] - decoder[row, :, :n]
        torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-5, rtol=0)
        assert float(shift.abs().mean()) > 1e-3  # the untrained decoder's level is not mu's: the offset is real
        assert float(leveled[row, :, n:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="output_level"):
        model.sample(prior, 2, output_level="encoder")


def test_prior_durations_alignment_and_word_spans():
    model = tiny_model()
    text = text_batch(2)
    durations = torch.tensor([[2, 1, 3, 1, 2, 2, 1], [1, 1, 1, 1, 4, 0, 0]])
    prior = model.encode(text, durations=durations)
    assert prior.lengths.tolist() == [12, 8]
    assert prior.mu.shape[-1] % model.length_multiple == 0
    assert prior.mask[0, 0, :12].all() and not prior.mask[0, 0, 12:].any() and not prior.mask[1, 0, 8:].any()
    assert prior.word_frame_spans[0] == [(0, 6), (7, 11)]  # phonemes 0-3 → frames 0-6; 4-6 → 7-11
    path = alignment_from_durations(durations, (durations > 0).float(), 12)
    assert path.sum(1)[0].tolist() == [1.0] * 12 and path.sum(-1).tolist()[0] == durations[0].float().tolist()


def test_guidance_one_is_the_conditional_score():
    model = tiny_model()
    prior = model.encode(text_batch(2))
    x = model.initial_state(prior, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.score(x, 0.5, prior)
        torch.testing.assert_close(model.score(x, 0.5, prior, guidance=1.0), plain)
        guided = model.score(x, 0.5, prior, guidance=3.0)
        null = model.score(x, 0.5, prior, emotion=torch.full_like(prior.emotion, model.n_emotions))
    torch.testing.assert_close(guided, null + 3.0 * (plain - null), rtol=1e-4, atol=1e-5)


def test_overfitting_four_utterances_reduces_loss_fivefold():
    torch.manual_seed(0)
    model = GradTTS(SMOKE, n_vocab=40, n_speakers=2, n_emotions=5).train()
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 7, 8, 6])
    ids = torch.randint(3, 40, (4, 9), generator=g) * (torch.arange(9) < lengths.unsqueeze(1))
    text = TextBatch(ids, lengths, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 1]))
    mel_lengths = torch.tensor([40, 32, 36, 28])
    mel = torch.randn(4, 80, 40, generator=g) * 0.5 - 5 + torch.linspace(-2, 2, 80).view(1, 80, 1)
    mel = mel * (torch.arange(40) < mel_lengths.unsqueeze(1)).unsqueeze(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = model.compute_loss(text, mel, mel_lengths, 32, g)
        optimizer.zero_grad()
        out["total"].backward()
        optimizer.step()
        losses.append(float(out["total"].detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first / last >= 5, (first, last)


def test_decoder_items_limits_only_the_diffusion_loss():
    model, text, mel, lengths = loss_inputs()
    full = model.compute_loss(text, mel, lengths, 16, torch.Generator().manual_seed(1))
    encoder_only = model.compute_loss(text, mel, lengths, 16, torch.Generator().manual_seed(1), decoder_items=0)
    one = model.compute_loss(text, mel, lengths, 16, torch.Generator().manual_seed(1), decoder_items=1)
    torch.testing.assert_close(encoder_only["duration"], full["duration"])
    torch.testing.assert_close(encoder_only["prior"], full["prior"])
    assert float(encoder_only["diffusion"]) == 0.0 and float(full["diffusion"]) > 0
    assert float(one["diffusion"]) > 0 and not torch.equal(one["diffusion"], full["diffusion"])


def test_flat_alignment_splits_each_utterances_frames_evenly_in_order():
    text_mask = (torch.arange(6) < torch.tensor([6, 4]).unsqueeze(1)).float().unsqueeze(1)
    mel_mask = (torch.arange(20) < torch.tensor([20, 11]).unsqueeze(1)).float().unsqueeze(1)
    path = flat_alignment(text_mask, mel_mask)
    torch.testing.assert_close(path.sum(1), mel_mask.squeeze(1))  # every valid frame to one phoneme, padding to none
    durations = path.sum(-1)
    assert durations[0].tolist() == [3, 3, 4, 3, 3, 4] and durations[1].tolist() == [2, 3, 3, 3, 0, 0]
    first_frame = path.argmax(-1)  # monotonic: phoneme i starts where i - 1 ended
    assert bool((first_frame[0, 1:] == durations[0].cumsum(0)[:-1]).all())


def test_flat_start_ignores_mu_for_the_alignment_and_learns_no_durations():
    model, text, mel, lengths = loss_inputs()
    flat = model.compute_loss(text, mel, lengths, 16, torch.Generator().manual_seed(1), flat_start=True)
    mas = model.compute_loss(text, mel, lengths, 16, torch.Generator().manual_seed(1))
    assert float(flat["duration"].detach()) == 0.0 and float(mas["duration"].detach()) > 0
    assert float(flat["prior"].detach()) > float(mas["prior"].detach())  # MAS picks the likeliest path under mu; the even split is not it
    flat["total"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in model.encoder.duration.parameters())
    assert float(model.encoder.proj_mu.weight.grad.abs().sum()) > 0  # mu is fitted on the even split


def test_prior_repeat_is_item_major():
    model = tiny_model()
    prior = model.encode(text_batch(2))
    tripled = prior.repeat(3)
    assert tripled.mu.shape[0] == 6 and tripled.emotion.tolist() == [1, 1, 1, 3, 3, 3]
    torch.testing.assert_close(tripled.mu[3], prior.mu[1])
    assert tripled.lengths.tolist() == [int(prior.lengths[0])] * 3 + [int(prior.lengths[1])] * 3
    assert tripled.word_frame_spans[4] == prior.word_frame_spans[1]


def test_fast_mish_equals_torch_mish_with_and_without_autograd():
    from rlhf_tts.models.gradtts.unet import Mish

    x = torch.cat([torch.linspace(-100.0, 100.0, 20001), torch.randn(1000) * 3])
    expected = torch.nn.functional.mish(x)
    with torch.no_grad():
        fast = Mish()(x.clone())
    assert torch.allclose(fast, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fast, x)  # it is an activation, not the identity
    leaf = x.clone().requires_grad_(True)
    Mish()(leaf).sum().backward()
    reference = x.clone().requires_grad_(True)
    torch.nn.functional.mish(reference).sum().backward()
    assert torch.allclose(leaf.grad, reference.grad)
    with torch.no_grad():  # the no-grad path must not write into its input
        before = x.clone()
        Mish()(x)
        assert torch.equal(x, before)
