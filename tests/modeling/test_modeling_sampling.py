"""The balanced sampler by masked top-k over random keys: fixed-size outputs with the configured
counts, uniform over the candidates, and a function of the generator's state."""

from __future__ import annotations

import pytest
import torch

from pipeline.modeling.sampling import BalancedSampler


def make_labels(num_pos, num_neg, num_ignored, seed=0):
    labels = torch.tensor([1] * num_pos + [0] * num_neg + [-1] * num_ignored)
    labels[:num_pos] = torch.randint(1, 5, (num_pos,))  # any class >= 1 is positive
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    return labels[perm]


def sample(sampler, labels):
    index, positive, valid = sampler(labels)
    size = min(sampler.batch_size_per_image, labels.shape[-1])
    assert index.shape == positive.shape == valid.shape == (*labels.shape[:-1], size)
    return index, positive, valid


@pytest.mark.parametrize(
    ("num_pos", "num_neg", "num_ignored", "expected_pos", "expected_neg"),
    [
        (100, 1000, 50, 64, 192),  # enough of both: the positive fraction
        (10, 1000, 50, 10, 246),  # few positives: all of them, negatives fill up
        (100, 20, 50, 64, 20),  # few negatives: no more positives than the fraction
        (3, 5, 50, 3, 5),  # fewer candidates than the sample: all, the rest padding
        (0, 0, 40, 0, 0),  # nothing to sample
    ],
)
def test_counts_and_fraction(num_pos, num_neg, num_ignored, expected_pos, expected_neg):
    sampler = BalancedSampler(256, 0.25)
    sampler.generator = torch.Generator().manual_seed(1)
    labels = make_labels(num_pos, num_neg, num_ignored)
    index, positive, valid = sample(sampler, labels)
    assert int(positive.sum()) == expected_pos
    assert int(valid.sum()) == expected_pos + expected_neg
    picked = index[valid]
    assert picked.unique().numel() == picked.numel()  # no candidate twice
    assert bool((labels[index[positive]] >= 1).all())
    assert bool((labels[index[valid & ~positive]] == 0).all())
    # The positives come first, then the negatives, then the padding.
    assert bool(positive[:expected_pos].all()) and not bool(positive[expected_pos:].any())
    assert bool(valid[: expected_pos + expected_neg].all())
    assert not bool(valid[expected_pos + expected_neg :].any())


def test_rows_are_images():
    sampler = BalancedSampler(16, 0.5)
    sampler.generator = torch.Generator().manual_seed(2)
    labels = torch.stack([make_labels(20, 30, 5, seed=0), make_labels(2, 40, 13, seed=1)])
    _index, positive, valid = sample(sampler, labels)
    assert positive.sum(1).tolist() == [8, 2]
    assert valid.sum(1).tolist() == [16, 16]


def test_a_function_of_the_generator_state():
    sampler = BalancedSampler(32, 0.25)
    labels = make_labels(50, 500, 20)
    sampler.generator = torch.Generator().manual_seed(3)
    state = sampler.generator.get_state()
    first = sampler(labels)
    second = sampler(labels)
    assert not torch.equal(first[0], second[0])  # the state moved on
    sampler.generator.set_state(state)  # a resume restores it
    again = sampler(labels)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    # The global RNG is not touched when a generator is set.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    sampler(labels)
    assert torch.equal(torch.get_rng_state(), before)


def test_uniform_over_candidates():
    """Each positive (and each negative) is picked about equally often."""
    sampler = BalancedSampler(8, 0.25)
    sampler.generator = torch.Generator().manual_seed(4)
    labels = torch.tensor([1] * 8 + [0] * 24)
    counts = torch.zeros(32)
    for _ in range(2000):
        index, _, valid = sampler(labels)
        counts.index_add_(0, index[valid], torch.ones(int(valid.sum())))
    pos, neg = counts[:8] / 2000, counts[8:] / 2000
    torch.testing.assert_close(pos, torch.full_like(pos, 2 / 8), atol=0.05, rtol=0)
    torch.testing.assert_close(neg, torch.full_like(neg, 6 / 24), atol=0.05, rtol=0)
