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

from transformer.config import check_nbest
from transformer.data.batching import subsequent_mask, target_mask
from transformer.fast.decoding import LogitBuffer, argmax_rows, best_extensions, encode_in_pieces, logsumexp_rows
from transformer.model.architecture import EncoderDecoder


class DecoderSteps:
    """The decoder run one step at a time over the rows of a batch still decoding.

    With ``use_cache`` each step feeds only the newest token and reuses the keys and
    values of the earlier ones; without, it runs the decoder over the whole prefix, as
    the reference does. Both give the same tokens.
    """

    def __init__(self, model: EncoderDecoder, src: Tensor, src_mask: Tensor, use_cache: bool = True):
        self.model, self.src_mask = model, src_mask
        self.memory = encode_in_pieces(model, src, src_mask)
        self.cache = model.new_cache() if use_cache else None
        self.rows = torch.arange(src.size(0), device=src.device)  # the batch's rows still in the decoder

    def logits(self, ys: Tensor) -> Tensor:
        """The next token's scores (in float32 at least) for the rows still in the decoder.

        Shape: ys (B, t), every row's prefix -> (len(rows), V).
        """
        prefix = ys[self.rows]
        if self.cache is not None:
            out, self.cache = self.model.decode(self.memory, self.src_mask, prefix[:, -1:], None, self.cache)
        else:
            mask = subsequent_mask(prefix.size(1), device=prefix.device)
            out = self.model.decode(self.memory, self.src_mask, prefix, mask)
        # In float32: argmax over bf16 is slow on the CPU, and the cast keeps the order.
        logits = self.model.logits(out[:, -1])
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def drop(self, done: Tensor) -> None:
        """Rows that are ``done`` leave the decoder, so the rest decode faster. That copies
        the cache, so it waits until a quarter of the rows still in it are done."""
        ended = done[self.rows]
        if 4 * int(ended.sum()) >= self.rows.numel():
            keep = (~ended).nonzero().squeeze(1)
            self.rows, self.memory, self.src_mask = self.rows[keep], self.memory[keep], self.src_mask[keep]
            if self.cache is not None:
                self.cache.reorder(keep)


