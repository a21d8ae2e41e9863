"""Token classification: a tag per word (part-of-speech tagging, named-entity recognition).

Records are `{"tokens": [word, ...], "tags": [tag, ...]}` (no tags at predict time). A
string in "tokens" is split into words by `dapeng.data.tokenizers.split_words`, which keeps
each word's character offsets, so entities point into the text as it was written.

`setup` learns the tag set, the tag scheme and a tokenizer, chosen by `tokenizer`:

* `word`: one position per word, a word vocabulary of the training tokens (optionally
  GloVe-initialised, `glove_vocab` as in text-classification), and with `chars: true`
  character ids (B, T, C) for a character CNN (and `char_vocab_size` among `model_kwargs`,
  opt-in because a model without a character CNN rejects that argument);
* `wordpiece` / `bpe` (trained on the training tokens), a tokenizer.json (`tokenizer_path`)
  or a pretrained model's own tokenizer (`model.init`, handed over by `use_tokenizer`):
  several sub-words per word. Word tags go onto sub-words by `subword_labels`: `first`
  (the word's first sub-word; -100 on the rest and on [CLS]/[SEP]), `all` (every sub-word,
  a B- becoming I- on continuations) or `last`.

Every word gets exactly one prediction: a word that yields no sub-word (a zero-width or
control character the normaliser drops) is encoded as [UNK] instead of vanishing and
shifting every later label onto the wrong word (huggingface transformers#10263). A sentence
longer than `max_length` positions is cut into windows of whole words, each encoded on its
own, in training as at inference: every word is labelled and tagged in exactly one window
(only a single word longer than a window loses its extra sub-words).

Schemes: `none` (POS), `BIO` or `BIOES`, detected from the training tags unless set. Tags
are read into chunks by conlleval's rules (an I-X after O or after a chunk of another type
starts a new X chunk) and written in the chosen scheme; decoded tags are repaired the same
way. A model with a `crf` (`nll`, `decode`, `constrain_bio`) is trained on its negative
log-likelihood and decoded with Viterbi; any other is trained with cross-entropy and argmax.

Metrics: token accuracy (`universal_accuracy` too with `tag_map: universal`) and, for BIO
and BIOES, seqeval's strict entity precision/recall/F1 over the repaired sequences, which
are the numbers conlleval reports; `report()` / `write_report` give them per tag and per
entity type.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from dapeng.errors import DataError, ModelError
from dapeng.models import forward_inputs
from dapeng.records import Record
from dapeng.tasks._classification import ClassificationMetric, _natural, parse_options, where
from dapeng.tasks._words import WordOptions, glove_init
from dapeng.tasks.base import Capabilities

__all__ = ["TaggingMetric", "TokenClassificationTask", "convert", "detect_scheme", "spans"]

SCHEMES = ("none", "BIO", "BIOES")
IGNORE = -100  # the label of positions that carry no word's tag (cross_entropy's ignore_index)
_ENTITY_TAG = re.compile(r"[BIES]-\S+")
_PAD_CHAR, _UNK_CHAR = 0, 1

TAGS_OUTPUT = {
    "type": "object",
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "scores": {"type": "array", "items": {"type": "number"}},
        "entities": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "text": {"type": "string"},
                               "start": {"type": "integer"}, "end": {"type": "integer"},
                               "score": {"type": "number"}},
                "required": ["type", "text", "start", "end", "score"],
            },
        },
    },
    "required": ["tokens", "tags", "scores"],
}


# ---------------------------------------------------------------- tag schemes


@functools.lru_cache(maxsize=4096)  # a tag set is small, and spans() splits every tag of every sentence
def _split(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER"; ("O", "") for "O"."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def detect_scheme(labels: Sequence[str]) -> str:
    """"BIOES" when some tag is E-/S-, "BIO" when every tag is O or B-/I-X, else "none" (POS)."""
    named = [label for label in labels if label != "O"]
    if not named or not all(_ENTITY_TAG.fullmatch(label) for label in named):
        return "none"
    return "BIOES" if any(label[0] in "ES" for label in named) else "BIO"


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The chunks `(type, start, end)` (end exclusive) of a BIO/BIOES sequence, by conlleval's rules.

    A chunk starts at B-/S-, at an I-/E- after O or after a chunk's end (E-/S-), and wherever
    the type changes; it ends before O, B- or S-, after E- or S-, and where the type changes.
    So "O I-PER" holds a PER chunk and "B-PER I-LOC" two chunks, as conlleval counts them.
    """
    out: list[tuple[str, int, int]] = []
    start: int | None = None
    prev_prefix, prev_kind = "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = _split(tag)
        ends = prev_prefix in ("E", "S") or (prev_prefix in ("B", "I") and prefix in ("B", "S", "O")) or (
            prev_prefix != "O" and prev_kind != kind)
        if start is not None and ends:
            out.append((prev_kind, start, i))
            start = None
        if prefix != "O" and start is None:
            start = i
        prev_prefix, prev_kind = prefix, kind
    return out


