"""Visual question answering: a CNN over the image, a BiLSTM over the question, a fusion, answer logits.

```
images (B, C, S, S) ─► stem + residual stages ─► patches (B, P, C')  ─┐
                                                 pooled  (B, C')     ─┼─► fusion ─► MLP ─► (B, K) answers
input_ids (B, T) ─► embeddings ─► BiLSTM ─► tokens (B, T, 2H), final (B, 2H) ─┘
```

Fusions: "concat" (image and question vectors side by side), "product" (both projected to
`fusion_dim` and multiplied element-wise), "cross-attention" (each question token attends to the
image patches, layers/attention.py; the attended tokens are mean-pooled and joined with the
question vector), and the two baselines "question-only" and "image-only", which see one input.
"""

from __future__ import annotations

import torch
from torch import nn

from dapeng.layers.attention import MultiHeadAttention
from dapeng.layers.conv import ConvEncoder, GlobalPool
from dapeng.layers.pooling import pool_sequence
from dapeng.layers.recurrent import RecurrentEncoder

FUSIONS = ("concat", "product", "cross-attention", "question-only", "image-only")


class VQAModel(nn.Module):
    """Image + question → answer logits.

    Args:
        vocab_size: question token vocabulary size.
        num_labels: answers.
        pad_id: id of the padding token.
        in_channels: image channels.
        image_size: image height and width (recorded for introspection).
        fusion: one of `FUSIONS`.
        embed_dim: word embedding size (50 for GloVe-6B-50d).
        hidden: BiLSTM hidden size per direction.
        widths: image encoder channels per stage.
        fusion_dim: width of the fused representation.
        heads: attention heads of the cross-attention fusion.
        dropout: on embeddings and before the answer layer.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        pad_id: int = 0,
        in_channels: int = 3,
        image_size: int = 64,
        fusion: str = "product",
        embed_dim: int = 50,
        hidden: int = 64,
        widths: tuple[int, ...] = (16, 32, 64),
        fusion_dim: int = 128,
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        self.fusion = fusion
        self.image_size = image_size
        self.image = ConvEncoder(in_channels, tuple(widths))
        self.pool = GlobalPool("avg")
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.question = RecurrentEncoder("lstm", embed_dim, hidden, 1, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        c, q = self.image.out_channels, self.question.output_size
        if fusion == "concat":
            fused = c + q
        elif fusion == "product":
            self.image_proj = nn.Linear(c, fusion_dim)
            self.question_proj = nn.Linear(q, fusion_dim)
            fused = fusion_dim
        elif fusion == "cross-attention":
            self.token_proj = nn.Linear(q, fusion_dim)
            self.attend = MultiHeadAttention(fusion_dim, heads, kv_dim=c)
            self.attend_norm = nn.LayerNorm(fusion_dim)
            fused = fusion_dim + q
        else:
            fused = q if fusion == "question-only" else c
        self.num_features = fusion_dim
        self.mix = nn.Sequential(nn.Linear(fused, fusion_dim), nn.ReLU())
        self.head = nn.Linear(fusion_dim, num_labels)

    @property
    def cam_layer(self) -> nn.Module:
        """The image encoder's last residual block, whose feature map Grad-CAM weighs."""
        return self.image.stages[-1]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.image(images)  # (B, C', h, w)
        patches = grid.flatten(2).transpose(1, 2)  # (B, h·w, C')
        return patches, self.pool(grid)  # (B, P, C'), (B, C')

    def _question(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.question(self.dropout(self.embedding(input_ids)), mask)  # (B, T, 2H), (B, 2H)

    def forward_features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = attention_mask.bool() if attention_mask is not None else None
        if self.fusion == "question-only":
            return self.mix(self._question(input_ids, mask)[1])
        patches, pooled = self._image(images)
        if self.fusion == "image-only":
            return self.mix(pooled)
        tokens, final = self._question(input_ids, mask)
        if self.fusion == "concat":
            fused = torch.cat([pooled, final.to(pooled.dtype)], dim=-1)  # (B, C' + 2H)
        elif self.fusion == "product":
            fused = torch.tanh(self.image_proj(pooled)) * torch.tanh(self.question_proj(final))  # (B, F)
        else:
            queries = self.token_proj(tokens)  # (B, T, F)
            seen = queries + self.attend(queries, context=patches)  # (B, T, F): tokens after looking
            pooled_tokens = pool_sequence(self.attend_norm(seen), mask, "mean")  # (B, F)
            fused = torch.cat([pooled_tokens, final.to(pooled_tokens.dtype)], dim=-1)  # (B, F + 2H)
        return self.mix(fused)  # (B, F)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))  # (B, K)

    def reset_head(self, num_labels: int) -> None:
        self.head = nn.Linear(self.num_features, num_labels)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, S, S) images, (B, T) question ids, (B, T) bool mask → (B, K) answer logits."""
        return self.forward_head(self.forward_features(images, input_ids, attention_mask))
