import random

import pytest
import torch

from transformer.data.batching import collate, token_batches


def lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 60) for _ in range(n)], [rng.randint(2, 70) for _ in range(n)]


@pytest.mark.parametrize("budget", [70, 300, 4096])
def test_every_batch_fits_the_budget_and_every_pair_appears_once(budget):
    src, tgt = lengths(2000)
    plan = token_batches(src, tgt, budget, torch.Generator().manual_seed(3))
    for batch in plan:
        assert len(batch) * max(max(src[i], tgt[i]) for i in batch) <= budget
    flat = sorted(i for batch in plan for i in batch)
    assert flat == list(range(2000))


def test_batches_are_seeded_per_epoch():
    src, tgt = lengths(500)
    epoch = lambda e: token_batches(src, tgt, 500, torch.Generator().manual_seed(100 + e))  # noqa: E731
    assert epoch(0) == epoch(0)
    assert epoch(0) != epoch(1)
    assert token_batches(src, tgt, 500) == token_batches(src, tgt, 500)  # no generator: fixed order


def test_length_bucketing_keeps_padding_low():
    """Sorted by length, batches waste far less than random batches of the same sizes
    (with target lengths that follow source lengths, as in real parallel text)."""
    rng = random.Random(1)
    src = [rng.randint(1, 60) for _ in range(3000)]
    tgt = [max(2, s + rng.randint(-3, 3)) for s in src]
    plan = token_batches(src, tgt, 1000, torch.Generator().manual_seed(0))

    def padding(batches):
        return sum(len(b) * max(side[i] for i in b) - sum(side[i] for i in b) for b in batches for side in (src, tgt))

    shuffled = list(range(3000))
    random.Random(0).shuffle(shuffled)
    sizes, random_batches, k = [len(b) for b in plan], [], 0
    for size in sizes:
        random_batches.append(shuffled[k : k + size])
        k += size
    assert padding(plan) < 0.3 * padding(random_batches)


def test_an_example_over_the_budget_is_an_error():
    with pytest.raises(ValueError, match="more than the batch budget"):
        token_batches([5, 50], [5, 5], 20)


def test_collate_builds_masks_and_counts():
    batch = collate([[5, 6, 2], [7, 2]], [[1, 8, 9, 2], [1, 4, 2]], pad=0)
    assert batch.src.tolist() == [[5, 6, 2], [7, 2, 0]]
    assert batch.tgt_in.tolist() == [[1, 8, 9], [1, 4, 2]]
    assert batch.tgt_out.tolist() == [[8, 9, 2], [4, 2, 0]]
    assert batch.ntokens == 5
