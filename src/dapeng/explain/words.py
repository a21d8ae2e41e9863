"""From tokens back to the words a person wrote.

Attributions are computed per token (sub-words, [CLS], padding); people read words. The
task's Hugging Face tokenizer knows which word each token came from (`word_ids`) and
where it sits in the text (`offsets`), so token scores are summed per word and the words
shown in place in the original text. A task without such a tokenizer gets one "word" per
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class WordAlignment:
    """Which word each token belongs to.

    Attributes:
        word_of_token: per token, the index of its word, or None (special tokens, padding).
        words: the words in order.
        spans: (start, end) of each word in `text`, when the text and offsets are known.
        text: the input text.
        tokens: the token strings, for the axes of attention maps.
        pad_id: the tokenizer's padding id, when it has one.
    """

    word_of_token: list[int | None]
    words: list[str]
    spans: list[tuple[int, int]] | None = None
    text: str | None = None
    tokens: list[str] = field(default_factory=list)
    pad_id: int | None = None
    vocab: Any = None

    def first_tokens(self) -> list[int]:
        """The position of each word's first token."""
        firsts: dict[int, int] = {}
        for pos, word in enumerate(self.word_of_token):
            if word is not None and word not in firsts:
                firsts[word] = pos
        return [firsts[w] for w in sorted(firsts)]

    def token_text(self, token_id: int) -> str:
        if self.vocab is not None:
            piece = self.vocab.decode([token_id])
            if piece:
                return piece
            return self.vocab.id_to_token(token_id) or str(token_id)
        return str(token_id)


def merge_tokens(scores: np.ndarray, alignment: WordAlignment) -> np.ndarray:
    """Sum token scores (T,) into word scores (W,); tokens of no word are dropped.

    Summing keeps Integrated Gradients' completeness: the word scores still add up to
    f(x) - f(baseline).
    """
    out = np.zeros(len(alignment.words), dtype=np.float64)
    for pos, word in enumerate(alignment.word_of_token[: len(scores)]):
        if word is not None:
            out[word] += float(scores[pos])
    return out


def find_tokenizer(task: Any) -> Any:
    """The task's Hugging Face `tokenizers.Tokenizer`, looked for where tasks keep it."""
    for name in ("tokenizer", "_tokenizer", "tok"):
        tok = getattr(task, name, None)
        if tok is None:
            continue
        if hasattr(tok, "encode") and hasattr(tok, "id_to_token"):
            return tok
        for inner in ("tokenizer", "_tokenizer", "backend"):
            candidate = getattr(tok, inner, None)
            if candidate is not None and hasattr(candidate, "id_to_token"):
                return candidate
    return None


def _pad_id(tok: Any) -> int | None:
    padding = getattr(tok, "padding", None)
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for piece in ("[PAD]", "<pad>", "<PAD>"):
        found = tok.token_to_id(piece)
        if found is not None:
            return int(found)
    return None


def align_words(
    task: Any, text: str | None, ids: Sequence[int], word_ids: Any = None
) -> WordAlignment:
    """Align the task's token ids with the words of `text`.

    Args:
        task: the pipeline's task (its tokenizer is looked up with `find_tokenizer`).
        text: the input text.
        ids: the token ids the task encoded (one sequence, no batch dimension).
        word_ids: a (1, T) tensor of word indices (-1 for none) the task provided, if any.
    """
    tok = find_tokenizer(task)
    tokens = [tok.id_to_token(int(i)) or str(int(i)) for i in ids] if tok is not None else [str(i) for i in ids]
    pad = _pad_id(tok) if tok is not None else None
    if word_ids is not None:
        row = [int(w) for w in np.asarray(word_ids.cpu() if hasattr(word_ids, "cpu") else word_ids).reshape(-1)]
        of = [w if w >= 0 else None for w in row]
        count = max((w for w in of if w is not None), default=-1) + 1
        words = text.split() if text and len(text.split()) == count else [f"#{i}" for i in range(count)]
        return WordAlignment(of, words, None, text, tokens, pad, tok)
    if tok is not None and text is not None:
        enc = tok.encode(text)
        real = [int(i) for i in ids]
        n = len(real)
        same = 0
        while same < min(n, len(enc.ids)) and enc.ids[same] == real[same]:
            same += 1
        # A truncated input keeps its closing special token ([SEP]) after the cut, and a
        # padded one ends in padding: the tokens past the common prefix belong to no word.
        if same >= n - 1 or all(pad is not None and t == pad for t in real[same:]):
            return _from_encoding(enc, text, tokens, pad, tok, same, n)
    # No alignment: each non-padding token stands for itself.
    of = [None if (pad is not None and int(i) == pad) else p for p, i in enumerate(ids)]
    index = {p: w for w, p in enumerate(p for p in of if p is not None)}
    of = [None if p is None else index[p] for p in of]
    # Byte-level pieces read better decoded ("Ġthe" -> "the").
    words = [((tok.decode([int(ids[p])]).strip() if tok is not None else "") or tokens[p])
             for p, w in enumerate(of) if w is not None]
    return WordAlignment(of, words, None, None, tokens, pad, tok)


def _from_encoding(
    enc: Any, text: str, tokens: list[str], pad: int | None, tok: Any, same: int, n: int
) -> WordAlignment:
    """Words from the first `same` tokens of `enc` (those equal to the task's ids); n tokens in all."""
    word_ids = list(enc.word_ids[:same]) + [None] * (n - same)
    offsets = list(enc.offsets[:same]) + [(0, 0)] * (n - same)
    special = list(enc.special_tokens_mask[:same]) + [1] * (n - same)
    renumber: dict[int, int] = {}
    of: list[int | None] = []
    spans: list[list[int]] = []
    for pos, word in enumerate(word_ids):
        if word is None or special[pos]:
            of.append(None)
            continue
        start, end = offsets[pos]
        if word not in renumber:
            renumber[word] = len(spans)
            spans.append([start, end])
        index = renumber[word]
        spans[index][0] = min(spans[index][0], start)
        spans[index][1] = max(spans[index][1], end)
        of.append(index)
    span_tuples = [_trim(text, s, e) for s, e in spans]
    words = [text[s:e] for s, e in span_tuples]
    # Spans must be increasing and disjoint to be shown in place; otherwise show words alone.
    ordered = all(a[1] <= b[0] for a, b in zip(span_tuples, span_tuples[1:]))
    return WordAlignment(of, words, span_tuples if ordered else None, text, tokens, pad, tok)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace (byte-level BPE counts a word's leading space)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
