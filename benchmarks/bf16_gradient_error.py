"""How far a bf16 autocast training step's gradient is from the float32 one, and where.

    python benchmarks/bf16_gradient_error.py --checkpoint RUN/step-2000.pt [--batches 6]

Takes a trained checkpoint and the first --batches validation batches, and computes the
gradient of the summed label-smoothed loss (as a training step does, dropout off so
that every variant sees the same network) in float32 and under bf16 autocast, with the
attention scores and softmax, or the output layer, or both, moved back to float32, and
as ``train.amp: bf16-weights`` computes it (on a bf16 copy of the model, no autocast).
For each it prints the loss's relative difference from float32 and the gradient's
relative L2 distance from float32's, over all parameters except the key projections'
biases (whose exact gradient is zero, as the softmax ignores a shift that is the same
for every key), then over each group of them apart: the attention layers, the
feed-forward layers, the layer norms, and the (tied) embeddings and output layer.

The attention runs the explicit product (``use_sdpa=False``), which is what training on
the CPU with attention dropout uses; SDPA under bf16 is printed too, for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402

from transformer.fast.output_loss import output_layer_loss  # noqa: E402
from transformer.runtime import autocast  # noqa: E402
from transformer.tasks import build_task  # noqa: E402
from transformer.training.checkpoint import load_model  # noqa: E402
from transformer.training.loss import LabelSmoothing  # noqa: E402
from transformer.training.precision import Bf16Copy  # noqa: E402

# The module itself (the package exports a function of the same name): attend() looks
# attention() up in it at every call, so replacing it there changes what attention runs.
attention_module = importlib.import_module("transformer.model.attention")
explicit_attention = attention_module.attention


def attention_in_float32(query, key, value, mask=None, dropout=None):
    """``attention`` with its scores, softmax and weighted sum in float32."""
    with torch.autocast(query.device.type, enabled=False):
        return explicit_attention(query.float(), key.float(), value.float(), mask, dropout)


GROUPS = ("attention", "feed-forward", "layer norms", "embeddings")


def group(name: str) -> str:
    """The group of a parameter, by its name in the model."""
    if "norm" in name:
        return "layer norms"
    if "embed" in name or name.startswith("generator"):
        return "embeddings"
    return "feed-forward" if "feed_forward" in name else "attention"


def distance(grads: dict, ref: dict, names: list[str]) -> float:
    """The relative L2 distance of ``grads`` from ``ref`` over the parameters ``names``."""
    error = torch.sqrt(sum(((grads[n] - ref[n]) ** 2).sum() for n in names))
    return float(error / torch.sqrt(sum((ref[n] ** 2).sum() for n in names)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batches", type=int, default=6, help="validation batches to sum the gradient over")
    args = parser.parse_args()

    model, tokenizer, cfg = load_model(args.checkpoint)
    if args.data_dir is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=args.data_dir))
    task = build_task(cfg, tokenizer)
    crit = LabelSmoothing(tokenizer.tgt_vocab_size, tokenizer.pad_id, cfg.train.label_smoothing)
    batches = list(itertools.islice(task.valid_batches(), args.batches))
    device = torch.device("cpu")
    model.eval()

    def gradient(amp: str, sdpa: bool = False, attention_fp32: bool = False, output_fp32: bool = False):
        for module in model.modules():
            if isinstance(module, attention_module.MultiHeadedAttention):
                module.use_sdpa = sdpa
        attention_module.attention = attention_in_float32 if attention_fp32 else explicit_attention
        model.zero_grad(set_to_none=True)
        copy = Bf16Copy(model) if amp == "bf16-weights" else None  # train.amp bf16-weights: no autocast
        if copy:
            copy.pull()
        net = copy.copy if copy else model
        total = 0.0
        try:
            for b in batches:
                with autocast(device, "none" if copy else amp):
                    out = net(b.src, b.tgt_in, b.src_mask, b.tgt_mask)
                    real = b.tgt_out != crit.padding_idx
                    if output_fp32:
                        with torch.autocast(device.type, enabled=False):
                            loss = output_layer_loss(crit, out[real].float(), net.generator, b.tgt_out[real])
                    else:
                        loss = output_layer_loss(crit, out[real], net.generator, b.tgt_out[real])
                loss.backward()
                if copy:
                    copy.push_grads()
                total += loss.item()
        finally:
            attention_module.attention = explicit_attention
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return total, grads

    describe(peaks=False)
    ref_loss, ref = gradient("none")
    names = [n for n in ref if not n.endswith("linears.1.bias")]
    print(f"{args.checkpoint}: {len(batches)} validation batches, "
          f"{sum(b.ntokens for b in batches)} target tokens, torch {torch.__version__}")
    groups = {g: [n for n in names if group(n) == g] for g in GROUPS}
    print(f"{'variant':<44} {'loss vs fp32':>13} {'gradient vs fp32':>17}  " + " ".join(f"{g:>12}" for g in GROUPS))
    variants = [
        ("bf16 autocast (the training path)", dict()),
        ("bf16, attention in fp32", dict(attention_fp32=True)),
        ("bf16, output layer in fp32", dict(output_fp32=True)),
        ("bf16, attention and output layer in fp32", dict(attention_fp32=True, output_fp32=True)),
        ("bf16 autocast, SDPA attention", dict(sdpa=True)),
    ]
    variants.append(("bf16 copy, fp32 master weights (bf16-weights)", dict(amp="bf16-weights")))
    for name, options in variants:
        loss, grads = gradient(**{"amp": "bf16", **options})
        apart = [distance(grads, ref, members) for members in groups.values()]
        print(f"{name:<44} {(loss - ref_loss) / ref_loss:>+13.2e} {distance(grads, ref, names):>16.2%}  "
              + " ".join(f"{d:>12.2%}" for d in apart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
