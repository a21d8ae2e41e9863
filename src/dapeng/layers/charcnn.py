"""A character CNN word encoder (Ma & Hovy 2016): characters → embeddings → conv1d → max over the word.

It gives every word a vector from its spelling, so words without a (pretrained) embedding of
their own — rare words, misspellings, tweets' hashtags and handles — still look like their kin.
"""

from __future__ import annotations

import torch
from torch import nn


class CharCNN(nn.Module):
    """One vector per word from its character ids.

    Args:
        vocab_size: character vocabulary size; id `pad_id` is padding.
        embed_dim: character embedding size.
        filters: convolution filters, the size of each word's vector.
        kernel: characters each filter sees.
        pad_id: the padding character id.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 25, filters: int = 50, kernel: int = 3, pad_id: int = 0) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        # "same" padding: one output per character, so padding characters can be masked out of the max
        self.conv = nn.Conv1d(embed_dim, filters, kernel, padding="same")
        self.output_size = filters

    def forward(self, char_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) character ids, (B, T) bool word mask → (B, T, filters), zeros at padded words.

        Only the real words go through the convolution: a word's vector never depends on its
        batch, and padding costs nothing.
        """
        b, t, c = char_ids.shape
        words = char_ids[mask] if mask is not None else char_ids.reshape(b * t, c)  # (N, C)
        real = words != self.pad_id  # (N, C)
        x = self.conv(self.embedding(words).transpose(1, 2))  # (N, F, C)
        x = x.masked_fill(~real.unsqueeze(1), torch.finfo(x.dtype).min).amax(2)  # (N, F)
        x = torch.where(real.any(1, keepdim=True), x, 0.0)  # a word without characters: zeros
        if mask is None:
            return x.reshape(b, t, -1)
        out = x.new_zeros(b, t, x.shape[1])
        out[mask] = x
        return out