def from_spans(chunks: Sequence[tuple[str, int, int]], length: int, scheme: str) -> list[str]:
    """The tags of `length` words holding `chunks`, written in `scheme` ("BIO" or "BIOES")."""
    tags = ["O"] * length
    for kind, start, end in chunks:
        if scheme == "BIOES" and end - start == 1:
            tags[start] = f"S-{kind}"
            continue
        tags[start] = f"B-{kind}"
        tags[start + 1 : end] = [f"I-{kind}"] * (end - start - 1)
        if scheme == "BIOES":
            tags[end - 1] = f"E-{kind}"
    return tags


def convert(tags: Sequence[str], scheme: str) -> list[str]:
    """`tags` rewritten in `scheme` (BIO ↔ BIOES), invalid sequences repaired by conlleval's rules.

    "none" returns the tags as they are; on valid input BIO → BIOES → BIO is the identity.
    """
    if scheme == "none":
        return list(tags)
    return from_spans(spans(tags), len(tags), scheme)


def _entity_labels(kinds: Sequence[str], scheme: str) -> list[str]:
    prefixes = "BIES" if scheme == "BIOES" else "BI"
    return ["O"] + [f"{p}-{kind}" for kind in sorted(kinds, key=_natural) for p in prefixes]


# ---------------------------------------------------------------- options


