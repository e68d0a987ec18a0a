"""Grad-TTS's score network: a 2-D U-Net over (mel bins × frames) with `mu` as an input channel.

Follows Popov et al. (2021) / the official GradLogPEstimator2d: ResNet blocks with a time embedding,
linear attention with ReZero, stride-2 down/up-sampling, masks carried through every level. Speaker
and emotion enter as in Grad-TTS's multi-speaker model (an extra input channel made from the
condition vector) and, additionally, through the time embedding, which conditions every block.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

Tensor = torch.Tensor


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor, scale: float = 1000.0) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        angles = scale * t.float().unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Mish(nn.Module):
    """Mish, x · tanh(softplus(x)), with a faster no-grad path: tanh(softplus(x)) = n / (n + 2) for
    n = e^x (e^x + 2), in place. ATen's CPU mish was a quarter of a sampler step of the tiny U-Net;
    this path is ~2x faster per call (equal to 1e-6, tested). With autograd recording it is `F.mish`,
    whose backward is fused. No parameters, so checkpoints are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.mish(x)
        e = x.clamp(max=20.0).exp_()  # beyond 20, n / (n + 2) is 1 in float32
        n = e.add(2.0).mul_(e)  # e^x (e^x + 2)
        return n.div_(n + 2.0).mul_(x)