@torch.no_grad()
def greedy_decode(model: EncoderDecoder, src: Tensor, src_mask: Tensor, max_len: int | Tensor, start_symbol: int,
                  end_symbol: int | None = None, pad: int = 0, use_cache: bool = True) -> Tensor:
    """Pick the most probable next token until every sentence has ended.

    The whole batch is decoded at once (``DecoderSteps``). A sentence ends when it
    emits ``end_symbol`` or has generated its ``max_len`` tokens; after that it is
    padded with ``pad``.

    Args:
        max_len: tokens to generate at most, after the start symbol: one number for the
            batch or one per sentence (B,).

    Shape:
        src (B, S), src_mask (B, 1, S) -> (B, 1 + T), starting with ``start_symbol``.
    """
    steps = DecoderSteps(model, src, src_mask, use_cache)
    limits = torch.as_tensor(max_len, device=src.device).expand(src.size(0))
    ys = torch.full((src.size(0), 1), start_symbol, dtype=torch.long, device=src.device)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for step in range(1, int(limits.max()) + 1):
        logits = steps.logits(ys)
        logits[:, pad] = -torch.inf  # padding is never a word
        next_word = torch.full_like(ys[:, 0], pad)
        next_word[steps.rows] = argmax_rows(logits).masked_fill(done[steps.rows], pad)
        ys = torch.cat([ys, next_word.unsqueeze(1)], dim=1)
        done |= (limits <= step) | (next_word == (-1 if end_symbol is None else end_symbol))  # -1: no word ends
        if done.all():
            break
        steps.drop(done)
    return ys


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
    patience: float | None = None,
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

    With a ``patience`` p it stops by CTranslate2's rule instead (as ``transformer.export``
    runs it: α 0, its hypotheses then ranked by ours): once the sentence's most probable
    extension has ended, at this step or before, and it has ``round(beam_size · p)``
    finished hypotheses, the most probable of which (that many) are ranked by the length
    penalty. On trained models that is usually sooner (docs/performance.md), and it can
    miss a hypothesis that the full search finds.

    With ``beam_size`` 1 and ``alpha`` 0 this finds what ``greedy_decode`` finds.

    Args:
        max_len: tokens to generate at most, after the start symbol: one number for the
            batch or one per sentence (B,).
        alpha: the length penalty's exponent (see ``length_penalty``).
        nbest: hypotheses to return per sentence, at most ``beam_size`` (and at most
            ``round(beam_size · patience)``).
        patience: None for the search above; else CTranslate2's stopping rule.

    Returns:
        For each sentence, its best ``nbest`` distinct hypotheses, best first.

    Shape:
        src (B, S), src_mask (B, 1, S).
    """
    check_nbest(nbest, beam_size, patience)
    batch, k, device = src.size(0), beam_size, src.device
    # With a patience: every finished hypothesis of a sentence is kept until it stops, and
    # whether its best extension has ended yet.
    pool = round(k * patience) if patience is not None else None
    collected: list[list[Hypothesis]] = [[] for _ in range(batch)]
    best_ended = [False] * batch
    limits = torch.as_tensor(max_len).expand(batch).tolist()
    # One row of encoder output per sentence, shared by its k hypotheses (rows g*k to
    # g*k + k - 1 of the decoder's batch): the attention handles the sharing.
    memory = encode_in_pieces(model, src, src_mask)  # (B, S, d_model)
    tokens = torch.full((batch * k, 1), start_symbol, dtype=torch.long, device=device)
    # Every beam starts as the same prefix; only the first is live, or the first step
    # would fill the beam with copies of one extension.
    scores = torch.full((batch, k), -torch.inf, device=device)
    scores[:, 0] = 0.0
    active = list(range(batch))  # the sentence each group of k rows belongs to
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    cache = model.new_cache() if use_cache else None
    project = LogitBuffer(model, batch * k, device)
    step = 0
    while active:
        step += 1  # the length of the prefixes after this step, without the start symbol
        if cache is not None:
            out, cache = model.decode(memory, src_mask, tokens[:, -1:], None, cache)
        else:
            out = model.decode(memory, src_mask, tokens, subsequent_mask(tokens.size(1), device=device))
        logits = project(out[:, -1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (b*k, V)
        # Only the sentence's best extensions are normalised (log_softmax = logits -
        # logsumexp, over the whole vocabulary as in training) and compared across its beams.
        log_norm = logsumexp_rows(logits)
        logits[:, pad] = -torch.inf  # padding is never a word
        b = len(active)
        scores = scores.to(logits.dtype)
        top_scores, top_beam, top_word = best_extensions(logits, scores, log_norm, min(2 * k, k * logits.size(-1)))
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
            hypothesis = Hypothesis(words, log_prob / length_penalty(length, alpha), log_prob, length)
            if pool is None:
                _insert(finished[active[g]], hypothesis, nbest)
            else:
                collected[active[g]].append(hypothesis)

        # Which sentences go on: not at their limit, with a live prefix that could
        # still beat their nbest-th finished hypothesis (with a patience: not yet done
        # by CTranslate2's rule).
        best_live = live_scores[:, 0].tolist()
        if pool is not None:
            for g in (ends[:, 0] & (top_scores[:, 0] > -torch.inf)).nonzero().flatten().tolist():
                best_ended[active[g]] = True
        going = []
        for g, i in enumerate(active):
            if at_limit[g] or best_live[g] == -torch.inf:
                continue
            if pool is not None:
                if best_ended[i] and len(collected[i]) >= pool:
                    continue
            elif len(finished[i]) == nbest:
                done = finished[i]
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
    if pool is not None:
        for i, found in enumerate(collected):
            for hypothesis in sorted(found, key=lambda h: h.log_prob, reverse=True)[:pool]:
                _insert(finished[i], hypothesis, nbest)
    return finished


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
