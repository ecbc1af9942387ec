"""Attention maps: what the pictures show is the model's own attention."""

import pytest
import torch

from transformer.figures.attention import attention_maps
from transformer.model import make_model
from transformer.model.attention import MultiHeadedAttention

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
    # The modules are left as they were: no hook, no weights kept.
    modules = [m for m in model.modules() if isinstance(m, MultiHeadedAttention)]
    assert all(not m._forward_pre_hooks and not hasattr(m, "attn") for m in modules)


@pytest.mark.parametrize("train", [False, True])
def test_the_weights_are_those_the_module_attends_with(train):
    """weights() @ V, through the output projection, is the module's own output
    (whichever kernel computed it)."""
    torch.manual_seed(0)
    m = MultiHeadedAttention(4, 32, dropout=0.0).double().train(train)
    x, memory = torch.randn(3, 5, 32, dtype=torch.float64), torch.randn(3, 7, 32, dtype=torch.float64)
    mask = torch.rand(3, 1, 7) > 0.3
    mask[..., 0] = True
    w = m.weights(x, memory, mask)  # (3, 4, 5, 7)
    values = m.linears[2](memory).view(3, 7, 4, 8).transpose(1, 2)
    expected = m.linears[3]((w @ values).transpose(1, 2).reshape(3, 5, 32))
    torch.testing.assert_close(m(x, memory, memory, mask), expected, atol=1e-12, rtol=0)
    assert (w.masked_select(~mask.unsqueeze(1).expand_as(w)) == 0).all()


def test_missing_matplotlib_is_explained(monkeypatch):
    import builtins

    from transformer.figures import drawing

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[plot\]\""):
        drawing.require_matplotlib()
