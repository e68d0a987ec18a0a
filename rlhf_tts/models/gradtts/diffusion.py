"""The Grad-TTS SDE as pure tensor functions (METHOD.md §1).

Forward: `X_t | X_0 ~ N(rho_t X_0 + (1 - rho_t) mu, lambda_t I)` with `beta_t = b0 + (b1 - b0) t`.
Reverse (one Euler–Maruyama step of size h from t): `X_{t-h} ~ N(m, beta_t h I)` with
`m = X_t - beta_t h (0.5 (mu - X_t) - s)`: the Gaussian policy that EASPO optimises. Everything here
is shared by pretraining, sampling and the preference algorithms, so they agree by construction.
"""

from __future__ import annotations

from typing import Literal

import torch

Tensor = torch.Tensor


def _expand(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-item time (B,) against a (B, n_feats, T) tensor."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() == 1 else t


def beta(t: Tensor | float, beta_min: float, beta_max: float) -> Tensor | float:
    return beta_min + (beta_max - beta_min) * t


def cumulative_beta(t: Tensor | float, beta_min: float, beta_max: float) -> Tensor | float:
    """B(t) = ∫_0^t beta_s ds."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t * t


def forward_marginal(x0: Tensor, mu: Tensor, t: Tensor | float, beta_min: float, beta_max: float) -> tuple[Tensor, Tensor]:
    """Mean and variance of X_t given X_0 (variance broadcast like t)."""
    b = cumulative_beta(_expand(t, x0), beta_min, beta_max)
    rho = torch.exp(-0.5 * b)
    return rho * x0 + (1.0 - rho) * mu, 1.0 - torch.exp(-b)


def diffuse(x0: Tensor, mu: Tensor, t: Tensor, noise: Tensor, beta_min: float, beta_max: float) -> Tensor:
    mean, variance = forward_marginal(x0, mu, t, beta_min, beta_max)
    return mean + torch.sqrt(variance) * noise


def score_matching_loss(score: Tensor, noise: Tensor, t: Tensor, mask: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """|| sqrt(lambda_t) s + xi ||² averaged over masked elements (Grad-TTS's decoder loss)."""
    variance = 1.0 - torch.exp(-cumulative_beta(_expand(t, score), beta_min, beta_max))
    residual = (torch.sqrt(variance) * score + noise) * mask
    return residual.pow(2).sum() / (mask.sum() * score.shape[1])


def reverse_step_mean(
    x_t: Tensor, mu: Tensor, score: Tensor, t: Tensor | float, h: float, beta_min: float, beta_max: float
) -> tuple[Tensor, Tensor]:
    """Mean and variance of the stochastic reverse step X_t → X_{t-h}."""
    b = beta(_expand(t, x_t), beta_min, beta_max)
    mean = x_t - b * h * (0.5 * (mu - x_t) - score)
    return mean, torch.as_tensor(b * h, dtype=x_t.dtype, device=x_t.device)


def ode_step(x_t: Tensor, mu: Tensor, score: Tensor, t: Tensor | float, h: float, beta_min: float, beta_max: float) -> Tensor:
    """One step of the probability-flow ODE."""
    b = beta(_expand(t, x_t), beta_min, beta_max)
    return x_t - 0.5 * b * h * (mu - x_t - score)


def x0_estimate(x_t: Tensor, mu: Tensor, score: Tensor, t: Tensor | float, beta_min: float, beta_max: float) -> Tensor:
    """One-step clean estimate (Tweedie): (x_t + lambda_t s - (1 - rho_t) mu) / rho_t."""
    b = cumulative_beta(_expand(t, x_t), beta_min, beta_max)
    rho = torch.exp(-0.5 * b)
    return (x_t + (1.0 - torch.exp(-b)) * score - (1.0 - rho) * mu) / rho


def gaussian_log_ratio(
    x: Tensor, mean_a: Tensor, mean_b: Tensor, variance: Tensor | float, mask: Tensor,
    reduce: Literal["sum", "mean"] = "mean",
) -> Tensor:
    """log N(x; mean_a, v) - log N(x; mean_b, v) per item, over masked elements.

    Policy and reference share the variance, so the normalisers cancel:
    (||x - mean_b||² - ||x - mean_a||²) / (2 v). `reduce` is the paper's open choice: "mean" (SPO's
    code, whose β = 10 assumes it; the default) or "sum".
    """
    variance = torch.as_tensor(variance, dtype=x.dtype, device=x.device)
    if variance.dim() == 1:
        variance = variance.reshape(-1, *([1] * (x.dim() - 1)))
    mask = mask.expand_as(x).to(x.dtype)
    per_element = ((x - mean_b).pow(2) - (x - mean_a).pow(2)) / (2.0 * variance) * mask
    dims = tuple(range(1, x.dim()))
    total = per_element.sum(dim=dims)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / mask.sum(dim=dims).clamp_min(1.0)
    raise ValueError(f"reduce must be 'sum' or 'mean', not {reduce!r}")


def prior_band_levels(x: Tensor, mu: Tensor, mask: Tensor) -> Tensor:
    """`x` with each mel band's mean over the utterance's frames replaced by `mu`'s: (B, n_feats, T).

    Grad-TTS fits mu to the mel frame by frame, so a band's utterance-level mean is the encoder's to
    say, and a decoder that sampled well would leave it there. The tiny decoders do not: their outputs
    sit up to 0.5 log-mel off the recordings, which the emotion judge hears as emotion (docs/findings.md,
    *The level is the judge's lever*). This keeps the decoder's contour within each band (every frame
    moves by the band's one offset) and takes the band's level from mu. Padded frames stay zero.
    """
    return (x + band_means(mu - x, mask).unsqueeze(-1)) * mask


def band_means(x: Tensor, mask: Tensor) -> Tensor:
    """(B, n_feats, T) → (B, n_feats): each mel band's mean over the masked frames."""
    m = mask.to(x.dtype)
    return (x * m).sum(dim=-1) / m.sum(dim=(1, 2)).clamp_min(1.0).unsqueeze(1)
