"""Tokenizers on HF `tokenizers`: training, specials, truncation, padding, length buckets, save/load."""

import pytest
import torch

from dapeng.data.tokenizers import (
    LengthBucketSampler,
    encode_texts,
    extend_word_vocab,
    load_tokenizer,
    pad_batch,
    tokenizer_json,
    train_tokenizer,
    vocab_words,
)
from dapeng.errors import DataError

TEXTS = [
    "The film doesn't work, and it's the director's worst.",
    "A gripping, funny film with a great cast.",
    "Funny? Not really. The plot drags and the cast looks bored.",
] * 5


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "word"])
def test_trained_tokenizer_has_fixed_specials_and_glove_style_words(kind):
    tok = train_tokenizer(TEXTS, kind=kind, vocab_size=300)
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    tokens = tok.encode("The film doesn't work.").tokens
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "does" in tokens and "n't" in tokens and " " not in tokens
    assert tok.encode("FILM").tokens[1] == "film"  # lower-cased


def test_word_tokenizer_maps_unknown_words_to_unk():
    tok = train_tokenizer(TEXTS, kind="word", vocab_size=300)
    assert tok.encode("zyzzyva").tokens[1] == "[UNK]"
    assert "film" in vocab_words(tok) and "[PAD]" not in vocab_words(tok)


def test_extending_a_word_vocabulary_keeps_ids_and_adds_words():
    tok = train_tokenizer(TEXTS, kind="word", vocab_size=300)
    before = tok.get_vocab()
    assert extend_word_vocab(tok, ["film", "zyzzyva", "marvellous"]) == 2  # "film" already has an id
    after = tok.get_vocab()
    assert all(after[t] == i for t, i in before.items())
    assert {after["zyzzyva"], after["marvellous"]} == {len(before), len(before) + 1}
    tokens = tok.encode("A marvellous zyzzyva film").tokens
    assert tokens == ["[CLS]", "a", "marvellous", "zyzzyva", "film", "[SEP]"]
    with pytest.raises(DataError, match="word tokenizer"):
        extend_word_vocab(train_tokenizer(TEXTS, kind="wordpiece", vocab_size=300), ["film"])


def test_truncation_keeps_sep():
    tok = train_tokenizer(TEXTS, kind="word", vocab_size=300)
    (ids,) = encode_texts(tok, [TEXTS[0]], max_length=5)
    assert len(ids) == 5 and ids[0] == 2 and ids[-1] == 3


def test_pad_batch_pads_to_the_longest():
    ids, mask = pad_batch([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_json_round_trip_and_bad_json(tmp_path):
    tok = train_tokenizer(TEXTS, kind="wordpiece", vocab_size=300)
    again = load_tokenizer(tokenizer_json(tok))
    assert again.encode(TEXTS[1]).ids == tok.encode(TEXTS[1]).ids
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer_json(tok))
    assert load_tokenizer(path).get_vocab_size() == tok.get_vocab_size()
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_tokenizer('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")


def test_length_buckets_cover_every_item_once_and_group_lengths():
    lengths = [(i * 37) % 101 for i in range(250)]
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=1, pool_batches=10)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(250))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 20  # random batches of 8 from 0..100 spread ~75
    assert list(sampler) != batches  # a new order each epoch
