"""Owned randomness: with a generator set, training draws only from it (samplers and the
training-size choice), reproducibly, and leaves torch's global RNG alone."""

from __future__ import annotations

import torch
from modeling_helpers import tiny_batch, tiny_config

from pipeline.modeling import build_model


def sampling_model():
    """A tiny model whose samplers subsample (so the permutations matter) and whose
    preprocessing draws a training size for every image (96 px input, sizes 112/128)."""
    cfg = tiny_config(**{"rpn.batch_size_per_image": 16, "roi_heads.batch_size_per_image": 16})
    cfg.input.min_size_train = [112, 128]
    cfg.input.max_size_train = 160
    torch.manual_seed(0)
    return build_model(cfg).train()


def small_images():
    images, targets = tiny_batch()
    resized = [torch.nn.functional.interpolate(i[None], size=(96, 96))[0] for i in images]
    for target in targets:
        target["boxes"] = target["boxes"] * 0.75
        masks = torch.nn.functional.interpolate(target["masks"][:, None].float(), size=(96, 96))
        target["masks"] = masks[:, 0].to(torch.uint8)
    return resized, targets


def losses_with(model, seed_or_generator):
    generator = (
        seed_or_generator
        if isinstance(seed_or_generator, torch.Generator)
        else torch.Generator().manual_seed(seed_or_generator)
    )
    model.set_generator(generator)
    images, targets = small_images()
    losses = model(images, targets)
    return {k: v.detach() for k, v in losses.items()}, losses


def test_equal_seeds_give_identical_losses_and_global_rng_untouched():
    first, second = sampling_model(), sampling_model()
    global_state = torch.get_rng_state()
    losses_a, graph = losses_with(first, 7)
    sum(graph.values()).backward()
    losses_b, _ = losses_with(second, 7)
    assert torch.equal(torch.get_rng_state(), global_state)
    for name in losses_a:
        assert torch.equal(losses_a[name], losses_b[name]), name
    # Another seed samples otherwise: the generator is really what the draws come from.
    losses_c, _ = losses_with(second, 8)
    assert any(not torch.equal(losses_a[k], losses_c[k]) for k in losses_a)


def test_generator_state_restores_the_draws():
    model = sampling_model()
    generator = torch.Generator().manual_seed(3)
    saved = generator.get_state()
    first, _ = losses_with(model, generator)
    generator.set_state(saved)
    again, _ = losses_with(model, generator)
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_without_generator_the_global_rng_is_used():
    model = sampling_model()
    model.set_generator(None)
    assert model.rpn.sampler.generator is None and model.transform.generator is None
    state = torch.get_rng_state()
    images, targets = small_images()
    model(images, targets)
    assert not torch.equal(torch.get_rng_state(), state)
