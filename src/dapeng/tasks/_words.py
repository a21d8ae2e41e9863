"""What the text tasks share about words: tokenizer and GloVe options, and GloVe initialisation.

`text-classification` and `token-classification` take these `task_options` under the same names.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from dapeng.errors import ConfigError


class WordOptions(BaseModel):
    """The tokenizer and word-vector options of a text task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer: Literal["wordpiece", "bpe", "word"] = "wordpiece"
    tokenizer_path: str | None = Field(None, description="a tokenizer.json to use instead of training one")
    vocab_size: int = Field(20000, gt=5)
    min_frequency: int = Field(1, ge=1)
    lowercase: bool = True
    glove: bool = Field(False, description="initialise word embeddings from GloVe-6B-50d (embed_dim 50)")
    glove_vocab: int = Field(
        0,
        ge=0,
        description="with glove: true and the word tokenizer, also give GloVe's N most frequent words ids: "
        "words never seen in training keep their pretrained vectors instead of becoming [UNK]",
    )
    freeze_embeddings: bool = False

    @field_validator("glove_vocab")
    @classmethod
    def _glove_vocab_needs_glove_words(cls, n: int, info: ValidationInfo) -> int:
        if n and (not info.data.get("glove") or info.data.get("tokenizer") != "word"):
            raise ValueError("glove_vocab needs glove: true and tokenizer: word (or glove_vocab: 0)")
        return n


def glove_init(model: nn.Module, tokenizer: Any, freeze: bool = False) -> float:
    """Copy GloVe-6B-50d vectors into the model's word embeddings; returns the share of ids GloVe covers.

    Raises:
        ConfigError: the model's embeddings are not 50-d.
    """
    from dapeng.data.glove import GLOVE_DIM, glove_matrix
    from dapeng.data.tokenizers import vocab_words

    embedding = model.get_input_embeddings()
    if embedding.embedding_dim != GLOVE_DIM:
        raise ConfigError(
            f"task_options.glove needs 50-d embeddings, the model's are {embedding.embedding_dim}-d",
            "set model.kwargs.embed_dim: 50, or glove: false",
        )
    vectors, found = glove_matrix(vocab_words(tokenizer), embedding.num_embeddings)
    with torch.no_grad():
        rows = torch.from_numpy(np.flatnonzero(found))
        embedding.weight[rows] = torch.from_numpy(vectors[found]).to(embedding.weight.dtype)
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()
    if freeze:
        embedding.weight.requires_grad_(False)
    return float(found.sum()) / max(1, embedding.num_embeddings)
