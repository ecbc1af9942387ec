"""The hand count of model FLOPs against PyTorch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from transformer.config import ModelConfig
from transformer.data.batching import Batch
from transformer.fast.flops import batch_training_flops, forward_flops, training_flops
from transformer.model import make_model

CFG = ModelConfig(N=2, d_model=32, d_ff=48, h=4, dropout=0.0, attention="explicit")
VOCAB = 13


def counted(batch_size, src_len, tgt_len, backward):
    """FLOPs that FlopCounterMode sees for the model's forward (and backward) pass over a
    batch without padding (so that every computed product is a real one)."""
    torch.manual_seed(0)
    model = make_model(VOCAB, VOCAB, N=CFG.N, d_model=CFG.d_model, d_ff=CFG.d_ff, h=CFG.h, dropout=0.0,
                       attention="explicit")
    src = torch.randint(3, VOCAB, (batch_size, src_len))
    tgt = torch.randint(3, VOCAB, (batch_size, tgt_len + 1))
    batch = Batch(src, tgt, pad=0)
    with FlopCounterMode(display=False) as counter:
        out = model.generator(model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask))
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("batch_size, src_len, tgt_len", [(1, 5, 5), (3, 7, 4), (2, 3, 9)])
def test_forward_flops_match_the_counter(batch_size, src_len, tgt_len):
    expected = forward_flops(CFG, VOCAB, [src_len] * batch_size, [tgt_len] * batch_size)
    assert expected == counted(batch_size, src_len, tgt_len, backward=False)


def test_training_flops_match_the_counter():
    assert training_flops(CFG, VOCAB, [6, 6], [8, 8]) == counted(2, 6, 8, backward=True)


def test_flops_add_over_sentences_and_check_lengths():
    one = forward_flops(CFG, VOCAB, [4], [6])
    two = forward_flops(CFG, VOCAB, [5], [3])
    assert forward_flops(CFG, VOCAB, [4, 5], [6, 3]) == one + two
    with pytest.raises(ValueError, match="2 source lengths for 1 target"):
        forward_flops(CFG, VOCAB, [4, 5], [6])


def test_a_padded_batch_counts_its_real_lengths():
    src = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    tgt = torch.tensor([[1, 5, 6, 0, 0], [1, 5, 6, 7, 8]])  # decoder inputs of 3 and 4 tokens
    batch = Batch(src, tgt, pad=0)
    assert batch_training_flops(CFG, VOCAB, batch, 0) == training_flops(CFG, VOCAB, [3, 4], [3, 4])
