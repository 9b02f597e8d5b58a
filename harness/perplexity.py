"""Paper-protocol perplexity: non-overlapping windows of ``seqlen`` tokens, the last partial window
dropped; each window's loss is the mean cross-entropy over its ``seqlen − 1`` predicted tokens;
perplexity = exp(mean over windows of those means)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a (1, N) token stream into (n_windows, seqlen), dropping the last partial window."""
    n = tokens.shape[-1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens.reshape(-1)[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def window_nlls(model: nn.Module, wins: torch.Tensor, batch_size: int, device: torch.device,
                progress: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (n_windows,), computed in float32."""
    out = []
    for b in tqdm(range(0, wins.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = wins[b : b + batch_size].to(device)  # (B, seqlen)
        logits = model(ids, use_cache=False).logits[:, :-1]  # (B, seqlen-1, vocab)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out.append(loss.view(ids.shape[0], -1).mean(1).cpu())
    return torch.cat(out).double()


def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, max_windows: int | None,
               batch_size: int, device: torch.device, progress: bool = False) -> dict[str, Any]:
    """Perplexity of ``model`` on a (1, N) token stream; returns ppl, mean nll, windows, tokens."""
    wins = windows(tokens, seqlen, max_windows)
    if wins.shape[0] == 0:
        raise ValueError(f"the text has {tokens.shape[-1]} tokens, fewer than one window of {seqlen}")
    nll = window_nlls(model, wins, batch_size, device, progress)
    mean = float(nll.mean())
    return {"ppl": math.exp(mean), "nll": mean, "windows": int(wins.shape[0]), "tokens": int(wins.numel())}
