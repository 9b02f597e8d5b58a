"""The perplexity window loop against an independent computation through the model's own loss."""
from __future__ import annotations

import math

import pytest
import torch

from harness.perplexity import perplexity, windows
from tests.conftest import requires_data, tiny_model

pytestmark = requires_data


def test_windows_drop_the_partial_last_one():
    t = torch.arange(3 * 10 + 7).view(1, -1)
    w = windows(t, 10)
    assert w.shape == (3, 10) and w[2, 0].item() == 20
    assert windows(t, 10, max_windows=2).shape == (2, 10)
    assert windows(t, 10, max_windows=9).shape == (3, 10)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-gpt2"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_perplexity_matches_the_models_own_loss(name, batch_size):
    """Reference: Hugging Face's ``labels=`` loss per window (mean over seqlen−1 shifted tokens),
    exp of the mean over windows — the paper code's ``nlls`` loop written independently."""
    model = tiny_model(name).model
    g = torch.Generator().manual_seed(21)
    seqlen = 32
    tokens = torch.randint(0, model.config.vocab_size, (1, 5 * seqlen + 11), generator=g)
    got = perplexity(model, tokens, seqlen, None, batch_size, torch.device("cpu"))
    nlls = []
    with torch.no_grad():
        for i in range(5):
            ids = tokens[:, i * seqlen : (i + 1) * seqlen]
            nlls.append(model(ids, labels=ids).loss.double().item() * seqlen)  # the paper code's bookkeeping
    ref = math.exp(sum(nlls) / (5 * seqlen))
    assert got["windows"] == 5 and got["tokens"] == 5 * seqlen
    assert got["ppl"] == pytest.approx(ref, rel=1e-5)


def test_too_short_text_is_an_error():
    model = tiny_model("tiny-llama").model
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.zeros(1, 10, dtype=torch.long), 32, None, 1, torch.device("cpu"))
