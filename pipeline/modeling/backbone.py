"""ResNet (18/34/50/101) with a choice of normalization, and an FPN producing P2-P6.

The module and parameter names of the ResNet body are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...) whatever the normalization, so torchvision
ResNet and Mask R-CNN weights load without renaming (a ``bn*`` module holds a GroupNorm with
``norm="gn"``).

Normalizations (``norm``):

- ``frozen_bn``: frozen BatchNorm, for fine-tuning pretrained weights. Its affine transform is
  folded into the preceding convolution at forward time (``scale * W``, bias ``shift``): one
  fused conv instead of a conv followed by two elementwise passes over the activation, forward
  and backward. Exactly torchvision's numerics.
- ``bn``: trainable ``nn.BatchNorm2d`` with per-process batch statistics (conv, then BN).
- ``sync_bn``: the same ``nn.BatchNorm2d`` modules; the model itself cannot synchronise
  anything, so the training engine converts them with
  ``nn.SyncBatchNorm.convert_sync_batchnorm`` when it wraps the model in DDP (its
  ``model_args["norm"]`` says so). Without a process group it behaves as ``bn``.
- ``gn``: ``nn.GroupNorm(32, C)``, independent of the batch (good for from-scratch training
  with few images per process).

``frozen_stages`` freezes the convolutions *and* the normalization of the stem and the first
stages (detectron2's semantics): trainable BatchNorms of frozen stages are replaced by
FrozenBatchNorm (their statistics must not move either, and folded they are cheaper), frozen
GroupNorms just stop requiring gradients.

The last norm of each residual branch is *not* zero-initialised ("zero gamma"): detectron2
leaves it at one as well because it hurt GN models trained from scratch, and a pretrained
initialisation overwrites it anyway.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .conv import Conv2d, conv2d

# (block kind, blocks per stage) of each supported depth, as in torchvision.
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}

BackboneNorm = Literal["frozen_bn", "bn", "sync_bn", "gn"]
BACKBONE_NORMS = ("frozen_bn", "bn", "sync_bn", "gn")
# GroupNorm groups everywhere (detectron2's and the GN paper's default).
GN_GROUPS = 32


def group_norm(channels: int, where: str) -> nn.GroupNorm:
    """``nn.GroupNorm(32, channels)``, with a clear error when ``channels`` does not divide."""
    if channels % GN_GROUPS:
        raise ValueError(
            f"GroupNorm with {GN_GROUPS} groups needs a channel count divisible by "
            f"{GN_GROUPS}: {where} has {channels}"
        )
    return nn.GroupNorm(GN_GROUPS, channels)


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalization layer of the ResNet body for ``norm``."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if norm in ("bn", "sync_bn"):  # sync_bn: converted by the engine under DDP
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return group_norm(channels, "a ResNet layer")
    raise ValueError(f"unknown backbone norm {norm!r}; use one of {list(BACKBONE_NORMS)}")


def conv_frozen_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> Tensor:
    """``bn(conv(x))`` as one convolution with the frozen BatchNorm folded into its weights."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_norm(x: Tensor, conv: nn.Conv2d, norm: nn.Module) -> Tensor:
    """``norm(conv(x))``: folded for FrozenBatchNorm, the two layers otherwise."""
    if isinstance(norm, FrozenBatchNorm2d):
        return conv_frozen_bn(x, conv, norm)
    return norm(conv(x))


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm: str = "frozen_bn") -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv(in_ch, width, 3, stride)
        self.bn1 = make_norm(norm, width)
        self.conv2 = _conv(width, out_ch, 3)
        self.bn2 = make_norm(norm, out_ch)
        self.downsample = (
            nn.Sequential(_conv(in_ch, out_ch, 1, stride), make_norm(norm, out_ch))
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        # In place: neither a convolution's nor a norm's output is needed by its backward.
        out = conv_norm(x, self.conv1, self.bn1).relu_()
        out = conv_norm(out, self.conv2, self.bn2)
        identity = x if self.downsample is None else conv_norm(x, *self.downsample)
        return out.add_(identity).relu_()


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 convolution), as torchvision."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: str = "frozen_bn") -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv(in_ch, width, 1)
        self.bn1 = make_norm(norm, width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = make_norm(norm, width)
        self.conv3 = _conv(width, out_ch, 1)
        self.bn3 = make_norm(norm, out_ch)
        self.downsample = (
            nn.Sequential(_conv(in_ch, out_ch, 1, stride), make_norm(norm, out_ch))
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        # In place: neither a convolution's nor a norm's output is needed by its backward.
        out = conv_norm(x, self.conv1, self.bn1).relu_()
        out = conv_norm(out, self.conv2, self.bn2).relu_()
        out = conv_norm(out, self.conv3, self.bn3)
        identity = x if self.downsample is None else conv_norm(x, *self.downsample)
        return out.add_(identity).relu_()


def frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """A FrozenBatchNorm2d with ``bn``'s affine parameters and statistics (the same parameter
    and buffer names, less ``num_batches_tracked``)."""
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        frozen.weight.copy_(bn.weight)
        frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    return frozen


def freeze_batchnorms(module: nn.Module) -> None:
    """Replace every trainable ``nn.BatchNorm2d`` below ``module`` by its frozen copy."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, frozen_copy(child))
        else:
            freeze_batchnorms(child)


class ResNet(nn.Module):
    """ResNet body returning the outputs of res2..res5 (strides 4, 8, 16, 32).

    ``frozen_stages``: 0 trains everything, 1 freezes the stem, k freezes the stem and
    res2..res(k), convolutions and norms. ``norm``: see the module docstring.
    """

    def __init__(self, *, depth: int, frozen_stages: int, norm: str = "frozen_bn") -> None:
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"unsupported ResNet depth {depth}; use one of {list(RESNET_SPECS)}")
        if not 0 <= frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in 0..5, got {frozen_stages}")
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"unknown backbone norm {norm!r}; use one of {list(BACKBONE_NORMS)}")
        kind, blocks_per_stage = RESNET_SPECS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, 64)
        in_ch = 64
        self.out_channels: list[int] = []
        for stage, num_blocks in enumerate(blocks_per_stage):
            width = 64 * 2**stage
            blocks = []
            for i in range(num_blocks):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(block(in_ch, width, stride, norm))
                in_ch = width * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_ch)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # nn.BatchNorm2d and nn.GroupNorm initialise to weight 1, bias 0 themselves.
        if frozen_stages > 0:
            frozen = [self.conv1, self.bn1]
            frozen += [getattr(self, f"layer{i}") for i in range(1, frozen_stages)]
            for module in frozen:
                for param in module.parameters():
                    param.requires_grad_(False)
            # Frozen statistics too: batch statistics would still move the running ones and
            # normalise with the batch's own.
            if isinstance(self.bn1, nn.BatchNorm2d):
                self.bn1 = frozen_copy(self.bn1)
            for i in range(1, frozen_stages):
                freeze_batchnorms(getattr(self, f"layer{i}"))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = conv_norm(x, self.conv1, self.bn1).relu_()
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        outputs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outputs.append(x)
        return outputs


class FeaturePyramid(nn.Module):
    """FPN top-down pathway over res2..res5, plus P6 = max-pool(P5) (torchvision's
    LastLevelMaxPool). Returns [P2, P3, P4, P5, P6].

    ``norm="gn"`` puts a GroupNorm after every lateral and output convolution, whose bias it
    makes redundant (detectron2's FPN with ``NORM: GN``); ``"none"`` is torchvision's FPN.
    """

    def __init__(self, *, in_channels: list[int], out_channels: int, norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "gn"):
            raise ValueError(f"unknown fpn norm {norm!r}; use 'none' or 'gn'")
        bias = norm == "none"
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(c, out_channels, 1, bias=bias) for c in in_channels
        )
        self.output_convs = nn.ModuleList(
            Conv2d(out_channels, out_channels, 3, padding=1, bias=bias) for _ in in_channels
        )
        self.lateral_norms: nn.ModuleList | None = None
        self.output_norms: nn.ModuleList | None = None
        if norm == "gn":
            where = f"the FPN (fpn_channels={out_channels})"
            self.lateral_norms = nn.ModuleList(group_norm(out_channels, where) for _ in in_channels)
            self.output_norms = nn.ModuleList(group_norm(out_channels, where) for _ in in_channels)
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def _lateral(self, idx: int, x: Tensor) -> Tensor:
        out = self.lateral_convs[idx](x)
        return out if self.lateral_norms is None else self.lateral_norms[idx](out)

    def _output(self, idx: int, x: Tensor) -> Tensor:
        out = self.output_convs[idx](x)
        return out if self.output_norms is None else self.output_norms[idx](out)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        top_down = self._lateral(len(features) - 1, features[-1])
        results = [self._output(len(features) - 1, top_down)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self._lateral(idx, features[idx])
            upsampled = F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral.add_(upsampled)  # in place: a fresh conv (or norm) output
            results.insert(0, self._output(idx, top_down))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results


class ResNetFPN(nn.Module):
    """ResNet body + FPN. ``channels_last`` runs the convolutions in NHWC, which oneDNN
    executes faster on CPUs (BatchNorm and GroupNorm have NHWC kernels too), except for the
    weight gradients of spatial kernels, which ``conv.conv2d`` computes in NCHW."""

    def __init__(
        self,
        *,
        depth: int,
        frozen_stages: int,
        fpn_channels: int,
        norm: str = "frozen_bn",
        fpn_norm: str = "none",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.body = ResNet(depth=depth, frozen_stages=frozen_stages, norm=norm)
        self.fpn = FeaturePyramid(
            in_channels=self.body.out_channels, out_channels=fpn_channels, norm=fpn_norm
        )
        self.out_channels = fpn_channels
        self.channels_last = channels_last

    def forward(self, images: Tensor) -> list[Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.body(images))
