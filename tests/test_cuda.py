"""The CUDA paths users take on GPU workers: the same maths on CUDA as on CPU.

Skipped where there is no GPU (CI); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
Each test runs one computation on CPU and on CUDA with the same weights and inputs and compares, so
a device mismatch (a CPU generator driving a CUDA tensor, a buffer left on the CPU, a host-side
index) fails here rather than on a user's cluster.
"""

import pytest
import torch

from rlhf_tts.algos import easpo
from rlhf_tts.config import load_config
from rlhf_tts.models.easpm import EASPM
from test_easpo import emotion_energy_reward
from test_gradtts import text_batch, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_float32():
    """cuDNN convolutions default to TF32 (10-bit mantissa), ~1e-3 relative apart from the CPU's
    float32 (measured on an H100); these tests compare devices at 1e-4, so both compute in float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Equal up to float32 rounding on two devices."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max()) <= tol * (1.0 + float(b.abs().max()))


def test_gradtts_encode_score_and_losses_match_cpu():
    cpu_model, text = tiny_model(), text_batch(3, 9)
    gpu_model = tiny_model().to(CUDA)
    prior_cpu = cpu_model.encode(text)
    prior_gpu = gpu_model.encode(text.to(CUDA))
    assert torch.equal(prior_cpu.durations, prior_gpu.durations.cpu())
    assert close(prior_cpu.mu, prior_gpu.mu)
    x = prior_cpu.mu + torch.randn(prior_cpu.mu.shape, generator=torch.Generator().manual_seed(0))
    assert close(cpu_model.score(x, 0.5, prior_cpu), gpu_model.score(x.to(CUDA), 0.5, prior_gpu))
    assert close(cpu_model.score(x, 0.5, prior_cpu, guidance=2.0), gpu_model.score(x.to(CUDA), 0.5, prior_gpu, guidance=2.0))

    mel = torch.randn(3, 80, 40, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([40, 33, 27])
    losses = []  # eval mode: dropout masks come from each device's own RNG, so training mode cannot match
    for model, device in ((cpu_model.eval(), "cpu"), (gpu_model.eval(), CUDA)):
        model.zero_grad()
        out = model.compute_loss(text.to(device), mel.to(device), lengths.to(device), 16,
                                 torch.Generator().manual_seed(2))
        out["total"].backward()
        losses.append((out, [p.grad.detach().cpu() for p in model.decoder.parameters() if p.grad is not None]))
    (out_cpu, grads_cpu), (out_gpu, grads_gpu) = losses
    for key in ("duration", "prior", "diffusion", "total"):
        assert close(out_cpu[key], out_gpu[key]), key
    assert len(grads_cpu) == len(grads_gpu) > 0
    assert all(close(a, b, 1e-3) for a, b in zip(grads_cpu, grads_gpu))


def test_sampling_and_candidates_run_on_cuda_with_a_cuda_generator():
    model = tiny_model().to(CUDA)
    prior = model.encode(text_batch(2, 7).to(CUDA))
    g = torch.Generator(device=CUDA).manual_seed(0)
    mel = model.sample(prior, n_steps=4, generator=g)
    again = model.sample(prior, n_steps=4, generator=torch.Generator(device=CUDA).manual_seed(0))
    assert mel.device.type == "cuda" and torch.isfinite(mel).all() and torch.equal(mel, again)
    pool, mean, variance = model.candidates(mel, 0.5, 0.25, prior, k=4, generator=g)
    assert pool.shape == (4, *mel.shape) and pool.device.type == "cuda"
    assert float((pool - mean.unsqueeze(0)).detach().std()) > 0  # k distinct draws around one mean


def test_easpo_rollout_and_learner_update_on_cuda():
    cfg = load_config(None, ["preset=smoke", "align.threshold=0.0", "align.sampler_steps=6"]).align
    policy = tiny_model().to(CUDA)
    result = easpo.rollout(policy, text_batch(3, 9).to(CUDA), cfg, emotion_energy_reward,
                           torch.Generator(device=CUDA).manual_seed(0))
    pairs = result.batch
    assert len(pairs) > 0 and pairs.x_win.device.type == "cuda"
    t_lo, t_hi = cfg.timestep_range()
    assert bool(((pairs.t >= t_lo - 1e-6) & (pairs.t <= t_hi + 1e-6)).all())
    learner = easpo.EASPOLearner(policy, cfg)
    before = {k: v.clone() for k, v in learner.decoder_state().items()}
    stats = learner.update(pairs, torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(stats["loss"]))
    after = learner.decoder_state()
    assert all(v.device.type == "cpu" for v in after.values())  # what travels to rollout actors
    assert any(not torch.equal(before[k], after[k]) for k in before)
    untouched = tiny_model().encoder.state_dict()
    assert all(torch.equal(v.cpu(), untouched[k]) for k, v in learner.policy.encoder.state_dict().items())


def test_easpm_scores_match_cpu():
    ecfg = load_config(None, ["preset=smoke"]).easpm
    torch.manual_seed(0)
    cpu_model = EASPM(ecfg, n_feats=80).eval()
    gpu_model = EASPM(ecfg, n_feats=80).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(CUDA)
    states = torch.randn(6, 80, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(6, 1, 32)
    mask[2:, :, 20:] = 0
    t = torch.linspace(0, 1, 6)
    prompts = gpu_model.default_prompts()[:5] + gpu_model.default_prompts()[:1]
    with torch.no_grad():
        cpu = cpu_model.score(prompts, states, mask, t)
        gpu = gpu_model.score(prompts, states.to(CUDA), mask.to(CUDA), t.to(CUDA))
    assert gpu.device.type == "cuda" and close(cpu, gpu)
