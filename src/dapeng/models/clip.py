"""CLIP-style two towers (Radford et al. 2021): images and texts mapped into one unit-length space.

```
images (B, C, S, S) ─► strided ResNet ─► avg pool ─► linear ─► L2 norm ─► image_embeds (B, D)
input_ids (B, T)    ─► embeddings ─► BiLSTM ─► final states ─► linear ─► L2 norm ─► text_embeds (B, D)
logits = exp(logit_scale) · image_embeds @ text_embedsᵀ   (B, B), the learned temperature as CLIP's
```

`logit_scale` starts at log(1/0.07) and is clamped to at most log(100) in `forward`, as CLIP does,
so the temperature can't collapse the softmax. The loss lives in the task (tasks/image_text.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.layers.conv import ConvEncoder, GlobalPool
from dapeng.layers.recurrent import RecurrentEncoder

MAX_LOGIT_SCALE = math.log(100.0)


class CLIPModel(nn.Module):
    """Image and text towers with a shared embedding space and a learned temperature.

    Args:
        vocab_size: text token vocabulary size.
        pad_id: id of the padding token.
        in_channels: image channels.
        image_size: image height and width (recorded for introspection).
        embed_dim: size of the shared space.
        widths: image tower channels per stage.
        word_dim: word embedding size (50 for GloVe-6B-50d).
        hidden: text BiLSTM hidden size per direction.
        dropout: on word embeddings.
        init_temperature: the softmax temperature to start from (CLIP: 0.07).
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int = 0,
        in_channels: int = 1,
        image_size: int = 28,
        embed_dim: int = 64,
        widths: tuple[int, ...] = (16, 32, 64),
        word_dim: int = 50,
        hidden: int = 64,
        dropout: float = 0.1,
        init_temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.image = ConvEncoder(in_channels, tuple(widths))
        self.pool = GlobalPool("avg")
        self.image_proj = nn.Linear(self.image.out_channels, embed_dim)
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=pad_id)
        self.text = RecurrentEncoder("lstm", word_dim, hidden, 1, bidirectional=True)
        self.text_proj = nn.Linear(self.text.output_size, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.num_features = embed_dim

    @property
    def cam_layer(self) -> nn.Module:
        return self.image.stages[-1]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) → (B, D) unit vectors."""
        return F.normalize(self.image_proj(self.pool(self.image(images))).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids, (B, T) bool mask → (B, D) unit vectors."""
        mask = attention_mask.bool() if attention_mask is not None else None
        _, final = self.text(self.dropout(self.embedding(input_ids)), mask)  # (B, 2H)
        return F.normalize(self.text_proj(final).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to at most 100 (the inverse temperature)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Both towers: `image_embeds` (B, D), `text_embeds` (B, D) and `logits` (B, B), image rows."""
        image_embeds = self.encode_image(images)
        text_embeds = self.encode_text(input_ids, attention_mask)
        logits = self.scale() * image_embeds @ text_embeds.T  # (B_img, B_txt)
        return {"image_embeds": image_embeds, "text_embeds": text_embeds, "logits": logits}
