"""A small ResNet (He et al. 2016) for 28×28 / 32×32 images (Fashion-MNIST, CIFAR-sized inputs).

A 3×3 stem without pooling keeps the resolution of small images; three stages of basic
blocks halve it twice. Everything is conv + BatchNorm, so it runs well in
`channels_last` memory format with bf16 autocast on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from dapeng.layers.conv import ConvNormAct, GlobalPool, ResidualBlock


class ResNet(nn.Module):
    """Stem → stages of residual blocks → global average pool → dropout → linear head.

    Args:
        in_channels: image channels.
        image_size: image height and width (any size ≥ 8 works; recorded for introspection).
        num_labels: classes.
        widths: channels of each stage; every stage after the first halves the resolution.
        blocks: residual blocks per stage.
        dropout: before the head.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_labels: int = 10,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: tuple[int, ...] = (2, 2, 2),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"widths {widths} and blocks {blocks} must have the same length")
        self.image_size = image_size
        self.stem = ConvNormAct(in_channels, widths[0], 3)
        stages: list[nn.Module] = []
        channels = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = [ResidualBlock(channels, width, stride=1 if i == 0 else 2)]
            stage += [ResidualBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = GlobalPool("avg")
        self.dropout = nn.Dropout(dropout)
        self.num_features = channels
        self.head = nn.Linear(channels, num_labels)
        # PyTorch's default init on purpose: on Fashion-MNIST (75 AdamW steps, 5k images) it reached
        # 68% where Kaiming fan-out + zero-initialised last BN (the large-batch ImageNet recipe)
        # reached 53%; that recipe pays for deep nets and long schedules, not for this small one.

    @property
    def cam_layer(self) -> nn.Module:
        """The last residual block, whose (B, C, H/4, W/4) output Grad-CAM weighs."""
        return self.stages[-1][-1]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # (B, W0, H, W)
        x = self.stages(x)  # (B, W_last, H/4, W/4) for three stages
        return self.pool(x)  # (B, W_last)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))  # (B, K)

    def reset_head(self, num_labels: int) -> None:
        self.head = nn.Linear(self.num_features, num_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats → (B, K) logits."""
        return self.forward_head(self.forward_features(images))
