"""The built-in example model: a small ResNet-style CNN for 3x64x64 inputs.

``regsurgery:example`` builds it, so the README's main command, the examples and the tests run with
no files and no downloads. It is deliberately written like torchvision's ResNet (``BasicBlock``
with a reused ``relu`` and a ``downsample`` projection of conv1x1 + BN) so that it exercises the
same patterns as the real thing, at a size that runs in milliseconds on a CPU.

Layout (64x64 input): stem conv3x3 (stride 1) -> 4 stages of 2 BasicBlocks with 16-32-64-128
channels at 64, 32, 16 and 8 px (strides 1, 2, 4, 8) -> global average pool -> linear.
Stages 3 and 4 (16x16 and 8x8) are where DropBlock goes by default, like ResNet-50's groups 3 and 4
(14x14 and 7x7 at 224 px) in Ghiasi et al. 2018.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["BasicBlock", "TinyResNet", "tiny_resnet", "EXAMPLES"]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a conv1x1+BN
    projection when the stride or the width changes, the identity otherwise."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)  # reused twice, as in torchvision
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A ResNet-10-like CNN for small images (default 3x64x64, 10 classes, 0.7 M parameters).

    Args:
        num_classes: size of the classifier output.
        in_chans: input channels.
        widths: channels of each stage; each stage after the first halves the resolution.
        depths: BasicBlocks per stage.
    """

    #: (C, H, W) of the input the model is meant for; read by ``modelspec.default_input_shape``.
    default_input_size = (3, 64, 64)

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (16, 32, 64, 128),
        depths: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) or not 1 <= len(widths) <= 4 or min(depths) < 1:
            raise ValueError(
                f"widths and depths must have the same length (1 to 4 stages, >= 1 block each), "
                f"got widths={tuple(widths)}, depths={tuple(depths)}"
            )
        self.default_input_size = (in_chans, 64, 64)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.stage_names = [f"layer{i + 1}" for i in range(len(widths))]
        in_ch = widths[0]
        for i, (ch, n) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock(in_ch, ch, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(ch, ch) for _ in range(n - 1)]
            setattr(self, self.stage_names[i], nn.Sequential(*blocks))
            in_ch = ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet(**kwargs: Any) -> TinyResNet:
    """``TinyResNet(num_classes=10, ...)``: the model behind ``regsurgery:example``."""
    return TinyResNet(**kwargs)


tiny_resnet.__signature__ = inspect.signature(TinyResNet)  # type: ignore[attr-defined]  # kwargs are checked

#: Built-in models, by the NAME of ``regsurgery:NAME``.
EXAMPLES: dict[str, Callable[..., nn.Module]] = {"example": tiny_resnet}
