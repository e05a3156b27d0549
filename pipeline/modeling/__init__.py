"""Mask R-CNN (ResNet-FPN) for the pipeline: model, configuration mapping, checkpoints.

Box convention (the one used everywhere in this package): boxes are ``(x1, y1, x2, y2)`` in
absolute pixels of the image they refer to, with no "+1" (a box's width is ``x2 - x1``).
RoIAlign is half-pixel ``aligned=True`` by default; models converted from torchvision use
``aligned=False``, the legacy sampling their weights were trained with
(``pooler_aligned`` / ``cfg.model.roi_heads.pooler_aligned``).

Pooling and NMS go through the native ``ops`` package. This package knows nothing of data
loading, training loops or tracking: the train and eval stages call :func:`build_model` and use
the model with torchvision's calling convention (see :class:`MaskRCNN`); the train stage
initialises it with :func:`load_init_weights` or resumes it with :func:`load_strict_state`.
"""

from .build import build_model, model_args_from_config
from .losses import average_across_ranks, sigmoid_focal_loss
from .mask_rcnn import TORCHVISION_MODEL_ARGS, MaskRCNN
from .masks import paste_masks_in_image
from .weights import InitReport, load_init_weights, load_strict_state

__all__ = [
    "TORCHVISION_MODEL_ARGS",
    "InitReport",
    "MaskRCNN",
    "average_across_ranks",
    "build_model",
    "load_init_weights",
    "load_strict_state",
    "model_args_from_config",
    "paste_masks_in_image",
    "sigmoid_focal_loss",
]
