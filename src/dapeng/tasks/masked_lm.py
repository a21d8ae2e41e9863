"""Task `masked-lm`: BERT-style masked language modelling, to pretrain the `transformer` encoder on raw text.

Records are `{"text": ...}` (labels, if any, are ignored: `data.unlabeled: true` drops them).
`setup` learns a tokenizer from the training texts (or takes `tokenizer_path`, or the
tokenizer of `model.init`); items are `[CLS] text [SEP]` ids plus each token's word index.
Masking is dynamic (Liu et al. 2019, RoBERTa): every training batch draws a fresh mask in
`loss`, and evaluation batches a fixed one, so eval figures compare across epochs:

* `mask_rate` (15%) of the maskable tokens are picked; special tokens and padding never are;
* of the picked ones, 80% become [MASK], 10% a random ordinary token, 10% stay as they are;
* with `whole_word`, a word's pieces are picked together (Devlin et al.'s whole-word masking);
* every row with a maskable token gets at least one: a row with none would give the loss a
  0/0 (the NaN of transformers#16711).

The model is a `transformer` with `mlm_head: true` (its decoder is tied to the word
embeddings); the loss is cross-entropy over the picked positions only, the metrics the
accuracy of those predictions and their perplexity. The saved Artifact is an encoder: it
`embed`s texts, and as a later run's `model.init` it gives its backbone and tokenizer to any
text task of the same architecture, leaving the MLM head behind (`dapeng.hub.init`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dapeng.errors import DataError
from dapeng.records import Record
from dapeng.tasks._classification import parse_options, where
from dapeng.tasks._words import WordOptions
from dapeng.tasks.base import VECTOR_OUTPUT, Capabilities

__all__ = ["MaskedLM", "MaskedLMMetric", "mask_tokens"]

IGNORE = -100


class MaskedLMOptions(WordOptions):
    """`task_options` of masked-lm."""

    max_length: int = Field(128, gt=2, description="tokens per text, [CLS] and [SEP] included")
    mask_rate: float = Field(0.15, gt=0.0, lt=1.0, description="share of the maskable tokens to predict")
    mask_token_rate: float = Field(0.8, ge=0.0, le=1.0, description="of the picked tokens: share set to [MASK]")
    random_token_rate: float = Field(0.1, ge=0.0, le=1.0, description="of the picked tokens: share set to a random token")
    whole_word: bool = Field(False, description="pick all pieces of a word together")
    windows: bool = Field(True, description="cut a text longer than max_length into consecutive windows "
                          "(an address, a chapter); false: keep its first max_length tokens")
    eval_seed: int = Field(0, description="seed of the fixed masks of evaluation batches")


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    random_ids: torch.Tensor,
    mask_rate: float = 0.15,
    mask_token_rate: float = 0.8,
    random_token_rate: float = 0.1,
    word_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch for masked-LM training.

    Args:
        input_ids: (B, T) token ids.
        maskable: (B, T) bool, False at special tokens and padding.
        mask_id: the [MASK] id.
        random_ids: (R,) the ids a picked token may be replaced by (the ordinary tokens).
        mask_rate: chance of each maskable token (or word) to be picked.
        mask_token_rate: share of the picked tokens set to [MASK].
        random_token_rate: share set to a random token of `random_ids` (the rest stay as they are).
        word_ids: (B, T) each token's word index in its row (negative where not maskable): pick
            words, not tokens (whole-word masking).
        generator: the random generator (None: torch's global one).

    Returns:
        (corrupted ids (B, T), labels (B, T): the original id where picked, -100 elsewhere).
        Every row with a maskable token has at least one picked.
    """
    device = input_ids.device
    b, t = input_ids.shape
    # the units picked together: tokens, or words (with whole-word masking)
    unit = torch.arange(t, device=device).expand(b, t) if word_ids is None else word_ids.clamp_min(0)
    units = int(unit.max()) + 1 if unit.numel() else 1
    draw = torch.rand(b, units, generator=generator, device=device)  # one draw per (row, unit)
    picked = (draw.gather(1, unit) < mask_rate) & maskable  # (B, T)
    # a row without a pick gets one unit anyway: its loss would otherwise be 0/0
    empty = ~picked.any(1) & maskable.any(1)  # (B,)
    if bool(empty.any()):
        score = torch.rand(b, t, generator=generator, device=device).masked_fill(~maskable, -1.0)
        chosen = unit.gather(1, score.argmax(1, keepdim=True))  # (B, 1)
        picked |= (unit == chosen) & maskable & empty[:, None]
    labels = input_ids.masked_fill(~picked, IGNORE)
    how = torch.rand(b, t, generator=generator, device=device)
    to_mask = picked & (how < mask_token_rate)
    to_random = picked & (how >= mask_token_rate) & (how < mask_token_rate + random_token_rate)
    replacement = random_ids.to(device)[torch.randint(len(random_ids), (b, t), generator=generator, device=device)]
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    corrupted = torch.where(to_random, replacement, corrupted)
    return corrupted, labels


