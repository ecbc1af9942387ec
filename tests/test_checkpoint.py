import os

import pytest
import torch

from transformer.config import Config, ModelConfig, to_dict
from transformer.data.batching import Batch, pad_sequences
from transformer.data.tokenizers import IdTokenizer
from transformer.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_write,
    build_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

MODEL = ModelConfig(N=1, d_model=32, d_ff=64, h=4, dropout=0.0, tie_embeddings=True)


def saved(tmp_path, **extra):
    torch.manual_seed(0)
    cfg = Config(model=MODEL)
    tok = IdTokenizer(11)
    model = build_model(cfg.model, tok)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tok.state_dict(), **extra})
    return path, model


def test_save_then_load_gives_identical_logits(tmp_path):
    path, model = saved(tmp_path)
    loaded, tok, cfg = load_model(path)
    assert cfg.model == MODEL and tok.vocab_size == 11
    batch = Batch(pad_sequences([[3, 4, 5], [6, 7]], 0), pad_sequences([[1, 3, 4, 5], [1, 6, 7]], 0))
    model.eval()
    args = (batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)
    assert torch.equal(model.generator(model(*args)), loaded.generator(loaded(*args)))
    # Tying survives the round trip.
    assert loaded.generator.proj.weight.data_ptr() == loaded.src_embed[0].lut.weight.data_ptr()


def test_checkpoint_is_plain_data(tmp_path):
    """It loads with weights_only=True: no pickled classes, so loading runs no code."""
    path, _ = saved(tmp_path)
    state = torch.load(path, weights_only=True)
    assert state["format_version"] == FORMAT_VERSION
    assert isinstance(state["config"], dict) and isinstance(state["tokenizer"], dict)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable checkpoint"),
        (b"this is not a checkpoint at all\n" * 10, "not a readable checkpoint"),
    ],
)
def test_corrupt_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_truncated_checkpoint_is_named(tmp_path):
    path, _ = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_missing_foreign_and_newer_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({"format_version": FORMAT_VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(newer)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format_version": 1, "obj": __import__("fractions").Fraction(1, 2)}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pt: holds pickled Python objects"):
        load_checkpoint(pickled)


def test_checkpoint_with_wrong_shapes_is_named(tmp_path):
    path, model = saved(tmp_path)
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["d_ff"] = 128  # no longer matches the weights
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not describe a usable model") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_atomic_write_keeps_the_old_file_when_a_save_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"good old checkpoint")

    def crash(f):
        f.write(b"half a new checkp")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == b"good old checkpoint"
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