class TokenOptions(WordOptions):
    """`task_options` of token-classification (names shared with text-classification where they apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int = Field(256, gt=2, description="positions per window, special tokens included")
    special_tokens: bool | None = Field(
        None, description="wrap windows in [CLS] … [SEP]; default: for sub-word tokenizers, not for word"
    )
    subword_labels: Literal["first", "all", "last"] = Field(
        "first", description="which sub-words of a word carry its tag (the others get -100)"
    )
    scheme: Literal["auto", "none", "BIO", "BIOES"] = Field("auto", description="auto: detected from the tags")
    tag_map: Literal["universal"] | None = Field(None, description="also score tags mapped to the universal tagset")
    chars: bool = Field(False, description="character ids (char_ids) for a character CNN, and char_vocab_size for "
                        "the model; tokenizer word only")
    max_word_chars: int = Field(20, gt=0, description="characters per word in char_ids")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("chars")
    @classmethod
    def _chars_need_words(cls, chars: bool, info: ValidationInfo) -> bool:
        if chars and (info.data.get("tokenizer") != "word" or info.data.get("tokenizer_path")):
            raise ValueError("chars needs tokenizer: word (character ids line up with whole words)")
        return chars


# ---------------------------------------------------------------- records


def _words(record: Record, i: int) -> tuple[list[str], list[tuple[int, int]] | None, str | None]:
    """The record's words, their character offsets and the text the offsets point into.

    A word list without offsets gets None for both (`_offsets` makes them when they are needed).
    """
    from dapeng.data.tokenizers import split_words

    tokens = record.get("tokens")
    if isinstance(tokens, str):
        words, offsets = split_words(tokens)
        return words, offsets, tokens
    if not isinstance(tokens, list | tuple) or not all(isinstance(t, str) for t in tokens):
        found = ", ".join(k for k in record if not k.startswith("_"))
        raise DataError(f"{where(record, i)}: 'tokens' must be a list of strings (keys: {found})",
                        "records are {\"tokens\": [...], \"tags\": [...]}; set data.token_column")
    words = list(tokens)
    if record.get("offsets") is not None and isinstance(record.get("sentence"), str):
        if len(record["offsets"]) != len(words):
            raise DataError(f"{where(record, i)}: {len(words)} tokens but {len(record['offsets'])} offsets",
                            "give one (start, end) per token, or no offsets")
        return words, [(int(s), int(e)) for s, e in record["offsets"]], record["sentence"]
    return words, None, None


def _offsets(words: Sequence[str]) -> tuple[list[tuple[int, int]], str]:
    """Offsets of words as if written with single spaces between them, and that text."""
    offsets, position = [], 0
    for word in words:
        offsets.append((position, position + len(word)))
        position += len(word) + 1
    return offsets, " ".join(words)


def _tags(record: Record, i: int, n_words: int, required: bool) -> list[str] | None:
    tags = record.get("tags")
    if tags is None:
        if required:
            raise DataError(f"{where(record, i)}: training record has no tags",
                            "every training record needs 'tags', one per token")
        return None
    if not isinstance(tags, list | tuple) or len(tags) != n_words:
        count = len(tags) if isinstance(tags, list | tuple) else type(tags).__name__
        raise DataError(f"{where(record, i)}: {n_words} tokens but {count} tags", "give one tag per token")
    return [str(t) for t in tags]


# ---------------------------------------------------------------- the task


class TokenClassificationTask:
    """Words in, one tag per word out. Options: see `TokenOptions` (all keyword arguments)."""

    name = "token-classification"
    capabilities = Capabilities(
        input="tokens", output="tags", verbs=frozenset({"predict", "explain"}), explain=("ig", "saliency"),
        output_schema=TAGS_OUTPUT,
    )

    def __init__(self, **options: Any) -> None:
        self.options: TokenOptions = parse_options(TokenOptions, self.name, options)
        self.labels: list[str] = []
        self.index: dict[str, int] = {}
        # gold tags of evaluation data that training never saw (Brown has 472 tags, some of them once):
        # ids after the labels', never predicted, so they count as errors and the loss skips them
        self.unseen: dict[str, int] = {}
        self.scheme = "none"
        self.tokenizer: Any = None
        self.word_level = self.options.tokenizer == "word" and not self.options.tokenizer_path
        self.chars: list[str] = []
        self.char_index: dict[str, int] = {}
        self.pad_id = self.unk_id = 0
        self.cls_id: int | None = None
        self.sep_id: int | None = None
        self._constrained: set[int] = set()  # id() of the CRFs constrained (a plain set: the task pickles)

    # -- setup ----------------------------------------------------------------------------

    def setup(self, train: Sequence[Record]) -> None:
        """Learn the tag set and scheme, the tokenizer and (tokenizer word) the characters."""
        if not train:
            raise DataError("token-classification has no training records", "check data.train")
        sentences, tag_lists = [], []
        for i, record in enumerate(train):
            words, _, _ = _words(record, i)
            tag_lists.append(_tags(record, i, len(words), required=True))
            sentences.append(words)
        self._set_labels(tag_lists)
        self._train_tokenizer(sentences)
        if self.options.chars and self.word_level:
            counts = Counter(c for words in sentences for word in words for c in word)
            self.chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
            self.char_index = {c: i + 2 for i, c in enumerate(self.chars)}

    def _set_labels(self, tag_lists: Sequence[Sequence[str]]) -> None:
        seen = sorted({t for tags in tag_lists for t in tags}, key=_natural)
        detected = detect_scheme(seen)
        scheme = detected if self.options.scheme == "auto" else self.options.scheme
        if scheme != "none" and detected == "none":
            shown = ", ".join(seen[:10])
            raise DataError(f"task_options.scheme {scheme} but the training tags are not B-/I-/E-/S-X or O: {shown}",
                            "set scheme: none (or auto) for tags like part-of-speech")
        self.scheme = scheme
        if scheme == "none":
            labels = seen
        else:
            labels = _entity_labels({kind for tags in tag_lists for kind, _, _ in spans(tags)}, scheme)
        if len(labels) < 2:
            raise DataError(f"training data has {len(labels)} distinct tag(s)", "tagging needs at least two tags")
        self.labels = labels
        self.index = {label: i for i, label in enumerate(labels)}

    def _train_tokenizer(self, sentences: Sequence[Sequence[str]]) -> None:
        from dapeng.data.tokenizers import load_tokenizer, train_tokenizer, train_word_tokenizer

        opts = self.options
        if opts.tokenizer_path:
            self.tokenizer = load_tokenizer(opts.tokenizer_path)
        elif self.word_level:
            self.tokenizer = train_word_tokenizer((w for words in sentences for w in words), opts.vocab_size,
                                                  opts.lowercase, opts.min_frequency)
            if opts.glove_vocab:
                from dapeng.data.glove import frequent_words
                from dapeng.data.tokenizers import extend_word_vocab

                extend_word_vocab(self.tokenizer, frequent_words(opts.glove_vocab))
        else:
            self.tokenizer = train_tokenizer((" ".join(words) for words in sentences), opts.tokenizer,
                                             opts.vocab_size, opts.lowercase, opts.min_frequency)
        self._finish_tokenizer()

    def use_tokenizer(self, tokenizer_json: str) -> None:
        """Encode with a pretrained model's own (sub-word) tokenizer (`model.init`; `hub.init` calls this)."""
        from dapeng.data.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_json)
        self.word_level = False
        self.chars, self.char_index = [], {}
        self._finish_tokenizer()

    def _finish_tokenizer(self) -> None:
        from dapeng.data.tokenizers import CLS, PAD, SEP, UNK, special_id

        # Windows, padding and special tokens are this task's: a tokenizer.json that pads or
        # truncates on its own would shift word_ids away from the words they index.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = special_id(self.tokenizer, PAD, fallback=0)
        self.unk_id = special_id(self.tokenizer, UNK, fallback=self.pad_id)
        wrap = self.options.special_tokens if self.options.special_tokens is not None else not self.word_level
        cls, sep = self.tokenizer.token_to_id(CLS), self.tokenizer.token_to_id(SEP)
        self.cls_id, self.sep_id = (cls, sep) if wrap and cls is not None and sep is not None else (None, None)

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = {"vocab_size": self.tokenizer.get_vocab_size(), "num_labels": len(self.labels), "pad_id": self.pad_id}
        if self.chars:
            kwargs["char_vocab_size"] = len(self.chars) + 2  # + padding and unknown
        return kwargs

    def init_model(self, model: nn.Module) -> None:
        """GloVe word vectors (`glove: true`) and, for a CRF over BIO/BIOES tags, its allowed transitions."""
        if self.options.glove:
            self.glove_coverage = glove_init(model, self.tokenizer, self.options.freeze_embeddings)
        crf = getattr(model, "crf", None)
        if crf is not None:
            self._constrain(crf)

    def _constrain(self, crf: nn.Module) -> None:
        """Forbid the CRF the transitions the scheme rules out, once per CRF (its buffers keep them)."""
        if self.scheme != "none" and id(crf) not in self._constrained:
            crf.constrain_bio(self.labels, self.scheme)
            self._constrained.add(id(crf))

    # -- records → tensors ----------------------------------------------------------------

    def encode(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """One item per record: its windows `input_ids`/`word_ids`[/`labels`] (N, T) (+ `char_ids`
        (N, T, C)), `lengths` (N,), and the words, offsets, text and gold `word_tags` (W,) it came from."""
        if self.tokenizer is None:
            raise DataError("token-classification: encode before setup", "call setup(train) or from_state(state)")
        parsed = []
        for i, record in enumerate(records):
            words, offsets, text = _words(record, i)
            tags = _tags(record, i, len(words), required=False)
            parsed.append((words, offsets, text, None if tags is None else self._tag_ids(tags, record, i)))
        encodings = self.tokenizer.encode_batch([p[0] for p in parsed], is_pretokenized=True,
                                                add_special_tokens=False)
        return [self._item(*p, enc) for p, enc in zip(parsed, encodings)]

    def _tag_ids(self, tags: list[str], record: Record, i: int) -> list[int]:
        odd = [t for t in tags if self.scheme != "none" and t != "O" and not _ENTITY_TAG.fullmatch(t)]
        if odd:
            shown = ", ".join(self.labels[:20]) + (" …" if len(self.labels) > 20 else "")
            raise DataError(f"{where(record, i)}: tag {odd[0]!r} is not B-/I-/E-/S-TYPE or O",
                            f"tags seen in training: {shown}")
        return [self._tag_id(t) for t in convert(tags, self.scheme)]

    def _tag_id(self, tag: str) -> int:
        """The id of a tag: its label index, or for a tag training never saw one after all the labels."""
        found = self.index.get(tag)
        if found is None:
            found = self.unseen.setdefault(tag, len(self.labels) + len(self.unseen))
        return found

    def _tag_name(self, tag_id: int) -> str:
        return self.labels[tag_id] if tag_id < len(self.labels) else self.tag_names()[tag_id]

    def tag_names(self) -> list[str]:
        """The labels, then the gold tags seen only in evaluation data (never predicted)."""
        return [*self.labels, *sorted(self.unseen, key=self.unseen.__getitem__)]

    def _pieces(self, n_words: int, encoding: Any) -> list[list[int]]:
        """The token ids of each word; [UNK] for a word the tokenizer turned into nothing (#10263)."""
        pieces: list[list[int]] = [[] for _ in range(n_words)]
        for token, word in zip(encoding.ids, encoding.word_ids):
            if word is not None:
                pieces[word].append(token)
        return [p or [self.unk_id] for p in pieces]

    def _budget(self) -> int:
        """Sub-words per window: `max_length` less [CLS] and [SEP]."""
        return self.options.max_length - (2 if self.cls_id is not None else 0)

    def _windows(self, pieces: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """Consecutive runs of whole words `[start, end)` that fit in `max_length` positions each."""
        budget = self._budget()
        if sum(map(len, pieces)) <= budget:  # nearly every sentence
            return [(0, len(pieces))]
        windows, start, used = [], 0, 0
        for w, word in enumerate(pieces):
            size = min(len(word), budget)
            if used + size > budget and w > start:
                windows.append((start, w))
                start, used = w, 0
            used += size
        windows.append((start, len(pieces)))
        return windows

    def _item(self, words: list[str], offsets: list[tuple[int, int]] | None, text: str | None,
              tag_ids: list[int] | None,
              encoding: Any) -> dict[str, Any]:
        pieces = self._pieces(len(words), encoding)
        budget = self._budget()
        rows, windows = [], self._windows(pieces)
        for start, end in windows:
            ids: list[int] = [] if self.cls_id is None else [self.cls_id]
            word_ids: list[int] = [-1] * len(ids)
            for w in range(start, end):
                kept = pieces[w][:budget]
                ids += kept
                word_ids += [w] * len(kept)
            if self.sep_id is not None:
                ids.append(self.sep_id)
                word_ids.append(-1)
            if not ids:  # an empty sentence without special tokens: one position that is no word
                ids, word_ids = [self.unk_id], [-1]
            rows.append((ids, word_ids))
        length = max(len(ids) for ids, _ in rows)
        # lists padded here and made tensors once: per-row tensor writes cost more than the tokenizer
        item: dict[str, Any] = {
            "input_ids": _tensor([ids + [self.pad_id] * (length - len(ids)) for ids, _ in rows]),
            "word_ids": _tensor([of + [-1] * (length - len(of)) for _, of in rows]),
            "lengths": torch.tensor([len(ids) for ids, _ in rows]),
            "words": words, "offsets": offsets, "sentence": text,
        }
        if tag_ids is not None:
            item["word_tags"] = torch.tensor(tag_ids, dtype=torch.long)
            labels = [self._labels(of, self._window_tags(tag_ids, start, end) if len(windows) > 1 else tag_ids)
                      for (_, of), (start, end) in zip(rows, windows)]
            known = len(self.labels)  # a tag training never saw is no training target
            item["labels"] = _tensor([[t if t < known else IGNORE for t in row] + [IGNORE] * (length - len(row))
                                      for row in labels])
        if self.chars:
            item["char_ids"] = self._char_ids(words, [of + [-1] * (length - len(of)) for _, of in rows])
        return item

    def _window_tags(self, tag_ids: list[int], start: int, end: int) -> list[int]:
        """The tags with words `start:end` read as a sentence of their own: a chunk cut by a window's
        edge restarts with B- in the next window, so each window's tag sequence stays valid (a CRF
        that forbids O → I-X at a sequence start would otherwise be trained on an impossible path)."""
        if self.scheme == "none":
            return tag_ids
        window = convert([self._tag_name(t) for t in tag_ids[start:end]], self.scheme)
        return [*tag_ids[:start], *(self._tag_id(t) for t in window), *tag_ids[end:]]

    def _labels(self, of: list[int], tag_ids: list[int]) -> list[int]:
        """One window's labels: word tags on the positions `subword_labels` picks, IGNORE elsewhere."""
        policy = self.options.subword_labels
        if policy == "all":
            cols = [t for t, w in enumerate(of) if w >= 0]
            labels = [IGNORE] * len(of)
            for t, tag in zip(cols, self._piece_tags([of[t] for t in cols], tag_ids) if cols else []):
                labels[t] = tag
            return labels
        neighbour = [-1, *of[:-1]] if policy == "first" else [*of[1:], -1]
        return [tag_ids[w] if w >= 0 and w != n else IGNORE for w, n in zip(of, neighbour)]

    def _piece_tags(self, of: list[int], tag_ids: list[int]) -> list[int]:
        """`subword_labels: all`: the tag of every sub-word of one window, `of` giving each one's word.

        A chunk of words becomes the chunk of their sub-words: B-PER over three pieces is
        B-PER I-PER I-PER (BIOES: S-PER over three is B-PER I-PER E-PER).
        """
        if self.scheme == "none":
            return [tag_ids[w] for w in of]
        first, last = {}, {}
        for p, w in enumerate(of):
            first.setdefault(w, p)
            last[w] = p
        low = of[0]
        words = [self._tag_name(tag_ids[w]) for w in range(low, of[-1] + 1)]
        chunks = [(kind, first[low + s], last[low + e - 1] + 1) for kind, s, e in spans(words)]
        return [self._tag_id(t) for t in from_spans(chunks, len(of), self.scheme)]

    def _char_ids(self, words: list[str], word_ids: list[list[int]]) -> torch.Tensor:
        """(N, T, C) character ids of the word at each position (0: padding, 1: unseen in training)."""
        limit = self.options.max_word_chars
        width = max([min(len(w), limit) for w in words] + [1])
        get = self.char_index.get
        codes = [get(c, _UNK_CHAR) for w in words for c in w[:limit]]
        table = np.zeros((len(words) + 1, width), dtype=np.int64)  # the last row: no word (word id -1)
        filled = np.arange(width)[None, :] < np.minimum([len(w) for w in words], limit)[:, None]
        table[:-1][filled] = codes  # row-major order of `filled` is the order of `codes`
        return torch.from_numpy(table[np.asarray(word_ids)])

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Every item's windows as rows, padded to the longest: input_ids, attention_mask, word_ids,
        label_mask[, labels] (R, T), char_ids (R, T, C), rows (R,) (the item of each row); and per
        item its words, offsets, sentence[, word_tags]."""
        lengths = torch.cat([it["lengths"] for it in items])
        longest = int(lengths.max())

        def stack(key: str, fill: int) -> torch.Tensor:
            return _stack([it[key] for it in items], longest, fill)

        batch: dict[str, Any] = {
            "input_ids": stack("input_ids", self.pad_id),
            "attention_mask": torch.arange(longest)[None, :] < lengths[:, None],
            "word_ids": stack("word_ids", -1),
            "rows": torch.cat([torch.full((it["lengths"].numel(),), j) for j, it in enumerate(items)]),
            "words": [it["words"] for it in items],
            "offsets": [it["offsets"] for it in items],
            "sentence": [it["sentence"] for it in items],
        }
        positions = batch["word_ids"] >= 0
        batch["label_mask"] = positions if self.options.subword_labels == "all" else torch.from_numpy(
            _read_positions(batch["word_ids"].numpy(), self.options.subword_labels))
        if all("labels" in it for it in items):
            batch["labels"] = stack("labels", IGNORE)
            batch["word_tags"] = [it["word_tags"] for it in items]
        if all("char_ids" in it for it in items):
            batch["char_ids"] = stack("char_ids", _PAD_CHAR)
        return batch

    # -- the model side -------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Emissions `logits` (R, T, K), plus Viterbi `predictions` (R, T) from a CRF outside training,
        and what `decode` and the metric need to map rows back to words."""
        emissions = model(**forward_inputs(model, batch, ("input_ids", "attention_mask", "char_ids")))  # (R, T, K)
        if emissions.dim() != 3:
            raise ModelError(f"token-classification needs a tag score per token (R, T, K), the model gives "
                             f"{tuple(emissions.shape)}", "set model.kwargs.pooling: none (or use a tagger model)")
        outputs: dict[str, Any] = {"logits": emissions}
        crf = getattr(model, "crf", None)
        if crf is not None and not model.training:
            outputs["predictions"] = _viterbi(crf, emissions, batch["label_mask"])
        for key in ("word_ids", "rows", "words", "offsets", "sentence"):
            outputs[key] = batch[key]
        return outputs

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The outputs for a batch with or without tags (what the Trainer's `predict` calls)."""
        return self.forward(model, batch)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The CRF's negative log-likelihood when the model has one, else cross-entropy over tagged positions."""
        outputs = self.forward(model, batch)
        emissions, labels = outputs["logits"], batch["labels"]
        crf = getattr(model, "crf", None)
        if crf is not None:
            # also for a model that skipped `init_model` (fine-tuning from `model.init`)
            self._constrain(crf)
            keep, compact, tags, mask = _compact(emissions.float(), labels, batch["label_mask"])
            scored = ~((tags == IGNORE) & mask).any(1)  # a row with a tag training never saw has no path score
            if not scored.any():
                return emissions.sum() * 0.0, outputs
            return crf.nll(compact[scored], tags[scored], mask[scored]), outputs
        if not (labels != IGNORE).any():  # only empty sentences: nothing to learn
            return emissions.sum() * 0.0, outputs
        loss = F.cross_entropy(emissions.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=self.options.label_smoothing)
        return loss, outputs

    def metric(self) -> TaggingMetric:
        universal = None
        if self.options.tag_map == "universal":
            from dapeng.data.tagsets import to_universal

            universal = to_universal
        return TaggingMetric(self.tag_names(), self.scheme, universal, self.options.subword_labels)

    def decode(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Per input `{"tokens", "tags", "scores"}` (a probability per word) and, for BIO/BIOES, the
        `entities` `{"type", "text", "start", "end", "score"}` with character offsets into its text."""
        results = []
        for j, (tags, scores) in enumerate(word_predictions(outputs, self.options.subword_labels)):
            names = [self.labels[t] for t in tags]
            result: dict[str, Any] = {"tokens": outputs["words"][j], "scores": scores}
            if self.scheme == "none":
                result["tags"] = names
            else:
                chunks = spans(names)  # conlleval's repair; a no-op on a constrained CRF's paths
                result["tags"] = from_spans(chunks, len(names), self.scheme)
                offsets, text = outputs["offsets"][j], outputs["sentence"][j]
                if offsets is None:
                    offsets, text = _offsets(result["tokens"])
                result["entities"] = [
                    {"type": kind, "text": text[offsets[s][0] : offsets[e - 1][1]], "start": offsets[s][0],
                     "end": offsets[e - 1][1], "score": sum(scores[s:e]) / (e - s)}
                    for kind, s, e in chunks
                ]
            results.append(result)
        return results

    # -- save / load ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        from dapeng.data.tokenizers import tokenizer_json

        return {"labels": list(self.labels), "scheme": self.scheme, "word_level": self.word_level,
                "chars": list(self.chars), "options": self.options.model_dump(mode="json"),
                "tokenizer": tokenizer_json(self.tokenizer)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TokenClassificationTask:
        """Rebuild for inference from `state()` (or dapeng.json "labels" + "preprocess" + tokenizer.json)."""
        from dapeng.data.tokenizers import load_tokenizer

        options = dict(state.get("options") or {})
        options.pop("tokenizer_path", None)
        task = cls(**options)
        if not state.get("labels") or not state.get("tokenizer"):
            raise DataError("token-classification state lacks its labels or tokenizer",
                            "the Artifact's dapeng.json must list its labels, next to its tokenizer.json")
        task.labels = [str(label) for label in state["labels"]]
        task.index = {label: i for i, label in enumerate(task.labels)}
        task.scheme = state.get("scheme") or detect_scheme(task.labels)
        task.word_level = bool(state.get("word_level", task.word_level))
        task.chars = list(state.get("chars") or [])
        task.char_index = {c: i + 2 for i, c in enumerate(task.chars)}
        task.tokenizer = load_tokenizer(state["tokenizer"])
        task._finish_tokenizer()
        return task


# ---------------------------------------------------------------- rows ↔ words


def _tensor(rows: list[list[int]]) -> torch.Tensor:
    # numpy reads nested lists of ints several times faster than torch.tensor does
    return torch.from_numpy(np.array(rows, dtype=np.int64))


def _stack(parts: Sequence[torch.Tensor], longest: int, fill: int) -> torch.Tensor:
    """(N_i, T_i[, C_i]) tensors as one (sum N_i, longest[, max C_i]) tensor, padded with `fill`."""
    shape = [sum(p.shape[0] for p in parts), longest]
    if parts[0].dim() == 3:
        shape.append(max(p.shape[2] for p in parts))
    out = torch.full(shape, fill, dtype=parts[0].dtype)
    row = 0
    for p in parts:
        out[(slice(row, row + p.shape[0]), *(slice(0, n) for n in p.shape[1:]))] = p
        row += p.shape[0]
    return out


def _read_positions(word_ids: np.ndarray, policy: str) -> np.ndarray:
    """(R, T) bool: the position each word's tag is read from — its first sub-word, or its last."""
    if policy == "last":
        following = np.concatenate([word_ids[:, 1:], np.full_like(word_ids[:, :1], -1)], axis=1)
        return (word_ids >= 0) & (word_ids != following)
    previous = np.concatenate([np.full_like(word_ids[:, :1], -1), word_ids[:, :-1]], axis=1)
    return (word_ids >= 0) & (word_ids != previous)


def word_predictions(outputs: dict[str, Any], policy: str) -> list[tuple[list[int], list[float]]]:
    """Per input of a batch: the tag id of each word and its probability (softmax of the emissions)."""
    probs = outputs["logits"].detach().float().softmax(-1).cpu()  # (R, T, K)
    best = outputs.get("predictions")
    best = probs.argmax(-1) if best is None else best.cpu()  # (R, T)
    word_ids = outputs["word_ids"].cpu().numpy()
    rows = outputs["rows"].cpu().numpy()
    counts = [len(words) for words in outputs["words"]]
    tags = [np.full(n, -1, dtype=np.int64) for n in counts]
    scores = [np.zeros(n) for n in counts]
    r, t = np.nonzero(_read_positions(word_ids, policy))
    chosen = best[r, t]
    chosen_p = probs[r, t].gather(-1, chosen[:, None])[:, 0].numpy()
    for row, word, tag, p in zip(rows[r], word_ids[r, t], chosen.numpy(), chosen_p):
        tags[row][word], scores[row][word] = tag, p
    return [(tag.tolist(), score.tolist()) for tag, score in zip(tags, scores)]


def _to_front(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each row's selected positions go when moved to its front, for a CRF over words only.

    Returns the rows that select any position (R,), and for those rows the source column of
    each front position (R', L) and which front positions are real (R', L).
    """
    keep = select.any(1)
    select = select[keep]
    counts = select.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :width]  # selected first, in order
    mask = torch.arange(width, device=select.device)[None, :] < counts[:, None]
    return keep, order, mask


def _compact(emissions: torch.Tensor, labels: torch.Tensor | None, select: torch.Tensor) -> tuple[Any, ...]:
    """The CRF's view of a batch: (rows kept (R,), emissions (R', L, K), tags (R', L) or None, mask (R', L))."""
    keep, order, mask = _to_front(select)
    compact = emissions[keep].gather(1, order[..., None].expand(-1, -1, emissions.shape[-1]))
    tags = None if labels is None else torch.where(mask, labels[keep].gather(1, order), 0)
    return keep, compact, tags, mask


def _viterbi(crf: Any, emissions: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """The CRF's best path over each row's selected positions, written back in place: (R, T), -1 elsewhere."""
    out = torch.full(select.shape, -1, dtype=torch.long, device=select.device)
    keep, compact, _, mask = _compact(emissions.float(), None, select)
    if not keep.any():
        return out
    paths = crf.decode(compact, mask)
    rows = torch.nonzero(keep)[:, 0].tolist()
    for row, path in zip(rows, paths):
        cols = torch.nonzero(select[row])[:, 0]
        out[row, cols] = torch.tensor(path[: len(cols)], dtype=torch.long, device=out.device)
    return out


# ---------------------------------------------------------------- metrics


class TaggingMetric:
    """Token accuracy and a per-tag report; for BIO/BIOES, seqeval's strict entity scores.

    Entity scores are computed over sequences repaired by conlleval's chunk rules and written
    in BIO (`convert`), then scored by seqeval in strict IOB2 mode: a chunk counts when its type
    and both ends match, so the figures are conlleval's. Accuracy compares tags as predicted.

    Args:
        labels: the tag names, in the model's output order.
        scheme: "none", "BIO" or "BIOES".
        universal: a tag → universal tag mapping (`universal_accuracy`), or None.
        policy: the task's `subword_labels` (which sub-word a word's tag is read from).
    """

    def __init__(self, labels: Sequence[str], scheme: str = "none",
                 universal: Callable[[str], str] | None = None, policy: str = "first") -> None:
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.scheme = scheme
        self.universal = universal
        self.policy = policy
        self.confusion = ClassificationMetric(self.labels)
        self.correct = self.total = self.universal_correct = 0
        self.gold: list[list[str]] = []
        self.predicted: list[list[str]] = []

    def update(self, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        for (tags, _), gold in zip(word_predictions(outputs, self.policy), batch["word_tags"]):
            self.add([self.labels[t] for t in gold.tolist()], [self.labels[t] for t in tags])

    def add(self, gold: Sequence[str], predicted: Sequence[str]) -> None:
        """One sentence's gold and predicted tags."""
        self.total += len(gold)
        self.correct += sum(g == p for g, p in zip(gold, predicted))
        if self.universal is not None:
            self.universal_correct += sum(self.universal(g) == self.universal(p) for g, p in zip(gold, predicted))
        known = [(self.index[g], self.index[p]) for g, p in zip(gold, predicted) if g in self.index and p in self.index]
        if known:
            true, pred = zip(*known)
            np.add.at(self.confusion.matrix, (list(true), list(pred)), 1)
        if self.scheme != "none":
            self.gold.append(convert(gold, "BIO"))
            self.predicted.append(convert(predicted, "BIO"))

    def compute(self) -> dict[str, float]:
        out = {"accuracy": self.correct / self.total if self.total else 0.0}
        if self.universal is not None:
            out["universal_accuracy"] = self.universal_correct / self.total if self.total else 0.0
        if self.scheme != "none":
            from seqeval.metrics import f1_score, precision_score, recall_score
            from seqeval.scheme import IOB2

            args = dict(mode="strict", scheme=IOB2, zero_division=0)
            out["entity_precision"] = float(precision_score(self.gold, self.predicted, **args))
            out["entity_recall"] = float(recall_score(self.gold, self.predicted, **args))
            out["entity_f1"] = float(f1_score(self.gold, self.predicted, **args))
        return out

    def report(self) -> dict[str, Any]:
        """`{"tags": {tag: {precision, recall, f1, support}}, "entities": {type: {...}}}` (entities for BIO/BIOES)."""
        out: dict[str, Any] = {"tags": self.confusion.per_class()}
        if self.scheme != "none":
            from seqeval.metrics import classification_report
            from seqeval.scheme import IOB2

            table = classification_report(self.gold, self.predicted, mode="strict", scheme=IOB2, output_dict=True,
                                          zero_division=0)
            out["entities"] = {
                kind: {"precision": float(row["precision"]), "recall": float(row["recall"]),
                       "f1": float(row["f1-score"]), "support": int(row["support"])}
                for kind, row in table.items() if not kind.endswith(" avg")
            }
        return out

    def write_report(self, directory: str | Path, prefix: str = "") -> list[Path]:
        """Write `{prefix}tagging_report.json` (the metrics and `report()`) into `directory`."""
        from dapeng._files import atomic_path

        path = Path(directory) / f"{prefix}tagging_report.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"metrics": self.compute(), **self.report()}, indent=2) + "\n")
        return [path]
