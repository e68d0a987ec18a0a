"""Monotonic alignment search (MAS), as in Glow-TTS and Grad-TTS.

Grad-TTS has no external aligner: during training it aligns phonemes to mel frames by finding, for each
utterance, the monotonic surjective path through the text-by-frame log-likelihood matrix that has the
highest total log-likelihood, and it trains its duration predictor on the durations that path implies.
The reference implementations do that search with a Cython (or numba) extension; this one is written in
vectorised torch, parallel over the batch and text dimensions with a Python loop only over mel frames,
so there is no compiled build step and it runs unchanged on CPU and CUDA tensors.

Tie rule: when staying on the same text token and advancing from the previous one score exactly the
same, the backtrack stays (it moves to the previous token only on a strictly greater score, or when it
must). This is the rule of the Glow-TTS Cython code; with constant log-likelihoods it gives every token
but the last one frame and the last token the rest.
"""

from __future__ import annotations

import torch

__all__ = ["monotonic_alignment_search", "durations_from_alignment"]

# Score of cells no path can reach. Finite so that no -inf arithmetic produces NaNs, and far below any sum of
# real log-likelihoods; the DP only adds log-likelihoods to it, so unreachable cells stay far below.
_IMPOSSIBLE = -1e30


def _lengths(mask: torch.Tensor, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Per-item lengths of a (B, T) prefix mask (bool or 0/1), checked to be a prefix mask."""
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    mask = mask.to(device=device) != 0
    lengths = mask.sum(dim=1)
    prefix = torch.arange(shape[1], device=device)[None, :] < lengths[:, None]
    if not torch.equal(mask, prefix):
        raise ValueError(f"{name} must be a prefix mask (ones then zeros) for every batch item")
    return lengths


@torch.no_grad()
def monotonic_alignment_search(log_p: torch.Tensor, text_mask: torch.Tensor, mel_mask: torch.Tensor) -> torch.Tensor:
    """Most likely monotonic surjective alignment of text tokens to mel frames.

    Args:
        log_p: (B, T_text, T_mel) log-likelihood of mel frame j under text token i. Values outside the
            masks are ignored (they may be anything, NaN included); values inside must be finite.
        text_mask: (B, T_text) prefix mask of valid text tokens, bool or 0/1.
        mel_mask: (B, T_mel) prefix mask of valid mel frames, bool or 0/1.

    Returns:
        (B, T_text, T_mel) tensor of 0/1 with log_p's dtype and device: for each item, every valid frame
        j is assigned to exactly one token i(j), with i(0) = 0, i(last frame) = last token and
        i(j + 1) - i(j) in {0, 1}, maximising sum_j log_p[i(j), j]; zeros outside the masks.

    Raises:
        ValueError: on bad shapes or masks, or when an item has more text tokens than mel frames (or no
            text tokens but some mel frames), naming the batch index.
    """
    if log_p.dim() != 3:
        raise ValueError(f"log_p must be (B, T_text, T_mel), got shape {tuple(log_p.shape)}")
    b, t_text, t_mel = log_p.shape
    device = log_p.device
    text_len = _lengths(text_mask, "text_mask", (b, t_text), device)
    mel_len = _lengths(mel_mask, "mel_mask", (b, t_mel), device)
    for idx, (tl, ml) in enumerate(zip(text_len.tolist(), mel_len.tolist())):
        if tl > ml:
            raise ValueError(f"batch index {idx}: {tl} text tokens but only {ml} mel frames; MAS needs T_text <= T_mel")
        if tl == 0 and ml > 0:
            raise ValueError(f"batch index {idx}: no text tokens to align {ml} mel frames to")

    if b == 0 or t_text == 0 or t_mel == 0:
        return torch.zeros(b, t_text, t_mel, dtype=log_p.dtype, device=device)

    # q[j, b, i + 1] = best score of a path for item b ending at token i on frame j, laid out frame-major so
    # each step writes one contiguous slab; q[:, :, 0] stands for the non-existent token -1. Only token 0
    # is reachable on frame 0; every other cell of frame 0 starts impossible, and a cell with i > j only
    # has such cells as predecessors, so it stays near -1e30, far below any real path. Cells outside the masks
    # feed only cells outside the masks, later frames or higher tokens, which the backtrack never reads,
    # so padding (even NaN or inf) is ignored without being cleaned.
    q = torch.empty(t_mel, b, t_text + 1, dtype=torch.float64, device=device)
    q[:, :, 0] = _IMPOSSIBLE
    q[0, :, 1:] = _IMPOSSIBLE
    q[0, :, 1] = log_p[:, 0, 0]
    # step[j, b, i] = 1 when the backtrack at (i, j) moves to token i - 1 for frame j - 1: only when that
    # scores strictly more (ties stay), and only on the item's own frames, so that it waits at its last
    # token until its last frame. When i == j staying is impossible, so the move is forced; at i == 0 the
    # token -1 column is impossible, so it never moves below token 0. (Frame 0 is never read.)
    step = torch.empty(t_mel, b, t_text, dtype=torch.long, device=device)
    active = torch.arange(t_mel, device=device)[:, None] < mel_len[None, :]  # (T_mel, B)

    # Per-frame views, made once: indexing inside the loops would cost more than the arithmetic.
    stay, advance = q[:, :, 1:].unbind(0), q[:, :, :-1].unbind(0)
    frames, steps, active_long = log_p.unbind(2), step.unbind(0), active[:, :, None].long().unbind(0)
    for j in range(1, t_mel):
        torch.maximum(stay[j - 1], advance[j - 1], out=stay[j])
        stay[j].add_(frames[j])
        torch.gt(advance[j - 1], stay[j - 1], out=steps[j])
        steps[j].mul_(active_long[j])

    # Backtrack from (T_text_b - 1, T_mel_b - 1).
    i = (text_len - 1).clamp(min=0)[:, None]
    path = torch.empty(t_mel, b, 1, dtype=torch.long, device=device)
    rows = path.unbind(0)
    for j in range(t_mel - 1, 0, -1):
        rows[j].copy_(i)
        i = i - steps[j].gather(1, i)
    rows[0].copy_(i)

    # Frames past an item's end point at its last token but write 0 there.
    out = torch.zeros(b, t_text, t_mel, dtype=log_p.dtype, device=device)
    return out.scatter_(1, path.permute(1, 2, 0), active.t()[:, None, :].to(log_p.dtype))


def durations_from_alignment(alignment: torch.Tensor) -> torch.Tensor:
    """Frames per text token, (B, T_text) long, from a (B, T_text, T_mel) 0/1 alignment."""
    if alignment.dim() != 3:
        raise ValueError(f"alignment must be (B, T_text, T_mel), got shape {tuple(alignment.shape)}")
    return alignment.sum(dim=-1).round().long()
