"""A BiLSTM sequence tagger (Lample et al. 2016; Ma & Hovy 2016) with an optional CRF, for POS and NER.

Word embeddings (GloVe-50 when the task initialises them) ⊕ a character CNN per word →
bidirectional LSTM over packed sequences → dropout → linear emissions (B, T, K). With
`crf=True` the model carries a `CRF` over those emissions: the task trains with its `nll`
and decodes with its Viterbi `decode`; `forward` always returns the emissions.
"""

from __future__ import annotations

import torch
from torch import nn

from dapeng.errors import ModelError
from dapeng.layers.charcnn import CharCNN
from dapeng.layers.crf import CRF
from dapeng.layers.recurrent import RecurrentEncoder


class BiLSTMTagger(nn.Module):
    """Per-token tag scores from words and their characters; registered as `bilstm-crf`.

    Args:
        vocab_size: word vocabulary size.
        num_labels: tags (K).
        pad_id: id of the padding word.
        embed_dim: word embedding size (50 for GloVe-6B-50d).
        hidden: LSTM hidden size per direction.
        layers: stacked BiLSTM layers.
        dropout: on the word ⊕ character vectors, between layers, and before the head.
        char_vocab_size: character vocabulary size (id 0 is padding); 0 for no character CNN.
        char_embed_dim: character embedding size.
        char_filters: character CNN filters (the size of each word's spelling vector).
        char_kernel: characters each filter sees.
        crf: carry a CRF over the emissions (`self.crf`); None when False (softmax tagging).
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int = 2,
        pad_id: int = 0,
        embed_dim: int = 50,
        hidden: int = 256,
        layers: int = 1,
        dropout: float = 0.5,
        char_vocab_size: int = 0,
        char_embed_dim: int = 25,
        char_filters: int = 50,
        char_kernel: int = 3,
        crf: bool = True,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.chars = CharCNN(char_vocab_size, char_embed_dim, char_filters, char_kernel) if char_vocab_size else None
        width = embed_dim + (self.chars.output_size if self.chars is not None else 0)
        self.encoder = RecurrentEncoder("lstm", width, hidden, layers, bidirectional=True, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.num_features = self.encoder.output_size
        self.head = nn.Linear(self.num_features, num_labels)
        self.crf: CRF | None = CRF(num_labels) if crf else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        char_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token BiLSTM states (B, T, 2·hidden), zeros at padded positions."""
        mask = attention_mask.bool() if attention_mask is not None else None
        x = self.embedding(input_ids)  # (B, T, E)
        if self.chars is not None:
            x = torch.cat([x, self.chars(self._check_chars(input_ids, char_ids), mask).to(x.dtype)], dim=-1)
        outputs, _ = self.encoder(self.dropout(x), mask)  # (B, T, 2H)
        return outputs

    def _check_chars(self, input_ids: torch.Tensor, char_ids: torch.Tensor | None) -> torch.Tensor:
        if char_ids is None or char_ids.dim() != 3 or char_ids.shape[:2] != input_ids.shape:
            got = "none" if char_ids is None else f"shape {tuple(char_ids.shape)}"
            raise ModelError(
                f"this tagger has a character CNN and needs char_ids (B, T, C) for input_ids {tuple(input_ids.shape)}, got {got}",
                "pass the batch's char_ids, or build the model with char_vocab_size: 0",
            )
        return char_ids

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))  # (B, T, K)

    def reset_head(self, num_labels: int) -> None:
        """A fresh head (and CRF, when there is one) over `num_labels` tags."""
        self.head = nn.Linear(self.num_features, num_labels)
        if self.crf is not None:
            self.crf = CRF(num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        char_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) word ids, (B, T) bool mask (right padding), (B, T, C) char ids → (B, T, K) emissions."""
        return self.forward_head(self.forward_features(input_ids, attention_mask, char_ids))
