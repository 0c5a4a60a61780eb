"""Stage: evaluation networks, as the dataset-distillation literature trains them.

ConvNet-3 / ConvNet-6 are the DC/DSA code's `ConvNet` (Zhao et al., ICLR 2021): depth x
[conv 3x3 (bias) -> instance norm -> ReLU -> AvgPool 2x2] -> Linear. ResNetAP-10 and
ResNet-18 are IDC's (Kim et al., ICML 2022; `models/resnet_ap.py`, `models/resnet.py`), the
networks MinimaxDiffusion and MGD3 report: instance norm, and a stem chosen by resolution
(<= 64 px: 3x3 conv, no downsampling; <= 128: 3x3 conv + 2x pool; larger: 7x7 conv + 4x avg
pool (ResNetAP) or 7x7 stride-2 conv + max pool (ResNet)).

Instance norm is `GroupNorm(C, C)` (one group per channel, affine), exactly as both codes.
Every network takes 1 or 3 input channels and any square resolution. Adaptation for small
inputs: a map is never downsampled below 2x2 (the downsampling is skipped), because instance
norm of a 1x1 map returns its bias whatever the input — e.g. ResNetAP-10 on 8x8 digits or
ConvNet-6 on 32x32 would otherwise output a constant. At the sizes the papers use
(ConvNet-3 at 28/32, ResNets at 32+, ConvNet-6 at 64+) nothing changes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mgd3.registry import Registry

# name -> builder(channels, num_classes, resolution) -> nn.Module
NETWORKS: Registry[Callable[[int, int, int], nn.Module]] = Registry("network")


def instance_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(c, c, affine=True)


def _halves(size: int) -> bool:
    """May a size x size map be downsampled 2x? Not below 2x2 (see the module docstring)."""
    return size >= 4


class ConvNet(nn.Module):
    """DC/DSA ConvNet. For 28x28 input the first conv has padding 3 (28 -> 32), as the DC code
    does for MNIST-like data, so ConvNet-3 ends at 128 x 4 x 4."""

    def __init__(self, channels: int, num_classes: int, resolution: int, depth: int = 3, width: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        size, in_c = resolution, channels
        for d in range(depth):
            pad = 3 if (d == 0 and resolution == 28) else 1
            layers += [nn.Conv2d(in_c, width, 3, padding=pad), instance_norm(width), nn.ReLU(inplace=True)]
            size = size + 2 * pad - 2
            if _halves(size):
                layers.append(nn.AvgPool2d(2, 2))
                size //= 2
            in_c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # (B, classes)


def _stem_size(resolution: int) -> str:
    # IDC: 'small' for <= 64 px, 'mid' for <= 128, 'large' above
    return "small" if resolution <= 64 else ("mid" if resolution <= 128 else "large")


class _BasicBlockAP(nn.Module):
    """IDC ResNetAP block: stride-1 convs, downsampling by 2x2 average pooling after conv1."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn1 = instance_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = instance_norm(planes)
        self.stride = stride
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False),
                                            *([nn.AvgPool2d(stride, stride)] if stride != 1 else []),
                                            instance_norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stride != 1:
            out = F.avg_pool2d(out, self.stride, self.stride)
        out = self.bn2(self.conv2(out))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class _BasicBlock(nn.Module):
    """torchvision/IDC ResNet basic block (strided 3x3 conv downsampling)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = instance_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = instance_norm(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            instance_norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class ResNet(nn.Module):
    """IDC's ImageNet ResNet with instance norm; `avgpool_down=True` gives ResNetAP."""

    def __init__(self, channels: int, num_classes: int, resolution: int, layers: list[int],
                 avgpool_down: bool, width: int = 64):
        super().__init__()
        stem = _stem_size(resolution)
        self.stem_size = stem
        if avgpool_down:  # ResNetAP stem: stride-1 conv, then average pooling
            k = 7 if stem == "large" else 3
            self.conv1 = nn.Conv2d(channels, width, k, 1, k // 2, bias=False)
            self.stem_pool = {"small": None, "mid": 2, "large": 4}[stem]
            size = resolution // (self.stem_pool or 1)
        else:  # ResNet stem
            self.conv1 = (nn.Conv2d(channels, width, 7, 2, 3, bias=False) if stem == "large"
                          else nn.Conv2d(channels, width, 3, 1, 1, bias=False))
            self.stem_pool = None if stem == "small" else "max"
            size = resolution if stem == "small" else (resolution + 1) // 2
            size = size if stem != "large" else (size + 1) // 2
        self.bn1 = instance_norm(width)
        block = _BasicBlockAP if avgpool_down else _BasicBlock
        blocks: list[nn.Module] = []
        inplanes = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            for j in range(n):
                stride = 2 if (i > 0 and j == 0 and _halves(size)) else 1
                blocks.append(block(inplanes, planes, stride=stride))
                if stride == 2:  # average pooling floors, a strided 3x3 conv rounds up
                    size = size // 2 if avgpool_down else (size + 1) // 2
                inplanes = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # IDC's initialisation
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.GroupNorm):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 64, R', R')
        if self.stem_pool == "max":
            x = F.max_pool2d(x, 3, 2, 1)
        elif self.stem_pool:
            x = F.avg_pool2d(x, self.stem_pool, self.stem_pool)
        x = self.layers(x)  # (B, 512, r, r)
        x = x.mean((2, 3))  # global average pool, (B, 512)
        return self.fc(x)  # (B, classes)


@NETWORKS.register("convnet-3")
def convnet3(channels: int, num_classes: int, resolution: int) -> nn.Module:
    """DC ConvNet, depth 3, width 128, instance norm, average pooling."""
    return ConvNet(channels, num_classes, resolution, depth=3)


@NETWORKS.register("convnet-6")
def convnet6(channels: int, num_classes: int, resolution: int) -> nn.Module:
    """DC ConvNet, depth 6, width 128 (the ImageNet-subset ConvNet of MinimaxDiffusion / MGD3)."""
    return ConvNet(channels, num_classes, resolution, depth=6)


@NETWORKS.register("resnetap-10")
def resnetap10(channels: int, num_classes: int, resolution: int) -> nn.Module:
    """IDC ResNetAP-10: layers [1, 1, 1, 1], 64-512 channels, average-pool downsampling."""
    return ResNet(channels, num_classes, resolution, [1, 1, 1, 1], avgpool_down=True)


@NETWORKS.register("resnet-18")
def resnet18(channels: int, num_classes: int, resolution: int) -> nn.Module:
    """IDC ResNet-18 with instance norm: layers [2, 2, 2, 2]."""
    return ResNet(channels, num_classes, resolution, [2, 2, 2, 2], avgpool_down=False)


def build_network(arch: str, channels: int, num_classes: int, resolution: int, seed: int | None = None) -> nn.Module:
    """A fresh network; with `seed`, its initial weights depend on that seed only."""
    builder = NETWORKS.get(arch.lower())
    if seed is None:
        return builder(channels, num_classes, resolution)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(channels, num_classes, resolution)
