"""Tokenizers on Hugging Face `tokenizers`: train one on the training split or load a tokenizer.json.

Three kinds: "wordpiece" (BERT's), "bpe", and "word" (whole words, the natural match for
GloVe vectors). All share one English pre-tokenization that follows GloVe's
(Stanford/PTB) conventions — "doesn't" → "does", "n't"; "film's" → "film", "'s" — so
word-level vocabularies line up with pretrained word vectors. Padding happens per batch
(`pad_batch`), optionally over batches of similar length (`LengthBucketSampler`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from dapeng.errors import DataError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]
KINDS = ("wordpiece", "bpe", "word")
# contractions split off as GloVe's training text did; then words, then single symbols
_PRETOKENIZE = r"\w+(?=n't)|n't|'(?:s|re|ve|ll|d|m)\b|\w+|[^\w\s]"
# words for taggers: URLs, @mentions and #hashtags whole, words with inner - ' . (e-mail, don't,
# U.S, 3.14), else one symbol per token
_WORD = re.compile(r"https?://\S+|[@#]?\w+(?:[-'’.]\w+)*|[^\w\s]")


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 20000,
    lowercase: bool = True,
    min_frequency: int = 1,
):
    """Learn a vocabulary from `texts`.

    Args:
        texts: the training split's texts (never eval/test: that would leak).
        kind: "wordpiece", "bpe" or "word".
        vocab_size: the largest vocabulary, special tokens included.
        lowercase: lower-case and strip accents first (GloVe-6B is lower-cased).
        min_frequency: drop tokens seen fewer times.

    Returns:
        A `tokenizers.Tokenizer` with [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4 and a
        "[CLS] text [SEP]" template.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    if kind not in KINDS:
        raise DataError(f"unknown tokenizer kind {kind!r}", f"choose one of: {', '.join(KINDS)}")
    common = {"vocab_size": vocab_size, "min_frequency": min_frequency, "special_tokens": SPECIAL_TOKENS}
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        trainer = trainers.WordPieceTrainer(**common)
        tok.decoder = decoders.WordPiece()
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(**common)
    else:
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(**common)
    steps = [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")]
    if lowercase:
        steps += [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated")]
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))],
    )
    return tok


def train_subword_tokenizer(texts: Iterable[str], vocab_size: int = 16000, min_frequency: int = 2):
    """A cased, reversible BPE for text generation (translation, summarization): decode(encode(t)) == t.

    SentencePiece-style: whitespace becomes part of the following piece ("▁"), so decoding puts
    every space back and glues "l'homme" together again, which word-splitting pre-tokenizers
    can't (they would score an output "l ' homme" against the reference "l'homme"). Text is
    NFKC-normalised and its runs of whitespace collapsed; case and accents are kept.

    Args:
        texts: the training split's texts, both sides for a shared vocabulary.
        vocab_size: the largest vocabulary, special tokens included.
        min_frequency: merges seen fewer times are not learned.

    Returns:
        A `tokenizers.Tokenizer` with `train_tokenizer`'s special tokens ([PAD]=0, [UNK]=1,
        [CLS]=2, [SEP]=3, [MASK]=4) and no template: the task adds its own begin/end ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_word_tokenizer(
    words: Iterable[str], vocab_size: int = 20000, lowercase: bool = True, min_frequency: int = 1
):
    """A word vocabulary for text that comes already split into words (taggers: one id per word).

    Unlike `train_tokenizer(kind="word")` there is no pre-tokenization: encoded with
    `is_pretokenized=True`, every word is one token ("doesn't" stays one), [UNK] when unseen.
    The special tokens are `train_tokenizer`'s; no [CLS]/[SEP] template.
    """
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    steps = [normalizers.NFKC()]
    if lowercase:  # as GloVe-6B's vocabulary
        steps += [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    tok.normalizer = normalizers.Sequence(steps)
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(words, trainer=trainer)
    return tok


def extend_word_vocab(tokenizer, words: Iterable[str]) -> int:
    """Give `words` ids after the trained ones in a word-level tokenizer; returns how many were new.

    The ids already given stay as they are, as do normalisation, pre-tokenisation and the
    [CLS]/[SEP] template: only the WordLevel model is rebuilt with the longer vocabulary.
    """
    from tokenizers import models

    spec = json.loads(tokenizer.to_str())["model"]
    if spec["type"] != "WordLevel":
        raise DataError(f"only a word tokenizer's vocabulary can be extended, not a {spec['type']} one",
                        "set task_options.tokenizer: word")
    vocab = dict(spec["vocab"])
    before = len(vocab)
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer.model = models.WordLevel(vocab, unk_token=spec["unk_token"])
    return len(vocab) - before


def load_tokenizer(source: str | Path):
    """A tokenizer from a tokenizer.json path or its JSON text."""
    from tokenizers import Tokenizer

    text = str(source)
    try:
        if text.lstrip().startswith("{"):
            return Tokenizer.from_str(text)
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: no such tokenizer file", "point tokenizer_path at a tokenizer.json")
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"cannot read tokenizer: {str(err).splitlines()[0]}", "expected a tokenizer.json"
        ) from None


def tokenizer_json(tokenizer) -> str:
    """The tokenizer as tokenizer.json text (what the Artifact stores)."""
    return tokenizer.to_str()


def special_id(tokenizer, token: str, fallback: int | None = None) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        if fallback is not None:
            return fallback
        raise DataError(f"the tokenizer has no {token} token", "train one with dapeng or add the token")
    return tid


def encode_texts(
    tokenizer, texts: Sequence[str], max_length: int, add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids per text, truncated to `max_length` (the [SEP] kept at the end when added)."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    out = []
    for enc in encodings:
        ids = enc.ids
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:] if add_special_tokens else ids[:max_length]
        out.append(ids if ids else [special_id(tokenizer, UNK)])
    return out


def pad_batch(sequences: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors to the longest in the batch.

    Returns:
        input_ids (B, T) long and attention_mask (B, T) bool (True on real tokens).
    """
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return ids, mask


class LengthBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length, so padding per batch wastes little (a `batch_sampler`).

    Indices are shuffled, cut into pools of `batch_size * pool_batches`, each pool sorted
    by length and cut into batches, and the batches shuffled again: every epoch differs,
    and each batch holds texts of near-equal length.

    Args:
        lengths: token count of each item.
        batch_size: items per batch.
        shuffle: reshuffle every epoch (False: one fixed order, by length within pools).
        seed: base seed; epoch e uses seed + e.
        pool_batches: how many batches' worth of items are sorted together.
        drop_last: drop a final short batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        pool_batches: int = 50,
        drop_last: bool = False,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool = batch_size * pool_batches
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=lambda i: self.lengths[i])
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            rng.shuffle(batches)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        n, count = len(self.lengths), 0
        for start in range(0, n, self.pool):
            size = min(self.pool, n - start)
            count += size // self.batch_size if self.drop_last else -(-size // self.batch_size)
        return count


def vocab_words(tokenizer) -> dict[str, int]:
    """Token → id, for tokens that are whole words (no WordPiece "##" continuations, no specials)."""
    return {
        t: i for t, i in tokenizer.get_vocab().items() if not t.startswith("##") and t not in SPECIAL_TOKENS
    }


def describe(tokenizer) -> str:
    model = json.loads(tokenizer.to_str())["model"]["type"]
    return f"{model} tokenizer, {tokenizer.get_vocab_size():,} tokens"


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of a raw sentence and their `(start, end)` character offsets in it (for taggers)."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]
