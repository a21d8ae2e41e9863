"""A multilayer perceptron over flattened images (or any fixed-size feature vector)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """`Linear → ReLU → Dropout` × layers, then a linear head.

    Args:
        in_channels: image channels.
        image_size: image height and width (square).
        num_labels: classes.
        hidden: width of each hidden layer.
        layers: number of hidden layers.
        dropout: after each hidden layer.
        in_features: flat input size for non-image data; overrides in_channels·image_size².
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_labels: int = 10,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.1,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        width = in_features or in_channels * image_size * image_size
        blocks: list[nn.Module] = [nn.Flatten()]
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden
        self.features = nn.Sequential(*blocks)
        self.num_features = width
        self.head = nn.Linear(width, num_labels)

    @property
    def cam_layer(self) -> nn.Module | None:
        """None: an MLP has no convolution, so Grad-CAM does not apply (use saliency or IG)."""
        return None

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)  # (B, hidden)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (B, K)

    def reset_head(self, num_labels: int) -> None:
        self.head = nn.Linear(self.num_features, num_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, F) floats → (B, K) logits."""
        return self.forward_head(self.forward_features(images))
