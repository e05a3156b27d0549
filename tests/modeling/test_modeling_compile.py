"""The training step's model body (backbone, RPN, RoI heads and their losses) is one graph:
``torch.compile(fullgraph=True)`` captures it without a break, which any data-dependent size
(``nonzero``, boolean-mask indexing, ``.item()``, an index-list NMS) would prevent (issue #26's
stretch). Dynamo's ``eager`` backend traces exactly what inductor would compile, in seconds."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import tiny_batch, tiny_config

from pipeline.modeling import build_model


def model_body(model):
    """The training forward after the input transform: the transform draws the multi-scale
    training size on the host (a Python number, as a data loader would) and stays outside."""

    def body(batch, image_sizes, targets):
        features = model.backbone(batch)
        proposals, rpn_losses = model.rpn(features, batch.shape[-2:], image_sizes, targets)
        _, roi_losses = model.roi_heads(features[:4], proposals, image_sizes, targets)
        return {**rpn_losses, **roi_losses}

    return body


@pytest.mark.parametrize("classifier", ["ce", "focal"])
def test_training_body_compiles_in_one_graph(classifier):
    overrides = {"backbone.depth": 18}
    if classifier == "focal":
        overrides.update({"roi_heads.classifier_loss": "focal", "rpn.objectness_loss": "focal"})
    torch.manual_seed(0)
    model = build_model(tiny_config(**overrides)).train()
    # The read-free form of the mask loss (see RoIHeads._mask_loss); the sampling keys come
    # from the global RNG: dynamo cannot trace a draw from an explicit torch.Generator.
    model.roi_heads.pad_mask_positives = True
    images, targets = tiny_batch()
    batch, image_sizes, targets = model.transform(images, targets)
    body = model_body(model)
    torch._dynamo.reset()
    compiled = torch.compile(body, fullgraph=True, backend="eager")  # raises on a graph break

    torch.manual_seed(1)
    losses = compiled(batch, image_sizes, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    expected = body(batch, image_sizes, targets)
    sum(expected.values()).backward()

    assert losses.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, msg=name)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, msg=name)
