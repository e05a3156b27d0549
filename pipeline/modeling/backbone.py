"""ResNet (18/34/50/101) with frozen BatchNorm and an FPN producing P2-P6.

The module and parameter names of the ResNet body are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so torchvision ResNet and Mask R-CNN
weights load without renaming. Because the BatchNorm is frozen, its affine transform is folded
into the preceding convolution at forward time (``scale * W``, bias ``shift``): one fused conv
instead of a conv followed by two elementwise passes over the activation, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

# (block kind, blocks per stage) of each supported depth, as in torchvision.
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def conv_frozen_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> Tensor:
    """``bn(conv(x))`` as one convolution with the frozen BatchNorm folded into its weights."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv(in_ch, width, 3, stride)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = _conv(width, out_ch, 3)
        self.bn2 = FrozenBatchNorm2d(out_ch)
        self.downsample = (
            nn.Sequential(_conv(in_ch, out_ch, 1, stride), FrozenBatchNorm2d(out_ch))
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = conv_frozen_bn(x, self.conv1, self.bn1).relu_()
        out = conv_frozen_bn(out, self.conv2, self.bn2)
        identity = x if self.downsample is None else conv_frozen_bn(x, *self.downsample)
        # In place: the convolution's output is not needed by its backward.
        return out.add_(identity).relu_()


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 convolution), as torchvision."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv(in_ch, width, 1)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = _conv(width, out_ch, 1)
        self.bn3 = FrozenBatchNorm2d(out_ch)
        self.downsample = (
            nn.Sequential(_conv(in_ch, out_ch, 1, stride), FrozenBatchNorm2d(out_ch))
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = conv_frozen_bn(x, self.conv1, self.bn1).relu_()
        out = conv_frozen_bn(out, self.conv2, self.bn2).relu_()
        out = conv_frozen_bn(out, self.conv3, self.bn3)
        identity = x if self.downsample is None else conv_frozen_bn(x, *self.downsample)
        # In place: the convolution's output is not needed by its backward.
        return out.add_(identity).relu_()


class ResNet(nn.Module):
    """ResNet body returning the outputs of res2..res5 (strides 4, 8, 16, 32).

    ``frozen_stages``: 0 trains everything, 1 freezes the stem, k freezes the stem and
    res2..res(k). BatchNorm is always frozen.
    """

    def __init__(self, *, depth: int, frozen_stages: int) -> None:
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"unsupported ResNet depth {depth}; use one of {list(RESNET_SPECS)}")
        if not 0 <= frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in 0..5, got {frozen_stages}")
        kind, blocks_per_stage = RESNET_SPECS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        in_ch = 64
        self.out_channels: list[int] = []
        for stage, num_blocks in enumerate(blocks_per_stage):
            width = 64 * 2**stage
            blocks = []
            for i in range(num_blocks):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(block(in_ch, width, stride))
                in_ch = width * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_ch)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        frozen = [self.conv1] + [getattr(self, f"layer{i}") for i in range(1, frozen_stages)]
        for module in frozen if frozen_stages > 0 else []:
            for param in module.parameters():
                param.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = conv_frozen_bn(x, self.conv1, self.bn1).relu_()
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        outputs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outputs.append(x)
        return outputs


class FeaturePyramid(nn.Module):
    """FPN top-down pathway over res2..res5, plus P6 = max-pool(P5) (torchvision's
    LastLevelMaxPool). Returns [P2, P3, P4, P5, P6]."""

    def __init__(self, *, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        top_down = self.lateral_convs[-1](features[-1])
        results = [self.output_convs[-1](top_down)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[idx](features[idx])
            upsampled = F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral.add_(upsampled)  # in place: a fresh conv output
            results.insert(0, self.output_convs[idx](top_down))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results


class ResNetFPN(nn.Module):
    """ResNet body + FPN. ``channels_last`` runs the convolutions in NHWC, which oneDNN
    executes faster on CPUs."""

    def __init__(
        self, *, depth: int, frozen_stages: int, fpn_channels: int, channels_last: bool = True
    ) -> None:
        super().__init__()
        self.body = ResNet(depth=depth, frozen_stages=frozen_stages)
        self.fpn = FeaturePyramid(in_channels=self.body.out_channels, out_channels=fpn_channels)
        self.out_channels = fpn_channels
        self.channels_last = channels_last

    def forward(self, images: Tensor) -> list[Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.body(images))
