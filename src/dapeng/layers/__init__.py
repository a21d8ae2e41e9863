"""Building blocks for `dapeng.models`: attention, positions, feed-forward, norms, conv and recurrent blocks.

Layers know nothing about tasks or data; they take plain typed arguments.
"""

from __future__ import annotations

from dapeng.layers.attention import KVCache, MultiHeadAttention, capture_attention, causal_mask, padding_mask
from dapeng.layers.conv import ConvNormAct, GlobalPool, ResidualBlock
from dapeng.layers.feedforward import FeedForward, SwiGLU
from dapeng.layers.norms import LayerNorm, RMSNorm
from dapeng.layers.pooling import pool_sequence
from dapeng.layers.positions import LearnedPositions, RotaryEmbedding, SinusoidalPositions, apply_rotary
from dapeng.layers.recurrent import RecurrentEncoder

__all__ = [
    "ConvNormAct",
    "FeedForward",
    "GlobalPool",
    "KVCache",
    "LayerNorm",
    "LearnedPositions",
    "MultiHeadAttention",
    "RMSNorm",
    "RecurrentEncoder",
    "ResidualBlock",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "SwiGLU",
    "apply_rotary",
    "capture_attention",
    "causal_mask",
    "padding_mask",
    "pool_sequence",
]
