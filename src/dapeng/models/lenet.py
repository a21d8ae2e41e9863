"""A LeNet-style CNN (LeCun et al. 1998) modernised with BatchNorm, ReLU and max pooling."""

from __future__ import annotations

import torch
from torch import nn

from dapeng.layers.conv import ConvNormAct


class LeNet(nn.Module):
    """Two conv(5×5)-BN-ReLU-maxpool stages, one hidden dense layer, a linear head.

    Args:
        in_channels: image channels.
        image_size: image height and width (square; divisible by 4).
        num_labels: classes.
        channels: output channels of the two conv stages.
        hidden: width of the dense layer.
        dropout: before the dense layer and the head.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_labels: int = 10,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 256,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = ConvNormAct(in_channels, c1, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = ConvNormAct(c1, c2, 5)
        self.pool2 = nn.MaxPool2d(2)
        side = image_size // 4
        self.dense = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * side * side, hidden), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout(dropout)
        self.num_features = hidden
        self.head = nn.Linear(hidden, num_labels)

    @property
    def cam_layer(self) -> nn.Module:
        """The last conv block (conv-BN-ReLU), whose (B, C, H/2, W/2) output Grad-CAM weighs."""
        return self.conv2

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(images))  # (B, C1, H/2, W/2)
        x = self.pool2(self.conv2(x))  # (B, C2, H/4, W/4)
        return self.dense(x)  # (B, hidden)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))  # (B, K)

    def reset_head(self, num_labels: int) -> None:
        self.head = nn.Linear(self.num_features, num_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats → (B, K) logits."""
        return self.forward_head(self.forward_features(images))
