"""Decoding: turn a source batch into target ids with a trained model.

``greedy_decode`` takes the most probable token at every step; ``beam_search`` keeps
the ``beam_size`` best prefixes of every sentence. Both decode a whole batch at once
and, by default, feed only the newest token to the decoder at each step, reusing the
keys and values of the earlier ones from a ``DecoderCache``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer.batching import subsequent_mask, target_mask
from transformer.model import EncoderDecoder


def _encode(model: EncoderDecoder, src: Tensor, src_mask: Tensor, tokens: int = 2048) -> Tensor:
    """``model.encode`` on the CPU a few rows at a time, each piece only as wide as its
    longest sentence.

    Sentences are encoded independently, so the result is the same at every real
    position; padding, which the mask hides from the decoder, may hold other values
    (zeros past a piece's width). Two things are saved on the CPU:

    * memory: a piece has at most ``tokens`` padded tokens. A batch of 8,192 tokens has
      feed-forward activations of 32 MiB each, and memory touched for the first time
      costs page faults: in pieces of 2,048 tokens the first greedy pass over test2016
      took 2.55 s instead of 2.75-3.1 s;
    * padding: a batch is as wide as its longest sentence, but pieces cut from its rows
      sorted by length are narrower. Over test2016 in batches of 256 that is 16,034
      tokens encoded instead of 20,168.

    Shape:
        src (B, S), src_mask (B, 1, S) -> (B, S, d_model).
    """
    batch, width = src.shape
    if src.device.type != "cpu" or batch == 0:
        return model.encode(src, src_mask)
    # Each row's width: up to its last real token (a row without any is left whole).
    real = src_mask[:, 0]
    widths = (width - real.flip(-1).int().argmax(-1)).tolist()
    order = sorted(range(batch), key=widths.__getitem__)
    memory = None
    start = 0
    while start < batch:
        # The longest piece of rows (in order of width) within ``tokens``, one row at least.
        end = start + 1
        while end < batch and (end + 1 - start) * widths[order[end]] <= tokens:
            end += 1
        rows = torch.tensor(order[start:end], device=src.device)
        w = widths[order[end - 1]]
        piece = model.encode(src[rows, :w], src_mask[rows, :, :w])
        if memory is None:
            memory = piece.new_zeros(batch, width, piece.size(-1))
        memory[rows, :w] = piece
        start = end
    return memory


@torch.no_grad()
def greedy_decode(
    model: EncoderDecoder,
    src: Tensor,
    src_mask: Tensor,
    max_len: int | Tensor,
    start_symbol: int,
    end_symbol: int | None = None,
    pad: int = 0,
    use_cache: bool = True,
) -> Tensor:
    """Pick the most probable next token until every sentence has ended.

    The whole batch is decoded at once. A sentence ends when it emits ``end_symbol`` or
    has generated ``max_len`` tokens; after that it is padded with ``pad``. Ended
    sentences leave the batch (a few at a time), and the loop stops when all have ended.

    With ``use_cache`` each step feeds only the newest token and reuses the keys and
    values of the earlier ones. Without it, every step runs the decoder over the whole
    prefix, as the reference does; both give the same tokens.

    Args:
        max_len: tokens to generate at most, after the start symbol: one number for the
            batch or one per sentence (B,).

    Shape:
        src (B, S), src_mask (B, 1, S) -> (B, 1 + T), starting with ``start_symbol``.
    """
    batch = src.size(0)
    device = src.device
    limits = torch.as_tensor(max_len, device=device).expand(batch)
    width = int(limits.max())
    memory = _encode(model, src, src_mask)
    ys = torch.full((batch, 1 + width), pad, dtype=torch.long, device=device)
    ys[:, 0] = start_symbol
    rows = torch.arange(batch, device=device)  # the batch's rows still in the loop, as rows of ys
    alive = torch.ones(batch, dtype=torch.bool, device=device)  # of those: not ended yet
    prefix = ys[:, :1]  # their tokens so far (the whole prefix is needed without a cache)
    cache = model.new_cache() if use_cache else None
    steps = 0
    for step in range(width):
        if cache is not None:
            out, cache = model.decode(memory, src_mask, prefix[:, -1:], None, cache)
        else:
            out = model.decode(memory, src_mask, prefix, subsequent_mask(prefix.size(1), device=device))
        # The most probable word has the largest logit: no need to normalise. (In float32:
        # argmax over bf16 is slow on the CPU, and the cast keeps the order.)
        logits = model.generator.proj(out[:, -1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (b, V)
        logits[:, pad] = -torch.inf  # padding is never a word
        next_word = logits.argmax(dim=-1).masked_fill(~alive, pad)
        ys[rows, step + 1] = next_word
        prefix = torch.cat([prefix, next_word.unsqueeze(1)], dim=1)
        steps = step + 1
        alive &= limits[rows] > step + 1
        if end_symbol is not None:
            alive &= next_word != end_symbol
        n_alive = int(alive.sum())
        if n_alive == 0:
            break
        # Ended sentences leave the batch, so the rest decode faster. That copies the
        # cache, so it waits until a quarter of the rows have ended.
        if 4 * (rows.numel() - n_alive) >= rows.numel():
            keep = alive.nonzero().squeeze(1)
            rows, prefix, alive = rows[keep], prefix[keep], alive[keep]
            memory, src_mask = memory[keep], src_mask[keep]
            if cache is not None:
                cache.reorder(keep)
    return ys[:, : 1 + steps]


def strip_hypothesis(ids: Tensor | list[int], end_symbol: int | None, pad: int) -> list[int]:
    """Drop the start symbol, and everything from the end symbol (or padding) on."""
    out = []
    for i in ids[1:].tolist() if isinstance(ids, Tensor) else ids[1:]:
        if i == end_symbol or i == pad:
            break
        out.append(i)
    return out


def length_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
    """GNMT's length normaliser ((5 + length) / 6) ** alpha (Wu et al., 2016).

    A hypothesis is ranked by its log-probability divided by this. With alpha 0 the
    penalty is 1 (plain log-probability, which favours short outputs); larger alpha
    favours longer ones.
    """
    return ((5 + length) / 6) ** alpha


@dataclass
class Hypothesis:
    """One finished output of beam search.

    Attributes:
        tokens: target ids, without the start and end symbols.
        score: ``log_prob / length_penalty(length, alpha)``; higher is better.
        log_prob: the sum of the log-probabilities of the tokens and of the end symbol.
        length: the length the penalty was computed for: the tokens plus the end
            symbol, or just the tokens for a hypothesis cut at the length limit.
    """

    tokens: list[int]
    score: float
    log_prob: float
    length: int


@torch.no_grad()
def beam_search(
    model: EncoderDecoder,
    src: Tensor,
    src_mask: Tensor,
    max_len: int | Tensor,
    start_symbol: int,
    end_symbol: int | None,
    beam_size: int,
    alpha: float = 0.0,
    nbest: int = 1,
    pad: int = 0,
    use_cache: bool = True,
) -> list[list[Hypothesis]]:
    """Keep the ``beam_size`` most probable prefixes of every sentence, step by step.

    All sentences and their beams are decoded together, as ``B * beam_size`` rows. At
    each step every live prefix is extended by every token; of the ``2 * beam_size``
    best extensions of a sentence, those in its top ``beam_size`` that end with
    ``end_symbol`` become finished hypotheses, and the best ``beam_size`` that do not
    end stay live. The decoder cache is reordered to follow the surviving prefixes.

    A sentence's search ends when it has ``nbest`` finished hypotheses and no live
    prefix can still beat the ``nbest``-th of them, whatever it appends (its score can
    only fall as tokens are added, and its length penalty is bounded by the length
    limit), or when it reaches its length limit (its live prefixes are then finished
    as they are). Finished sentences leave the batch, so the rest decode faster.

    With ``beam_size`` 1 and ``alpha`` 0 this finds what ``greedy_decode`` finds.

    Args:
        max_len: tokens to generate at most, after the start symbol: one number for the
            batch or one per sentence (B,).
        alpha: the length penalty's exponent (see ``length_penalty``).
        nbest: hypotheses to return per sentence, at most ``beam_size``.

    Returns:
        For each sentence, its best ``nbest`` distinct hypotheses, best first.

    Shape:
        src (B, S), src_mask (B, 1, S).
    """
    if beam_size < 1 or not 1 <= nbest <= beam_size:
        raise ValueError(f"need 1 <= nbest ({nbest}) <= beam_size ({beam_size})")
    batch, k, device = src.size(0), beam_size, src.device
    limits = torch.as_tensor(max_len).expand(batch).tolist()
    # One row of encoder output per sentence, shared by its k hypotheses (rows g*k to
    # g*k + k - 1 of the decoder's batch): the attention handles the sharing.
    memory = _encode(model, src, src_mask)  # (B, S, d_model)
    tokens = torch.full((batch * k, 1), start_symbol, dtype=torch.long, device=device)
    # Every beam starts as the same prefix; only the first is live, or the first step
    # would fill the beam with copies of one extension.
    scores = torch.full((batch, k), -torch.inf, device=device)
    scores[:, 0] = 0.0
    active = list(range(batch))  # the sentence each group of k rows belongs to
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    cache = model.new_cache() if use_cache else None
    # The logits of all rows (41 MB at 256 sentences x 5 beams x 8,000 words in float32)
    # are more than glibc's malloc reuses: fresh memory, with page faults, at every step,
    # unless they go into the same buffer every time (38.8 -> 32.5 ms for those 1,280 rows).
    proj = model.generator.proj
    logit_buffer = src.new_empty((batch * k, proj.out_features), dtype=proj.weight.dtype)
    step = 0
    while active:
        step += 1  # the length of the prefixes after this step, without the start symbol
        if cache is not None:
            out, cache = model.decode(memory, src_mask, tokens[:, -1:], None, cache)
        else:
            out = model.decode(memory, src_mask, tokens, subsequent_mask(tokens.size(1), device=device))
        logits = _project(model, out[:, -1], logit_buffer)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (b*k, V)
        # The best 2k extensions of a sentence are among the best 2k of each of its
        # rows, so only those are normalised (log_softmax = logits - logsumexp, over
        # the whole vocabulary as in training) and compared across the sentence's beams.
        # A few rows at a time: logsumexp's temporary is then small enough to be reused
        # from the heap instead of being freshly mapped (and page-faulted) at every step.
        log_norm = torch.cat([part.logsumexp(dim=1, keepdim=True) for part in logits.split(128)])
        logits[:, pad] = -torch.inf  # padding is never a word
        b, vocab = len(active), logits.size(-1)
        width = min(2 * k, vocab)
        row_logits, row_word = logits.topk(width, dim=1)  # (b*k, width)
        row_log_probs = row_logits - log_norm
        scores = scores.to(row_log_probs.dtype)
        candidates = (scores.unsqueeze(-1) + row_log_probs.view(b, k, width)).view(b, k * width)
        top_scores, top_index = candidates.topk(min(2 * k, k * width), dim=1)  # (b, 2k), best first
        top_beam, top_word = top_index // width, row_word.view(b, k * width).gather(1, top_index)
        ends = top_word == end_symbol if end_symbol is not None else torch.zeros_like(top_word, dtype=torch.bool)
        # The best k extensions that do not end; stable sorting keeps them best first.
        keep = torch.sort((~ends).to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k]
        live_scores = top_scores.gather(1, keep)

        at_limit = [limits[i] <= step for i in active]
        # Finish the ending extensions in each sentence's top k, and at the length
        # limit all of its top k.
        finish = ends.clone()
        finish[:, k:] = False
        finish[torch.tensor(at_limit, device=device), :k] = True
        finish &= top_scores > -torch.inf
        for g, j in finish.nonzero().tolist():
            row = g * k + int(top_beam[g, j])
            ended = bool(ends[g, j])
            words = tokens[row, 1:].tolist() + ([] if ended else [int(top_word[g, j])])
            log_prob = float(top_scores[g, j])
            length = step if ended else len(words)
            _insert(finished[active[g]], Hypothesis(words, log_prob / length_penalty(length, alpha), log_prob, length), nbest)

        # Which sentences go on: not at their limit, with a live prefix that could
        # still beat their nbest-th finished hypothesis.
        best_live = live_scores[:, 0].tolist()
        going = []
        for g, i in enumerate(active):
            if at_limit[g] or best_live[g] == -torch.inf:
                continue
            done = finished[i]
            if len(done) == nbest:
                # The log-probability can only fall; the penalty is largest (alpha > 0)
                # at the limit, or (alpha < 0) at the next step.
                longest = limits[i] if alpha > 0 else step + 1
                if best_live[g] / length_penalty(longest, alpha) <= done[-1].score:
                    continue
            going.append(g)
        if not going:
            break
        groups = torch.tensor(going, device=device)
        rows = (groups.unsqueeze(1) * k + top_beam.gather(1, keep)[groups]).view(-1)  # (b'*k,)
        tokens = torch.cat([tokens[rows], top_word.gather(1, keep)[groups].view(-1, 1)], dim=1)
        scores = live_scores[groups]
        if len(going) < b:  # sentences left the batch: drop their rows everywhere
            memory, src_mask = memory[groups], src_mask[groups]
            if cache is not None:
                cache.reorder(rows, static=groups)
        elif cache is not None:
            # Rows only moved among the hypotheses of their own sentence, which share
            # its encoder-decoder keys and values: those stay as they are.
            cache.reorder(rows, static=False)
        active = [active[g] for g in going]
    return finished


def _project(model: EncoderDecoder, hidden: Tensor, buffer: Tensor) -> Tensor:
    """The generator's logits for ``hidden``, written into the first rows of ``buffer``.

    Shape:
        hidden (R, d_model), buffer (R' >= R, V) -> (R, V).
    """
    proj = model.generator.proj
    if proj.bias is None or hidden.dtype != buffer.dtype or torch.is_autocast_enabled(hidden.device.type):
        return proj(hidden)
    return torch.addmm(proj.bias, hidden, proj.weight.t(), out=buffer[: hidden.size(0)])


def _insert(kept: list[Hypothesis], hyp: Hypothesis, n: int) -> None:
    """Put ``hyp`` into ``kept`` (sorted best first), keeping at most ``n``."""
    at = len(kept)
    while at > 0 and kept[at - 1].score < hyp.score:
        at -= 1
    if at < n:
        kept.insert(at, hyp)
        del kept[n:]


@torch.no_grad()
def rescore(
    model: EncoderDecoder,
    src: Tensor,
    src_mask: Tensor,
    hypotheses: list[list[int]],
    start_symbol: int,
    end_symbol: int | None,
    pad: int = 0,
    ended: list[bool] | None = None,
) -> Tensor:
    """Log-probability of each target sequence given its source, by one teacher-forced pass.

    Args:
        hypotheses: one list of target ids per source row, without start or end symbol.
        ended: per hypothesis, whether the end symbol's log-probability is included
            (default: yes, when there is an end symbol).

    Shape:
        src (B, S), src_mask (B, 1, S) -> (B,), in the generator's dtype (float32 or wider).
    """
    if ended is None:
        ended = [end_symbol is not None] * len(hypotheses)
    targets = [h + [end_symbol] if e else list(h) for h, e in zip(hypotheses, ended)]
    width = max(1, max(len(t) for t in targets))
    gold = torch.full((len(targets), width), pad, dtype=torch.long)
    for i, t in enumerate(targets):
        gold[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    gold = gold.to(src.device)
    tgt = torch.cat([torch.full_like(gold[:, :1], start_symbol), gold[:, :-1]], dim=1)
    out = model.decode(model.encode(src, src_mask), src_mask, tgt, target_mask(tgt, pad))
    log_probs = model.generator(out).gather(2, gold.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return log_probs.masked_fill(gold == pad, 0.0).sum(dim=1)
