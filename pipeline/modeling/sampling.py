"""Balanced positive/negative sampling with fixed-size outputs (no host-device synchronisation).

Each candidate gets a uniform random key drawn from the sampling generator; a masked top-k over
the keys picks the positives, a second one the whole sample (the picked positives first, then
negatives). The top-k of i.i.d. uniform keys over a set is a uniform random subset of it, so the
sample is distributed as one drawn with permutations, but every size is known on the host: the
result is an index tensor of a fixed size with a validity mask, and the draws (one key per
candidate) depend only on the shapes, so they stay a function of the generator's state.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BalancedSampler:
    """Samples up to ``batch_size_per_image`` candidates per image with at most
    ``positive_fraction`` positives (labels >= 1), filling up with negatives (labels == 0);
    labels < 0 are never sampled.

    The keys are drawn from ``generator`` (any device; set by ``MaskRCNN.set_generator``) or,
    when it is None, from torch's global RNG.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.generator: torch.Generator | None = None

    def _keys(self, shape: torch.Size, device: torch.device) -> Tensor:
        if self.generator is None:
            return torch.rand(shape, device=device)
        keys = torch.rand(shape, device=self.generator.device, generator=self.generator)
        return keys.to(device, non_blocking=True)

    def sizes(self, num_candidates: int) -> tuple[int, int]:
        """(sample slots, most positives) for ``num_candidates`` candidates an image."""
        size = min(self.batch_size_per_image, num_candidates)
        max_pos = min(int(self.batch_size_per_image * self.positive_fraction), size)
        return size, max_pos

    def __call__(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Samples along the last dimension of ``labels`` [..., N] (one row per image).

        Returns ``index`` [..., S] (S = min(batch_size_per_image, N)) into the candidates, with
        the sampled positives first, then the negatives; ``positive`` [..., S] and ``valid``
        [..., S]: whether a slot holds a sampled positive, and whether it holds a sample at all
        (with fewer candidates than slots the tail is padding). Per row: min(#positives,
        int(batch_size_per_image * positive_fraction)) positives and min(#negatives, S - that)
        negatives, as a permutation-based sampler takes.
        """
        size, max_pos = self.sizes(labels.shape[-1])
        keys = self._keys(labels.shape, labels.device)
        positive = labels >= 1
        if max_pos > 0:
            top_pos = torch.where(positive, keys, -1.0).topk(max_pos, dim=-1)
            chosen = torch.zeros_like(positive).scatter_(-1, top_pos.indices, top_pos.values >= 0)
        else:
            chosen = torch.zeros_like(positive)
        # Chosen positives rank above every negative (keys in [2, 3) against [0, 1)); the rest
        # (unchosen positives, ignored candidates) are -1: never picked while a sample is left.
        priority = torch.where(chosen, keys + 2.0, torch.where(labels == 0, keys, -1.0))
        top = priority.topk(size, dim=-1)
        return top.indices, top.values >= 2.0, top.values >= 0.0
