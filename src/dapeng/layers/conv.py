"""Convolution blocks (conv → norm → activation, residual) and pooling for image models."""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "none": nn.Identity}


class ConvNormAct(nn.Sequential):
    """`act(norm(conv(x)))` for 2-D images; the conv has no bias when a norm follows.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size; "same" padding for odd sizes.
        stride: convolution stride.
        groups: channel groups (depthwise when equal to `in_channels`).
        norm: "batch" or "none".
        activation: "relu", "gelu", "silu" or "none".
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm: str = "batch",
        activation: str = "relu",
    ) -> None:
        use_norm = norm == "batch"
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=not use_norm
        )
        self.norm = nn.BatchNorm2d(out_channels) if use_norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if activation == "relu" else _ACTIVATIONS[activation]()


class ResidualBlock(nn.Module):
    """The basic ResNet block (He et al. 2016): two 3×3 convs and a shortcut, ReLU after the sum.

    The shortcut is a strided 1×1 conv + BatchNorm when the shape changes, the identity otherwise.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first conv (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, stride)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, activation="none")
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvNormAct(in_channels, out_channels, 1, stride, activation="none")
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))  # (B, C_out, H/stride, W/stride)


class GlobalPool(nn.Module):
    """Global average or max pooling: (B, C, H, W) → (B, C).

    Args:
        mode: "avg" or "max".
    """

    def __init__(self, mode: str = "avg") -> None:
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"unknown global pooling {mode!r}; choose avg or max")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reductions over (H, W) work for both contiguous and channels_last inputs
        return x.mean(dim=(2, 3)) if self.mode == "avg" else x.amax(dim=(2, 3))

    def extra_repr(self) -> str:
        return self.mode


class ConvEncoder(nn.Module):
    """A strided stem and one residual block per stage → a grid of features (the image tower of
    the multimodal models: VQA, CLIP).

    Args:
        in_channels: image channels.
        widths: channels per stage; the stem and every stage after the first halve the resolution.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = ConvNormAct(in_channels, widths[0], 3, stride=2)
        blocks, channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(ResidualBlock(channels, width, stride=1 if i == 0 else 2))
            channels = width
        self.stages = nn.Sequential(*blocks)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images))  # (B, C', S / 2^len(widths), ...)