def masked_group_norm(x: Tensor, mask: Tensor, norm: nn.GroupNorm, padded: bool | None = None) -> Tensor:
    """`norm` (a GroupNorm's parameters) with statistics over the frames `mask` (B, 1, 1, T) keeps.

    Plain GroupNorm averages over padded frames too, so an utterance padded in a batch was
    normalised differently from the same utterance alone: the network is trained on unpadded
    crops, and at inference (padded batches) its score was wrong (denoising loss ~30x the
    crop loss at t >= 0.6, and samples diverged). With masked statistics an item's score does not
    depend on what it is batched with (tested); without padding this equals `norm(x)`. `padded`
    (whether `mask` drops any frame) is computed once per forward by `ScoreUNet`: reading it here
    in every layer would be a device-to-host sync per layer on CUDA.
    """
    if not (bool(mask.min() <= 0) if padded is None else padded):
        return norm(x)
    b, c, f, t = x.shape
    g = norm.num_groups
    grouped = x.reshape(b, g, c // g, f, t)
    m = mask.reshape(b, 1, 1, 1, t).to(x.dtype)
    count = (m.sum(dim=(2, 3, 4), keepdim=True) * (c // g) * f).clamp_min(1.0)
    mean = (grouped * m).sum(dim=(2, 3, 4), keepdim=True) / count
    var = ((grouped - mean).pow(2) * m).sum(dim=(2, 3, 4), keepdim=True) / count
    normed = ((grouped - mean) * torch.rsqrt(var + norm.eps)).reshape(b, c, f, t)
    return normed * norm.weight.reshape(1, c, 1, 1) + norm.bias.reshape(1, c, 1, 1)


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        # Kept as Sequential (conv, norm, act) so the parameter names stay Grad-TTS's.
        self.block = nn.Sequential(nn.Conv2d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), Mish())

    def forward(self, x: Tensor, mask: Tensor, padded: bool | None = None) -> Tensor:
        conv, norm, act = self.block
        return act(masked_group_norm(conv(x * mask), mask, norm, padded)) * mask


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor, time_emb: Tensor, padded: bool | None = None) -> Tensor:
        h = self.block1(x, mask, padded) + self.mlp(time_emb).unsqueeze(-1).unsqueeze(-1)
        return self.block2(h, mask, padded) + self.res_conv(x * mask)


class LinearAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None, padded: bool | None = None) -> Tensor:
        """`mask` (B, 1, 1, T): padded frames are neither attended to nor averaged into the context."""
        b, _, h, w = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, self.heads, -1, h * w).unbind(1)
        if mask is not None and (bool(mask.min() <= 0) if padded is None else padded):  # unpadded: nothing to mask
            keep = mask.expand(b, 1, h, w).reshape(b, 1, 1, h * w) > 0
            k = k.masked_fill(~keep, float("-inf"))
            v = v * keep
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class ReZeroAttention(nn.Module):
    """x + g · attention(x), g initialised to zero so training starts from the plain ResNet."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.attention = LinearAttention(dim, heads, dim_head)
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, mask: Tensor | None = None, padded: bool | None = None) -> Tensor:
        return x + self.g * self.attention(x, mask, padded)


class ScoreUNet(nn.Module):
    """s_theta(X_t, mu, t, cond): (B, n_feats, T) → (B, n_feats, T); T must be a multiple of `length_multiple`."""

    def __init__(
        self, dim: int, dim_mults: tuple[int, ...], cond_dim: int, n_feats: int = 80, pe_scale: float = 1000.0,
        attention_heads: int = 4, attention_dim_head: int = 32,
    ) -> None:
        super().__init__()
        attention = lambda d: ReZeroAttention(d, attention_heads, attention_dim_head)  # noqa: E731
        self.pe_scale = pe_scale
        self.length_multiple = 2 ** (len(dim_mults) - 1)
        if n_feats % self.length_multiple:
            raise ValueError(f"n_feats={n_feats} must be divisible by {self.length_multiple} for dim_mults={dim_mults}")
        self.cond_channel = nn.Sequential(nn.Linear(cond_dim, 4 * cond_dim), Mish(), nn.Linear(4 * cond_dim, n_feats))
        self.time_pos_emb = SinusoidalPosEmb(dim)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim * 4), Mish(), nn.Linear(dim * 4, dim))
        self.cond_to_time = nn.Linear(cond_dim, dim)
        dims = [3, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(d_in, d_out, dim), ResnetBlock(d_out, d_out, dim), attention(d_out),
                nn.Conv2d(d_out, d_out, 3, 2, 1) if not last else nn.Identity(),
            ]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, dim)
        self.mid_attn = attention(mid)
        self.mid_block2 = ResnetBlock(mid, mid, dim)
        for d_in, d_out in reversed(in_out[1:]):
            self.ups.append(nn.ModuleList([
                ResnetBlock(d_out * 2, d_in, dim), ResnetBlock(d_in, d_in, dim), attention(d_in),
                nn.ConvTranspose2d(d_in, d_in, 4, 2, 1),
            ]))
        self.final_block = Block(dim, dim)
        self.final_conv = nn.Conv2d(dim, 1, 1)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x, mu: (B, n_feats, T); mask: (B, 1, T); t: (B,); cond: (B, cond_dim)."""
        time_emb = self.time_mlp(self.time_pos_emb(t, self.pe_scale)) + self.cond_to_time(cond)
        cond_map = self.cond_channel(cond).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        h = torch.stack([mu, x, cond_map], dim=1)
        mask = mask.unsqueeze(1)  # (B, 1, 1, T)
        # One host read per forward (not per layer). Unpadded (training crops): every level takes the
        # native GroupNorm and unmasked attention. Padded: every level masks (exact even where a
        # downsampled mask happens to keep every frame).
        p = bool(mask.min() <= 0)
        masks = [mask]
        hiddens = []
        for resnet1, resnet2, attn, downsample in self.downs:
            m = masks[-1]
            h = attn(resnet2(resnet1(h, m, time_emb, p), m, time_emb, p), m, p)
            hiddens.append(h)
            h = downsample(h * m)
            masks.append(m[:, :, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, m, time_emb, p), m, p), m, time_emb, p)
        for resnet1, resnet2, attn, upsample in self.ups:
            m = masks.pop()
            h = torch.cat([h, hiddens.pop()], dim=1)
            h = attn(resnet2(resnet1(h, m, time_emb, p), m, time_emb, p), m, p)
            h = upsample(h * m)
        h = self.final_block(h, mask, p)
        return (self.final_conv(h * mask) * mask).squeeze(1)
