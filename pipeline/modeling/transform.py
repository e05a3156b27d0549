"""Input handling inside the model (torchvision's GeneralizedRCNNTransform, same arithmetic):
normalisation, shortest-edge resize with a longest-edge bound, zero-padded batching, and the
rescaling of detections back to the original image size."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import paste_masks_in_image, paste_sizes


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The resize factor of the rule: shortest edge to ``min_size`` unless that takes the longest
    edge beyond ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output size of ``F.interpolate(scale_factor=s, recompute_scale_factor=True)``."""
    scale = resize_scale(height, width, min_size, max_size)
    return math.floor(height * scale), math.floor(width * scale)


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    # The ratios in float32 as torchvision computes them, but as host scalars: copying them to
    # the device would make a GPU run wait (a 0-dim host tensor goes to a kernel as a scalar).
    ratio_h = torch.tensor(float(new_size[0])) / torch.tensor(float(original_size[0]))
    ratio_w = torch.tensor(float(new_size[1])) / torch.tensor(float(original_size[1]))
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


class ImagePreprocessor(nn.Module):
    """Normalises, resizes and batches images (and, in training, resizes their targets).

    In training an image that is already at the resize rule's output size for one of
    ``min_size_train`` (what the data loader produces) is passed through without a second
    interpolation; otherwise one of ``min_size_train`` is drawn per image, as torchvision does.
    In evaluation every image is resized with ``min_size_test``/``max_size_test``.
    ``generator``: the source of that draw (None: torch's global RNG).
    """

    def __init__(
        self,
        *,
        min_size_train: Sequence[int],
        max_size_train: int,
        min_size_test: int,
        max_size_test: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
    ) -> None:
        super().__init__()
        self.min_size_train = [int(s) for s in min_size_train]
        self.max_size_train = int(max_size_train)
        self.min_size_test = int(min_size_test)
        self.max_size_test = int(max_size_test)
        self.size_divisibility = int(size_divisibility)
        self.generator: torch.Generator | None = None
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    def _target_min_size(self, height: int, width: int) -> int | None:
        """The min size to resize a training image to; None when it is already resized."""
        for min_size in self.min_size_train:
            out_h, out_w = resized_shape(height, width, min_size, self.max_size_train)
            # The loader's own floor rounding can leave the longest edge one pixel short of the
            # bound, which the rule would "fix" by a 1-pixel resize: treat that as resized.
            if abs(out_h - height) <= 1 and abs(out_w - width) <= 1:
                return None
        # torchvision's draw; from the owned generator when one is set (see set_generator).
        if self.generator is None:
            draw = torch.empty(1).uniform_(0.0, float(len(self.min_size_train)))
        else:
            draw = torch.empty(1, device=self.generator.device).uniform_(
                0.0, float(len(self.min_size_train)), generator=self.generator
            )
        index = int(draw.item())
        return self.min_size_train[index]

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Returns the padded batch [N, 3, H, W], each image's size inside it, and the targets
        rescaled to those sizes."""
        if targets is not None:
            targets = [dict(t) for t in targets]
        processed = []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images must be [3, H, W] tensors, got {tuple(image.shape)}")
            height, width = image.shape[-2:]
            if self.training:
                min_size, max_size = self._target_min_size(height, width), self.max_size_train
            else:
                min_size, max_size = self.min_size_test, self.max_size_test
            image = (image - self.pixel_mean) / self.pixel_std
            scale = None if min_size is None else resize_scale(height, width, min_size, max_size)
            if scale is not None and scale != 1.0:
                image = F.interpolate(
                    image[None],
                    scale_factor=scale,
                    mode="bilinear",
                    recompute_scale_factor=True,
                    align_corners=False,
                )[0]
                if targets is not None:
                    targets[i] = self._resize_target(targets[i], (height, width), image.shape[-2:])
            processed.append(image)
        image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in processed]
        return self._batch(processed), image_sizes, targets

    @staticmethod
    def _resize_target(
        target: dict[str, Tensor], old_size: Sequence[int], new_size: Sequence[int]
    ) -> dict[str, Tensor]:
        target["boxes"] = resize_boxes(target["boxes"], old_size, new_size)
        if "masks" in target and target["masks"].numel() > 0:
            masks = F.interpolate(target["masks"][:, None].float(), size=tuple(new_size))
            target["masks"] = masks[:, 0].to(torch.uint8)
        elif "masks" in target:
            target["masks"] = target["masks"].new_zeros((0, *new_size))
        return target

    def _batch(self, images: list[Tensor]) -> Tensor:
        stride = self.size_divisibility
        max_h = max(img.shape[-2] for img in images)
        max_w = max(img.shape[-1] for img in images)
        max_h = int(math.ceil(max_h / stride) * stride)
        max_w = int(math.ceil(max_w / stride) * stride)
        batch = images[0].new_zeros((len(images), 3, max_h, max_w))
        for img, slot in zip(images, batch, strict=True):
            slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch

    def postprocess(
        self,
        detections: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Boxes rescaled to the original images, masks pasted into them ([N, 1, H, W])."""
        return to_original(detections, image_sizes, original_sizes)


def to_original(
    detections: Sequence[dict[str, Tensor]],
    image_sizes: Sequence[tuple[int, int]],
    original_sizes: Sequence[tuple[int, int]],
) -> list[dict[str, Tensor]]:
    """Detections at the model's input sizes (boxes xyxy, masks [N, 1, M, M] probabilities
    inside their boxes) -> new dicts with the boxes in, and the masks [N, 1, H, W] pasted into,
    the original images. One host read for the whole batch: every mask's crop size."""
    out, plans = [], []
    for detection, size, original in zip(detections, image_sizes, original_sizes, strict=True):
        boxes = resize_boxes(detection["boxes"], size, original)
        out.append({**detection, "boxes": boxes})
        if "masks" in detection:
            plans.append(paste_sizes(detection["masks"], boxes, original)[1])
    sizes = torch.cat(plans).tolist() if plans else []
    start = 0
    for mapped, original in zip(out, original_sizes, strict=True):
        if "masks" in mapped:
            count = mapped["masks"].shape[0]
            mapped["masks"] = paste_masks_in_image(
                mapped["masks"], mapped["boxes"], original, sizes=sizes[start : start + count]
            )
            start += count
    return out