class MaskedLMMetric:
    """Accuracy of the predictions at the masked positions, and their perplexity (token-weighted)."""

    def __init__(self) -> None:
        self.correct = 0
        self.tokens = 0
        self.nll = 0.0

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        self.correct += int(outputs["correct"])
        self.tokens += int(outputs["tokens"])
        self.nll += float(outputs["nll_sum"])

    def compute(self) -> dict[str, float]:
        mean = self.nll / max(self.tokens, 1)
        return {"masked_accuracy": self.correct / max(self.tokens, 1), "perplexity": math.exp(min(mean, 50.0)),
                "masked_tokens": float(self.tokens)}


class MaskedLM:
    """Masked-LM pretraining of a text encoder. Options: see `MaskedLMOptions` (keyword arguments)."""

    name = "masked-lm"
    capabilities = Capabilities(input="text", output="vector", verbs=frozenset({"predict", "embed"}),
                                output_schema=VECTOR_OUTPUT)

    def __init__(self, **options: Any) -> None:
        self.options: MaskedLMOptions = parse_options(MaskedLMOptions, self.name, options)
        self.tokenizer: Any = None
        self.pad_id = 0
        self.mask_id = 0
        self.special_ids: list[int] = []
        self._random_ids: torch.Tensor | None = None

    # -- tokenizer ------------------------------------------------------------------------

    def setup(self, train: Sequence[Record]) -> None:
        """Learn the tokenizer from the training texts (unless `tokenizer_path` names one)."""
        from dapeng.data.tokenizers import load_tokenizer, train_tokenizer

        if self.options.tokenizer_path:
            self.tokenizer = load_tokenizer(self.options.tokenizer_path)
        else:
            texts = [self._text(r, i) for i, r in enumerate(train)]
            opts = self.options
            self.tokenizer = train_tokenizer(texts, opts.tokenizer, opts.vocab_size, opts.lowercase, opts.min_frequency)
        self._finish_tokenizer()

    def _finish_tokenizer(self) -> None:
        """Pad, mask and special ids from the tokenizer (also after `model.init` hands over its own)."""
        from dapeng.data.tokenizers import MASK, PAD, special_id

        self.tokenizer.no_padding()  # padding is collate's (see text-classification)
        self.pad_id = special_id(self.tokenizer, PAD, fallback=0)
        mask = self.tokenizer.token_to_id(MASK)
        if mask is None:
            raise DataError("masked-lm needs a tokenizer with a [MASK] token",
                            "let masked-lm train its tokenizer, or give one that has [MASK]")
        self.mask_id = mask
        added = self.tokenizer.get_added_tokens_decoder()
        self.special_ids = sorted(i for i, tok in added.items() if tok.special)
        self._random_ids: torch.Tensor | None = None

    def random_ids(self) -> torch.Tensor:
        """The ordinary (non-special) token ids a picked token may turn into."""
        if self._random_ids is None:
            keep = np.ones(self.tokenizer.get_vocab_size(), dtype=bool)
            keep[self.special_ids] = False
            self._random_ids = torch.from_numpy(np.flatnonzero(keep))
        return self._random_ids

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "pad_id": self.pad_id, "mlm_head": True}

    # -- records → items ------------------------------------------------------------------

    @staticmethod
    def _text(record: Record, i: int) -> str:
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where(record, i)}: no 'text' in record", "masked-lm reads plain text (data.text_column)")
        return text

    def encode(self, records: Sequence[Record], windows: bool | None = None) -> list[dict[str, Any]]:
        """Items `{"input_ids": (T,), "word_ids": (T,)}`, `[CLS] … [SEP]` wrapped; word_ids is -1 at specials.

        A text longer than `max_length` gives consecutive windows of it (`windows`, default: the
        option), or its start: `embed` keeps one item per text.
        """
        from dapeng.data.tokenizers import CLS, SEP

        if self.tokenizer is None:
            raise DataError("masked-lm: encode before setup", "call setup(train) or from_state(state)")
        texts = [self._text(r, i) for i, r in enumerate(records)]
        cls, sep = self.tokenizer.token_to_id(CLS), self.tokenizer.token_to_id(SEP)
        wrap = cls is not None and sep is not None
        body = self.options.max_length - 2 * wrap
        windows = self.options.windows if windows is None else windows
        items = []
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            words = [-1 if special or w is None else w for w, special in zip(enc.word_ids, enc.special_tokens_mask)]
            starts = range(0, len(enc.ids), body) if windows else [0]
            for start in starts or [0]:
                ids, piece = enc.ids[start : start + body], words[start : start + body]
                if wrap:
                    ids, piece = [cls, *ids, sep], [-1, *piece, -1]
                items.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                              "word_ids": torch.tensor(piece, dtype=torch.long)})
        return items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """input_ids (B, T), attention_mask (B, T) and word_ids (B, T), padded to the longest item."""
        from dapeng.data.tokenizers import pad_batch

        ids, mask = pad_batch([it["input_ids"] for it in items], self.pad_id)
        words, _ = pad_batch([it["word_ids"] for it in items], -1)
        return {"input_ids": ids, "attention_mask": mask, "word_ids": words}

    def batch_sampler(self, items: Sequence[dict[str, Any]], batch_size: int, seed: int = 0):
        """Length-bucketed training batches (less padding); for loops that take a batch sampler."""
        from dapeng.data.tokenizers import LengthBucketSampler

        return LengthBucketSampler([len(it["input_ids"]) for it in items], batch_size, shuffle=True, seed=seed)

    # -- model side -----------------------------------------------------------------------

    def corrupt(self, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's masked ids and labels (`mask_tokens` with this task's options)."""
        opts = self.options
        maskable = batch["word_ids"] >= 0  # specials and padding carry -1
        return mask_tokens(batch["input_ids"], maskable, self.mask_id, self.random_ids(), opts.mask_rate,
                           opts.mask_token_rate, opts.random_token_rate,
                           batch["word_ids"] if opts.whole_word else None, generator)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy at the picked positions; the vocabulary projection runs on those positions only."""
        generator = None
        if not model.training:  # the same mask for the same batch: eval figures compare across epochs
            generator = torch.Generator(device=batch["input_ids"].device).manual_seed(self.options.eval_seed)
        ids, labels = self.corrupt(batch, generator)
        hidden = model.encode(ids, batch["attention_mask"])  # (B, T, D)
        where_ = labels != IGNORE
        logits = model.mlm_logits(hidden[where_]).float()  # (N, V)
        target = labels[where_]
        nll = F.cross_entropy(logits, target, reduction="sum")
        tokens = where_.sum()
        correct = (logits.argmax(-1) == target).sum()
        return nll / tokens.clamp_min(1), {"nll_sum": nll.detach(), "tokens": tokens, "correct": correct}

    def metric(self) -> MaskedLMMetric:
        return MaskedLMMetric()

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The pooled features of unmasked texts (what `predict` and `embed` give)."""
        return {"embeddings": model.forward_features(batch["input_ids"], batch["attention_mask"])}

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[Any]:
        return outputs["embeddings"].float().cpu().tolist()

    def embed(self, model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """The encoder's pooled features for each text, (n, D), `batch_size` texts per forward pass."""
        device = next(model.parameters()).device
        items = self.encode([{"text": t} for t in texts], windows=False)
        parts = []
        for start in range(0, len(items), batch_size):
            batch = self.collate(items[start : start + batch_size])
            feats = model.forward_features(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            parts.append(feats.float().cpu().numpy())
        return np.concatenate(parts).astype(np.float32, copy=False)

    # -- save / load ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        from dapeng.data.tokenizers import tokenizer_json

        return {"labels": None, "options": self.options.model_dump(mode="json"),
                "tokenizer": tokenizer_json(self.tokenizer)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MaskedLM:
        from dapeng.data.tokenizers import load_tokenizer

        options = dict(state.get("options") or {})
        options.pop("tokenizer_path", None)
        task = cls(**options)
        if not state.get("tokenizer"):
            raise DataError("masked-lm state has no tokenizer", "the Artifact needs its tokenizer.json")
        task.tokenizer = load_tokenizer(state["tokenizer"])
        task._finish_tokenizer()
        return task
