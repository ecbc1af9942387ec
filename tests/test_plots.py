"""Attention maps: what the pictures show is the model's own attention."""

import pytest
import torch

from transformer.attention import MultiHeadedAttention
from transformer.model import make_model
from transformer.plots import attention_maps, record_attention

PAD = 0


def test_attention_maps_are_masked_distributions():
    torch.manual_seed(0)
    model = make_model(11, 11, N=2, d_model=32, d_ff=64, h=4, dropout=0.0)
    src, tgt = [5, 6, 7, 8, 2], [1, 4, 9, 3]
    maps = attention_maps(model, src, tgt, PAD)
    assert maps["encoder"].shape == (2, 4, 5, 5)
    assert maps["decoder_self"].shape == (2, 4, 4, 4)
    assert maps["encoder_decoder"].shape == (2, 4, 4, 5)
    for weights in maps.values():
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    # The decoder sees no future position.
    assert maps["decoder_self"].triu(diagonal=1).abs().max() == 0
    # Recording is switched off again, and SDPA is used as before.
    modules = [m for m in model.modules() if isinstance(m, MultiHeadedAttention)]
    assert all(not m.keep_attention and m.attn is None for m in modules)


def test_recording_does_not_change_the_output():
    torch.manual_seed(0)
    model = make_model(11, 11, N=1, d_model=32, d_ff=64, h=4, dropout=0.0).eval()
    src = torch.tensor([[5, 6, 7, 2]])
    tgt = torch.tensor([[1, 4, 9]])
    from transformer.batching import padding_mask, target_mask

    plain = model(src, tgt, padding_mask(src, PAD), target_mask(tgt, PAD))
    with record_attention(model):
        recorded = model(src, tgt, padding_mask(src, PAD), target_mask(tgt, PAD))
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=0)


def test_missing_matplotlib_is_explained(monkeypatch):
    import builtins

    from transformer import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[plot\]\""):
        plots.require_matplotlib()
